"""Model packs: a directory with ``hepatoquant-model.json`` and safetensors weights.

A pack is what the CLI, the server and the benchmark load by name: the manifest says which registered
encoder it uses, its preprocessing, the classes of its linear head and its status. The manifest is validated
against the JSON Schema shipped in the package. Packs live in a models directory (``--models-dir``,
``HEPATOQUANT_MODELS_DIR``, else ``$XDG_DATA_HOME/hepatoquant/models``); the demo pack is made there on first
use, so that everything runs on a fresh machine without any download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import torch
from hepatoquant_client.classes import TISSUE_CLASS_CODES
from safetensors.torch import load_file, save_file

from hepatoquant import __version__
from hepatoquant.atomic_write import staged_folder
from hepatoquant.encoders import create_encoder, encoder_config
from hepatoquant.errors import InvalidParameterError, ModelPackError, ModelPackNotFoundError

__all__ = [
    "MANIFEST_NAME",
    "DEMO_PACK_NAME",
    "ModelPack",
    "load_model_pack",
    "list_model_packs",
    "ensure_demo_pack",
    "default_models_dir",
]

MANIFEST_NAME = "hepatoquant-model.json"
DEMO_PACK_NAME = "demo"
DEMO_SEGMENTER_PACK_NAME = "demo-seg"
DEMO_SEED = 20260101
ENCODER_FILE = "encoder.safetensors"
HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class ModelPack:
    """A validated model pack on disk."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def model_status(self) -> str:
        return self.manifest["model_status"]

    @property
    def is_untrained_demo(self) -> bool:
        return self.model_status == "untrained-demo"

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def encoder_weights(self) -> Path:
        return self.path / self.manifest["encoder"]["weights"]

    @property
    def head_weights(self) -> Path | None:
        head = self.manifest.get("head")
        return self.path / head["weights"] if head else None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def input_size_px(self) -> int:
        return int(self.manifest["input_size_px"])

    @property
    def spacing_um_px(self) -> float:
        return float(self.manifest["spacing_um_px"])

    @property
    def tile_size_px(self) -> int:
        return int(self.manifest["tile_size_px"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["normalization"]["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["normalization"]["std"])  # type: ignore[return-value]

    def summary(self) -> dict:
        """What reports record about the model."""
        summary = {
            "name": self.name,
            "kind": self.kind,
            "version": self.manifest["version"],
            "model_status": self.model_status,
            "encoder": self.encoder_name,
            "classes": list(self.classes),
            "input_size_px": self.input_size_px,
            "spacing_um_px": self.spacing_um_px,
            "tile_size_px": self.manifest.get("tile_size_px"),
            "licence_note": self.manifest["licence_note"],
            "path": str(self.path),
            "description": self.manifest.get("description", ""),
        }
        imported = (self.manifest.get("training") or {}).get("imported_from")
        if imported:  # e.g. a PFM_Segmentation checkpoint: which file, which fine-tuning mode, which LoRA scale
            summary["imported_from"] = imported
        return summary


@cache
def _manifest_schema() -> dict:
    text = resources.files("hepatoquant").joinpath("schemas/model_pack.schema.json").read_text()
    return json.loads(text)


@cache
def _manifest_validator() -> jsonschema.protocols.Validator:
    """One validator for every manifest: ``jsonschema.validate`` checks the schema itself on each call (26 ms of
    pure Python per pack, measured; 0.4 ms with this), and a server validates packs on every submission."""
    schema = _manifest_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def default_models_dir() -> Path:
    """``HEPATOQUANT_MODELS_DIR``, else ``$XDG_DATA_HOME/hepatoquant/models`` (``~/.local/share`` by default)."""
    if os.environ.get("HEPATOQUANT_MODELS_DIR"):
        return Path(os.environ["HEPATOQUANT_MODELS_DIR"])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "hepatoquant" / "models"


def load_model_pack(path: str | Path) -> ModelPack:
    """Read and check a pack directory: schema, encoder name, weight files, preprocessing consistency."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelPackNotFoundError(
            f"{str(path)!r} is not a model pack: it has no {MANIFEST_NAME}; "
            "create one with `hepatoquant models add` or list packs with `hepatoquant models list`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        _manifest_validator().validate(manifest)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelPackError(f"{str(manifest_path)!r} is not valid JSON ({exc}); fix or recreate the pack") from exc
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ModelPackError(
            f"{str(manifest_path)!r} does not follow the model pack schema at {where}: {exc.message}; "
            "fix the manifest or recreate the pack with `hepatoquant models add`"
        ) from exc
    pack = ModelPack(path=path, manifest=manifest)
    try:
        config = encoder_config(pack.encoder_name)
    except InvalidParameterError as exc:
        raise ModelPackError(f"model pack {str(path)!r}: {exc}") from exc
    # A segmenter may run its windows at another size than the encoder's (PFM_Segmentation checkpoints trained
    # at 256 px on UNI): whole patches, on an encoder built with dynamic image sizes (checked when imported).
    other_window = (pack.kind == "segmenter" and config.dynamic_img_size
                    and pack.input_size_px % config.patch_size_px == 0 and pack.input_size_px >= config.patch_size_px)
    if pack.input_size_px != config.input_size_px and not other_window:
        raise ModelPackError(
            f"model pack {str(path)!r} declares input {pack.input_size_px} px but encoder {config.name!r} takes "
            f"{config.input_size_px} px; fix input_size_px in {MANIFEST_NAME}"
        )
    for weights in (pack.encoder_weights, pack.head_weights):
        if weights is not None and not weights.is_file():
            raise ModelPackError(f"model pack {str(path)!r} lacks its weight file {weights.name!r}; recreate the pack")
    return pack


def _pack_dirs(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if (p / MANIFEST_NAME).is_file())


def list_model_packs(models_dir: Path | None = None) -> list[ModelPack | ModelPackError]:
    """Every pack in ``models_dir``; a broken pack is listed as its error rather than hiding the others."""
    packs: list[ModelPack | ModelPackError] = []
    for pack_dir in _pack_dirs(models_dir or default_models_dir()):
        try:
            packs.append(load_model_pack(pack_dir))
        except ModelPackError as exc:
            packs.append(exc)
    return packs


def write_pack(
    dest: Path,
    manifest: dict,
    tensors: dict[str, dict[str, torch.Tensor]],
    *,
    replace: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> ModelPack:
    """Write a pack into a temporary sibling directory and rename it into place: never a half-written pack.

    ``tensors`` maps file names to state dicts (saved as safetensors); ``write_extra(folder)`` may add more
    (a peft adapter folder). ``manifest`` may name ``{sha256:<file>}`` placeholders: see :func:`file_sha256`.
    With ``replace``, an existing pack at ``dest`` is swapped out only after the new one is complete.
    """
    try:
        with staged_folder(dest, replace=replace) as staging:
            for filename, state_dict in tensors.items():
                save_file({k: v.contiguous() for k, v in state_dict.items()}, str(staging / filename))
            if write_extra is not None:
                write_extra(staging)
            encoder_entry = manifest["encoder"]
            if encoder_entry.get("sha256") == "":
                encoder_entry["sha256"] = file_sha256(staging / encoder_entry["weights"])
            _manifest_validator().validate(manifest)
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        if dest.is_dir() and (dest / MANIFEST_NAME).is_file() and not replace:  # another process won the race
            return load_model_pack(dest)
        raise ModelPackError(f"could not write model pack {str(dest)!r}: {exc}") from exc
    return load_model_pack(dest)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weight files reach gigabytes).

    A manifest whose ``encoder.sha256`` is the empty string gets the encoder file's digest when written.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_manifest(
    *, name: str, kind: str, status: str, encoder: str, classes: tuple[str, ...], description: str, licence: str,
    tile_size_px: int = 150,
) -> dict:
    config = encoder_config(encoder)
    manifest = {
        "format_version": 1,
        "name": name,
        "kind": kind,
        "version": "1",
        "model_status": status,
        "description": description,
        "encoder": {"name": encoder, "weights": ENCODER_FILE},
        "classes": list(classes),
        "input_size_px": config.input_size_px,
        "spacing_um_px": config.spacing_um_px,
        "tile_size_px": tile_size_px,
        "normalization": {"mean": list(config.mean), "std": list(config.std)},
        "licence_note": licence,
        "created_by": f"hepatoquant {__version__}",
    }
    if kind == "classifier":
        manifest["head"] = {"weights": HEAD_FILE}
    return manifest


def ensure_demo_pack(models_dir: Path | None = None, *, encoder: str = "demo_vit_tiny") -> ModelPack:
    """The demo classifier pack: small encoder and linear head with fixed-seed, untrained weights.

    Made on first use (a few seconds) so a fresh machine needs no download; every output made with it says
    ``model_status: untrained-demo``. Its predictions mean nothing about tissue.
    """
    dest = (models_dir or default_models_dir()) / DEMO_PACK_NAME
    if (dest / MANIFEST_NAME).is_file():
        return load_model_pack(dest)
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's random state
        torch.manual_seed(DEMO_SEED)
        model = create_encoder(encoder)
        head = torch.nn.Linear(model.config.embedding_dim, len(TISSUE_CLASS_CODES))
    manifest = pack_manifest(
        name=DEMO_PACK_NAME,
        kind="classifier",
        status="untrained-demo",
        encoder=encoder,
        classes=TISSUE_CLASS_CODES,
        description="Demo pack: random fixed-seed weights so the pipeline runs anywhere. Its labels are meaningless.",
        licence="HepatoQuant demo weights; untrained, for trying the software only",
    )
    return write_pack(dest, manifest, {ENCODER_FILE: model.backbone.state_dict(), HEAD_FILE: head.state_dict()})


def new_pack_destination(name: str, models_dir: Path | None, overwrite: bool) -> Path:
    """The folder a new pack ``name`` goes to, after checking the name and that nothing is replaced unasked.

    The name is checked before it touches the file system: "", "." or ".." with overwrite would delete a parent.
    """
    if not re.fullmatch(_manifest_schema()["properties"]["name"]["pattern"], name):
        raise InvalidParameterError(
            f"pack name {name!r} is not allowed; use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    dest = (models_dir or default_models_dir()) / name
    if dest.exists() and not overwrite:
        raise ModelPackError(f"model pack {str(dest)!r} already exists; choose another --name or remove it first")
    return dest


def load_head_weights(pack: ModelPack) -> dict[str, torch.Tensor]:
    """The pack's linear-head tensors (for classifier packs)."""
    if pack.head_weights is None:
        raise ModelPackError(
            f"model pack {pack.name!r} is an encoder pack without a classifier head; train a linear probe "
            "or choose a classifier pack"
        )
    return load_file(str(pack.head_weights))
