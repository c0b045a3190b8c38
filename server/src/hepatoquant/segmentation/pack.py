"""Segmentation model packs: encoder weights, peft LoRA adapter, decoder, and the manifest tying them.

A segmenter pack records the SHA-256 of the backbone weights its adapter was trained on; loading checks it,
because a LoRA adapter applied to other backbone weights silently computes something else.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from hepatoquant import __version__
from hepatoquant.encoders import encoder_config
from hepatoquant.errors import ModelPackError, WeightsMismatchError
from hepatoquant.model_pack import (
    DEMO_SEGMENTER_PACK_NAME,
    ModelPack,
    default_models_dir,
    load_model_pack,
    write_pack,
)
from hepatoquant.segmentation import SEG_CLASS_NAMES
from hepatoquant.segmentation.model import LoRASettings, SegmentationModel, build_segmentation_model
from hepatoquant.weights_digest import weights_sha256

__all__ = [
    "DEMO_SEGMENTER_NAME",
    "DEFAULT_WINDOW_SPACING_UM_PX",
    "write_segmentation_pack",
    "ensure_demo_segmentation_pack",
    "load_segmenter",
]

DEMO_SEGMENTER_NAME = DEMO_SEGMENTER_PACK_NAME
DEMO_SEED = 20260102
DEFAULT_WINDOW_SPACING_UM_PX = 2.0
_ENCODER_FILE = "encoder.safetensors"
_DECODER_FILE = "decoder.safetensors"
_ADAPTER_DIR = "adapter"


def write_segmentation_pack(
    dest: Path,
    model: SegmentationModel,
    *,
    lora: LoRASettings | None,
    decoder_width: int = 64,
    spacing_um_px: float = DEFAULT_WINDOW_SPACING_UM_PX,
    model_status: str = "trained",
    description: str = "",
    licence_note: str | None = None,
    training: dict | None = None,
    replace: bool = False,
) -> ModelPack:
    """Write ``model`` as a pack at ``dest`` (atomically; ``replace`` swaps an existing pack). ``lora`` None: a
    frozen backbone without adapter; ``decoder_width`` is the :class:`TokenDecoder`'s."""
    from hepatoquant.segmentation.pfmseg import PFMSegDecoder

    config = model.encoder.config
    if isinstance(model.decoder, PFMSegDecoder):
        decoder = {"kind": "pfmseg", "weights": _DECODER_FILE, "source_classes": list(model.decoder.source_classes)}
    else:
        decoder = {"kind": "token", "weights": _DECODER_FILE, "width": decoder_width}
    manifest = {
        "format_version": 1,
        "name": dest.name,
        "kind": "segmenter",
        "version": "1",
        "model_status": model_status,
        "description": description,
        "encoder": {"name": config.name, "weights": _ENCODER_FILE, "sha256": ""},  # filled in when written
        "decoder": decoder,
        "classes": list(SEG_CLASS_NAMES),
        "input_size_px": model.input_size_px,
        "spacing_um_px": spacing_um_px,
        "normalization": {"mean": list(config.mean), "std": list(config.std)},
        "licence_note": licence_note or config.licence_note,
        "created_by": f"hepatoquant {__version__}",
    }
    if lora is not None:
        manifest["adapter"] = {"path": _ADAPTER_DIR}
        manifest["lora"] = asdict(lora)
    if training is not None:
        manifest["training"] = training
    return write_pack(
        dest,
        manifest,
        {_ENCODER_FILE: model.base_state_dict, _DECODER_FILE: model.decoder.state_dict()},
        replace=replace,
        write_extra=(lambda folder: model.save_adapter(folder / _ADAPTER_DIR)) if lora is not None else None,
    )


def ensure_demo_segmentation_pack(models_dir: Path | None = None, *, encoder: str = "demo_vit_tiny") -> ModelPack:
    """The demo segmenter: small backbone, fixed-seed untrained LoRA and decoder. Its regions mean nothing."""
    dest = (models_dir or default_models_dir()) / DEMO_SEGMENTER_NAME
    if dest.is_dir():
        return load_model_pack(dest)
    lora, width = LoRASettings(), 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = build_segmentation_model(encoder, lora=lora, decoder_width=width)
        # peft starts LoRA's B matrices at zero (the adapter is a no-op until trained); the demo keeps that.
    return write_segmentation_pack(
        dest,
        model,
        lora=lora,
        decoder_width=width,
        model_status="untrained-demo",
        description="Demo segmenter: random fixed-seed weights so the pipeline runs anywhere. Its regions are meaningless.",
        licence_note="HepatoQuant demo weights; untrained, for trying the software only",
    )


def load_segmenter(pack: ModelPack, device: torch.device) -> SegmentationModel:
    """The pack's segmenter on ``device`` in eval mode, after checking the backbone is the adapter's own."""
    if pack.kind != "segmenter":
        raise ModelPackError(f"model pack {pack.name!r} is a {pack.kind} pack, not a segmenter pack")
    recorded = pack.manifest["encoder"]["sha256"]
    actual = weights_sha256(pack.encoder_weights)  # hashed once while the file is unchanged
    if actual != recorded:
        raise WeightsMismatchError(
            f"segmenter pack {str(pack.path)!r}: its LoRA adapter was trained on backbone weights with SHA-256 "
            f"{recorded[:12]}..., but {pack.encoder_weights.name} has {actual[:12]}...; the adapter only works on "
            "the backbone it was trained with: restore that file or retrain the segmenter on this backbone"
        )
    encoder_config(pack.encoder_name)  # a clear error for an unknown encoder name
    settings, decoder = pack.manifest.get("lora"), pack.manifest["decoder"]
    model = build_segmentation_model(
        pack.encoder_name,
        encoder_weights=pack.encoder_weights,
        lora=LoRASettings(rank=settings["rank"], alpha=settings["alpha"], dropout=settings["dropout"]) if settings else None,
        adapter_dir=pack.path / pack.manifest["adapter"]["path"] if settings else None,
        decoder_width=decoder.get("width", 64),
        pfmseg_classes=tuple(decoder["source_classes"]) if decoder.get("kind") == "pfmseg" else None,
    )
    model.input_size_px = pack.input_size_px
    try:
        model.decoder.load_state_dict(load_file(str(pack.path / pack.manifest["decoder"]["weights"])), strict=True)
    except (RuntimeError, OSError) as exc:
        raise WeightsMismatchError(f"segmenter pack {str(pack.path)!r}: decoder weights do not fit ({exc})") from exc
    model.requires_grad_(False)
    return model.to(device).eval()
