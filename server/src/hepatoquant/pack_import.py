"""Making classifier and encoder packs from weights a user has: a foundation model's checkpoint with an optional
linear head (``hepatoquant models add`` / ``import-head``), or a HepatoBench probe on a pack's encoder. The pack
format itself (manifest, loading, atomic writing) is ``hepatoquant.model_pack``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from hepatoquant_client.classes import TISSUE_CLASS_CODES, TISSUE_CLASSES

from hepatoquant.encoders import create_encoder, encoder_config, load_state_dict_file
from hepatoquant.errors import InvalidParameterError, WeightsMismatchError
from hepatoquant.model_pack import (
    ENCODER_FILE,
    HEAD_FILE,
    ModelPack,
    new_pack_destination,
    pack_manifest,
    write_pack,
)

__all__ = ["HEAD_PREFIXES", "add_model_pack", "tissue_class_codes", "write_probe_pack"]


def add_model_pack(
    checkpoint: str | Path,
    *,
    encoder: str,
    name: str,
    models_dir: Path | None = None,
    head: str | Path | None = None,
    classes: tuple[str, ...] = TISSUE_CLASS_CODES,
    licence_note: str | None = None,
    overwrite: bool = False,
    tile_size_px: int = 150,
) -> ModelPack:
    """Turn a local encoder checkpoint (e.g. UNI's ``pytorch_model.bin``) and optionally a linear head into a pack.

    The checkpoint is loaded strictly into the registered architecture first, so a pack never holds weights
    that do not fit. Without ``head`` the pack is an encoder pack (embeddings, benchmarks), not a classifier.
    ``classes`` name the head's outputs in order; tiles are ``tile_size_px`` at the encoder's spacing.
    """
    if not 16 <= tile_size_px <= 4096:
        raise InvalidParameterError(f"tile size {tile_size_px} px is outside 16..4096 px")
    if head is not None:
        classes = tissue_class_codes(classes)
    dest = new_pack_destination(name, models_dir, overwrite)
    model = create_encoder(encoder, weights=checkpoint)
    tensors = {ENCODER_FILE: model.backbone.state_dict()}
    if head is not None:
        head_state = _load_head(Path(head), model.config.embedding_dim, len(classes))
        tensors[HEAD_FILE] = head_state
    manifest = pack_manifest(
        name=name,
        kind="classifier" if head is not None else "encoder",
        status="trained" if head is not None else "pretrained-encoder",
        encoder=encoder,
        classes=classes,
        description=f"{encoder_config(encoder).description}; from {Path(checkpoint).name}"
        + (f", head from {Path(head).name}" if head is not None else ""),
        licence=licence_note or encoder_config(encoder).licence_note,
        tile_size_px=tile_size_px,
    )
    return write_pack(dest, manifest, tensors, replace=overwrite)


def write_probe_pack(
    encoder_pack: ModelPack,
    head_state: dict[str, torch.Tensor],
    *,
    name: str,
    classes: tuple[str, ...],
    description: str,
    models_dir: Path | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> ModelPack:
    """A classifier pack from a trained linear probe: ``encoder_pack``'s encoder weights (copied as they are, so
    the pack's SHA-256 proves which encoder the head was trained on) and the head. ``extra`` (e.g. the probe's
    training record and test metrics) is stored in the manifest under ``"training"``."""
    dest = new_pack_destination(name, models_dir, overwrite)
    config = encoder_config(encoder_pack.encoder_name)
    weight = head_state["weight"]
    if tuple(weight.shape) != (len(classes), config.embedding_dim):
        raise WeightsMismatchError(
            f"probe head {tuple(weight.shape)} does not fit {len(classes)} classes on encoder "
            f"{encoder_pack.encoder_name!r} ({config.embedding_dim} dimensions)"
        )
    manifest = pack_manifest(name=name, kind="classifier", status="trained", encoder=encoder_pack.encoder_name,
                         classes=classes, description=description, licence=encoder_pack.manifest["licence_note"])
    manifest["encoder"]["sha256"] = ""  # filled in by write_pack from the copied file
    manifest["input_size_px"] = encoder_pack.input_size_px
    manifest["normalization"] = {"mean": list(encoder_pack.mean), "std": list(encoder_pack.std)}
    if extra:
        manifest["training"] = extra

    def copy_encoder(folder: Path) -> None:
        shutil.copyfile(encoder_pack.encoder_weights, folder / ENCODER_FILE)

    return write_pack(dest, manifest, {HEAD_FILE: {k: v.float() for k, v in head_state.items()}},
                      replace=overwrite, write_extra=copy_encoder)


def tissue_class_codes(names: tuple[str, ...]) -> tuple[str, ...]:
    """A head's output names as HepatoQuant's tissue class codes (TUM, FIB, ...): codes or display names
    (Tumour, Fibrosis, ...), any case, each at most once. Reports, QuPath classes and overlays are in these classes."""
    known = {c.code.lower(): c.code for c in TISSUE_CLASSES} | {c.display_name.lower(): c.code for c in TISSUE_CLASSES}
    codes = tuple(known.get(name.strip().lower(), "") for name in names)
    unknown = [name for name, code in zip(names, codes, strict=True) if not code]
    if unknown or len(set(codes)) != len(codes) or not codes:
        listing = ", ".join(f"{c.code} ({c.display_name})" for c in TISSUE_CLASSES)
        raise InvalidParameterError(
            f"head classes {list(names)}: name each output, in order, with the HepatoQuant tissue class it stands for "
            f"(each at most once): {listing}" + (f"; not one of them: {', '.join(unknown)}" if unknown else "")
        )
    return codes


# Where training code usually keeps its linear classifier; "" is a bare {weight, bias} file.
HEAD_PREFIXES = ("", "head.", "fc.", "classifier.", "linear.")


def _load_head(path: Path, embedding_dim: int, num_classes: int) -> dict[str, torch.Tensor]:
    """A linear head's ``weight`` [classes, dim] and ``bias`` [classes], checked against the encoder.

    The file may hold them bare or under one of :data:`HEAD_PREFIXES` (after an optional ``module.`` or
    ``model.`` from a training wrapper), and nothing else: a file with more tensors is not one linear layer.
    """
    state = load_state_dict_file(path)
    for wrapper in ("module.", "model."):
        if state and all(k.startswith(wrapper) for k in state):
            state = {k.removeprefix(wrapper): v for k, v in state.items()}
    found = [p for p in HEAD_PREFIXES if set(state) == {f"{p}weight", f"{p}bias"}]
    if not found:
        raise WeightsMismatchError(
            f"head file {str(path)!r} must hold exactly the 'weight' and 'bias' of one linear layer, bare or under "
            f"{', '.join(repr(p) for p in HEAD_PREFIXES[1:])}; it has "
            f"{', '.join(sorted(state)[:6]) or 'nothing'}{' ...' if len(state) > 6 else ''}"
        )
    weight, bias = state[f"{found[0]}weight"], state[f"{found[0]}bias"]
    if tuple(weight.shape) != (num_classes, embedding_dim) or tuple(bias.shape) != (num_classes,):
        raise WeightsMismatchError(
            f"head file {str(path)!r} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; this encoder "
            f"needs weight ({num_classes}, {embedding_dim}) and bias ({num_classes},) for {num_classes} classes"
            + (f" (the head has {weight.shape[0]} outputs: give that many class names)"
               if weight.ndim == 2 and weight.shape[0] != num_classes else "")
        )
    return {"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}
