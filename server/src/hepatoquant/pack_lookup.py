"""A model pack by name or folder, the demo packs made when first asked for.

Apart from the pack format (``hepatoquant.model_pack``) because the demo segmenter is built by
``hepatoquant.segmentation.pack``, which itself writes packs in that format: here both are known without an
import circle.
"""

from __future__ import annotations

import re
from pathlib import Path

from hepatoquant.errors import ModelPackNotFoundError, shown
from hepatoquant.model_pack import (
    DEMO_PACK_NAME,
    DEMO_SEGMENTER_PACK_NAME,
    MANIFEST_NAME,
    ModelPack,
    _pack_dirs,
    default_models_dir,
    ensure_demo_pack,
    load_model_pack,
)
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack

__all__ = ["pack_by_name", "resolve_model_pack"]

# What a pack's folder name may be when a client names it: no separators, no leading dot.
PACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _demo_pack(name: str, models_dir: Path) -> ModelPack | None:
    """The demo classifier or segmenter pack, made in ``models_dir`` when first asked for; None for other names."""
    if name == DEMO_PACK_NAME:
        return ensure_demo_pack(models_dir)
    if name == DEMO_SEGMENTER_PACK_NAME:
        return ensure_demo_segmentation_pack(models_dir)
    return None


def resolve_model_pack(name_or_path: str, models_dir: Path | None = None) -> ModelPack:
    """A pack by directory path, or by name in ``models_dir``; the demo pack is created when first asked for."""
    models_dir = models_dir or default_models_dir()
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return load_model_pack(candidate)
    demo = _demo_pack(name_or_path, models_dir)
    if demo is not None:
        return demo
    if (models_dir / name_or_path).is_dir():
        return load_model_pack(models_dir / name_or_path)
    known = ", ".join(sorted(p.name for p in _pack_dirs(models_dir))) or "none"
    raise ModelPackNotFoundError(
        f"no model pack {name_or_path!r} in {str(models_dir)!r} (packs there: {known}); give a pack directory, "
        f"add one with `hepatoquant models add`, or use --model {DEMO_PACK_NAME}"
    )


def pack_by_name(name: str, models_dir: Path) -> ModelPack:
    """A pack the server holds, by its folder name in ``models_dir`` only: what a client may ask for. A path
    would let a client probe the server's file system (an existing and a missing folder answered differently,
    naming the models folder), so every name that is not a pack here gets the same answer, naming no folder."""
    if PACK_NAME.fullmatch(name):
        demo = _demo_pack(name, models_dir)
        if demo is not None:
            return demo
        if (models_dir / name / MANIFEST_NAME).is_file():
            return load_model_pack(models_dir / name)
    known = ", ".join(sorted(p.name for p in _pack_dirs(models_dir))) or "none"
    raise ModelPackNotFoundError(
        f"no model pack {shown(name)} on this server (its packs: {known}); name one of them: GetServerInfo lists "
        "them with their kinds. The server's operator adds packs with `hepatoquant models add`"
    )
