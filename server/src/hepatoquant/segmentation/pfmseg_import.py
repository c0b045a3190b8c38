"""Import a PFM_Segmentation checkpoint as a HepatoQuant segmentation pack (``hepatoquant models import-pfmseg``).

Their trainer (github.com/lingxitong/PFM_Segmentation, ``utils/trainer.py``) saves a ``torch.save`` dict whose
``model_state_dict`` holds, by fine-tuning mode:

- ``lora``: the LoRA tensors of every attention block, ``pfm.blocks.{i}.attn.{qkv,proj}.lora_{a,b}``, plus the
  ``decoder.*`` and ``segmentation_head.*`` state (BatchNorm buffers included); the frozen backbone is the
  foundation model's own checkpoint. Their first trainer saved the whole model instead (backbone tensors too):
  those backbone tensors must equal the given backbone weights, and are checked against them.
- ``frozen``: ``decoder.*`` and ``segmentation_head.*`` only (no adapter).
- ``full``: every backbone tensor fine-tuned: refused (HepatoQuant packs keep the foundation model frozen). A
  whole-model file of their first trainer in frozen mode is told apart by its recorded ``finetune_mode``.

Their LoRA layer (``LoRALinear`` in ``models/lora.py``) computes ``linear(x) + ((x @ lora_a) @ lora_b) * scale``
with ``lora_a`` [in, r] and ``lora_b`` [r, out]. Their code sets ``self.scale = lora_alpha`` (commits ca80211 and
f83b1e9 of ``models/lora.py``), so that is the default: ``scale`` is the config's ``model.finetune_mode.alpha``. A
checkpoint does not record the formula; a copy of ``models/lora.py`` that sets ``self.scale = lora_alpha / r``
instead (commit 4bf40a9 has that line; so may a fork) needs ``lora_scaling="alpha/r"``. A config that names its
scaling (``model.finetune_mode.lora_scaling`` or ``.scaling``, or ``model.lora_scaling``: ``alpha`` or
``alpha/r``) is followed; an explicit ``lora_scaling`` wins over both. peft computes
``base(x) + lora_B(lora_A(x)) * lora_alpha / r`` with ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]: the
tensors are transposed and peft's alpha is ``scale * r``. Every tensor of the checkpoint is used exactly once;
anything missing, unexpected or of the wrong shape is an error naming the key (a lacking LoRA tensor is named as
such; LoRA of other shapes or on other blocks means another backbone). Only tensors and plain data are unpickled: a
file in neither of ``torch.save``'s formats, a truncated one or one holding pickled code is refused in our words,
never with torch's advice to load it with ``weights_only=False``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hepatoquant.encoders import encoder_config
from hepatoquant.errors import InvalidParameterError, WeightsMismatchError, WeightsNotFoundError
from hepatoquant.model_pack import ModelPack, file_sha256, new_pack_destination
from hepatoquant.segmentation.model import LoRASettings, SegmentationModel, build_segmentation_model
from hepatoquant.segmentation.pfmseg import check_source_classes

__all__ = ["LORA_SCALINGS", "PFM_NAMES", "import_pfmseg"]

# Their ``model.pfm_name`` for the registry's encoders (a checkpoint's config naming another one is refused).
PFM_NAMES = {"uni": "uni_v1", "virchow2": "virchow_v2", "gigapath": "gigapath", "uni2_h": "uni_v2",
             "virchow": "virchow_v1", "phikon": "phikon", "phikon_v2": "phikon_v2", "hoptimus0": "hoptimus_0",
             "hoptimus1": "hoptimus_1", "conch_v15": "conch_v1_5",
             "lunit_vits8": "lunit_vits8"}
LORA_SCALINGS = ("alpha", "alpha/r")
_LORA_KEY = re.compile(r"^pfm\.(?P<module>.+)\.(?P<which>lora_a|lora_b)$")


@dataclass(frozen=True)
class _Checkpoint:
    tensors: dict[str, torch.Tensor]
    finetune_mode: str | None  # as the file says, if it says
    config_model: dict  # their config's "model" section, if stored


def import_pfmseg(
    checkpoint: str | Path,
    *,
    backbone: str,
    backbone_weights: str | Path,
    classes: tuple[str, ...],
    name: str,
    spacing_um_px: float,
    input_size_px: int | None = None,
    lora_scaling: str | None = None,
    lora_alpha: float | None = None,
    models_dir: Path | None = None,
    overwrite: bool = False,
) -> ModelPack:
    """Convert ``checkpoint`` (trained on ``backbone`` with ``backbone_weights``) into the segmenter pack ``name``.

    ``classes`` names the checkpoint's output channels in order (background, non_tumour, tumour); windows are
    read at ``spacing_um_px`` and ``input_size_px`` (default: the encoder's), which must be a multiple of the
    patch size. The LoRA scale is ``lora_alpha`` (default: the config's ``model.finetune_mode.alpha``) times 1 for
    ``lora_scaling="alpha"`` (their ``self.scale = lora_alpha``) or 1 / r for ``"alpha/r"`` (a copy of their
    ``models/lora.py`` that divides by the rank); ``lora_scaling`` defaults to what the checkpoint's config says, if
    it says, else ``"alpha"``.
    """
    from hepatoquant.segmentation.pack import write_segmentation_pack

    dest = new_pack_destination(name, models_dir, overwrite)
    config = encoder_config(backbone)
    if input_size_px is None:
        input_size_px = config.input_size_px
    if input_size_px < config.patch_size_px or input_size_px % config.patch_size_px:
        raise InvalidParameterError(
            f"input size {input_size_px} px is not a multiple of {backbone}'s patch size {config.patch_size_px} px; "
            f"PFM_Segmentation's decoder needs whole patches: use e.g. {config.input_size_px}"
        )
    if not 0.1 <= spacing_um_px <= 32:
        raise InvalidParameterError(f"window spacing {spacing_um_px} um/px is outside 0.1..32 um/px")
    check_source_classes(classes)
    if lora_scaling is not None and lora_scaling not in LORA_SCALINGS:
        raise InvalidParameterError(
            f"LoRA scaling {lora_scaling!r} is not one of {', '.join(LORA_SCALINGS)}: alpha if their models/lora.py "
            "has self.scale = lora_alpha (their code), alpha/r if it has self.scale = lora_alpha / r"
        )
    source = _read_checkpoint(Path(checkpoint))
    _check_backbone_name(source, backbone, Path(checkpoint))
    head = source.tensors.get("segmentation_head.0.weight")
    if head is not None and head.shape[0] != len(classes):
        raise InvalidParameterError(
            f"checkpoint {str(checkpoint)!r} has {head.shape[0]} output classes but --classes names {len(classes)}; "
            "name each output channel in order"
        )
    lora_tensors = {k: v for k, v in source.tensors.items() if _LORA_KEY.match(k)}
    backbone_tensors = {k: v for k, v in source.tensors.items() if k.startswith("pfm.") and k not in lora_tensors}
    mode = _finetune_mode(source, lora_tensors, backbone_tensors, Path(checkpoint))

    settings, scaling = None, None
    if mode == "lora":
        rank = _lora_rank(lora_tensors, Path(checkpoint))
        scaling = _lora_scaling(source, lora_scaling, Path(checkpoint))
        scale = _lora_scale(source, rank, scaling[0], lora_alpha, Path(checkpoint))
        settings = LoRASettings(rank=rank, alpha=scale * rank, dropout=0.0)
    model = build_segmentation_model(backbone, encoder_weights=backbone_weights, lora=settings, pfmseg_classes=classes)
    model.input_size_px = input_size_px
    if not getattr(model.encoder.backbone, "dynamic_img_size", False) and input_size_px != config.input_size_px:
        raise InvalidParameterError(
            f"encoder {backbone!r} takes {config.input_size_px} px inputs only; use --input-size {config.input_size_px}"
        )
    used: set[str] = set()
    if mode == "lora":
        used |= _load_lora(model, lora_tensors, Path(checkpoint))
    used |= _check_backbone_copy(model, backbone_tensors, Path(checkpoint), Path(backbone_weights))
    used |= _load_decoder(model, source.tensors, Path(checkpoint))
    unused = sorted(set(source.tensors) - used)
    if unused:
        raise WeightsMismatchError(
            f"checkpoint {str(checkpoint)!r} holds {len(unused)} tensor(s) that a PFM_Segmentation {mode} model with a "
            f"DecoderCup does not have (e.g. {', '.join(unused[:3])}); it may come from another fine-tuning mode "
            "(dora, cnn_adapter, transformer_adapter are not supported) or another model"
        )
    record = {
        "imported_from": {
            "format": "PFM_Segmentation", "checkpoint": Path(checkpoint).name,
            "checkpoint_sha256": file_sha256(Path(checkpoint)), "finetune_mode": mode,
            "lora_scale": None if settings is None else settings.alpha / settings.rank,
            "lora_scaling": None if scaling is None else scaling[0],
            "lora_scaling_from": None if scaling is None else scaling[1],
            "source_classes": list(classes), "pfm_name": source.config_model.get("pfm_name"),
        }
    }
    return write_segmentation_pack(
        dest, model, lora=settings, spacing_um_px=spacing_um_px, model_status="trained",
        description=f"PFM_Segmentation {mode} segmenter on {config.description}; from {Path(checkpoint).name}",
        training=record, replace=overwrite,
    )


def _read_checkpoint(path: Path) -> _Checkpoint:
    """The state dict and what the file says about itself; only tensors and plain data are unpickled."""
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint {str(path)!r} does not exist; give the .pth file PFM_Segmentation saved")
    if path.suffix == ".safetensors":
        from hepatoquant.encoders import load_state_dict_file

        return _Checkpoint(_strip_module_prefix(load_state_dict_file(path)), None, {})
    _check_torch_file(path)
    try:
        raw = _torch_load_plain(path)
    except Exception as exc:  # torch raises many types for a damaged file; its text suggests unsafe loading
        raise WeightsMismatchError(f"checkpoint {str(path)!r} {_load_failure(exc)}; {_GIVE_THEIR_FILE}") from None
    if not isinstance(raw, dict):
        raise WeightsMismatchError(f"checkpoint {str(path)!r} does not hold a dictionary of tensors")
    if "lora_dora_state_dict" in raw:
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} is the LoRA half of an older PFM_Segmentation checkpoint pair (its decoder is "
            "in best_decoder_head.pth, without BatchNorm statistics); that pair cannot be imported: retrain with the "
            "current PFM_Segmentation code, which saves best_lora_and_decoder_head.pth"
        )
    state = raw
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(raw.get(key), dict):
            state = raw[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} has no state dict of tensors (keys: {', '.join(map(str, list(raw)[:6]))})"
        )
    config = raw.get("config")
    model_config = config.get("model", {}) if isinstance(config, dict) else {}
    mode = raw.get("finetune_mode")
    if mode is None and isinstance(model_config.get("finetune_mode"), dict):
        mode = model_config["finetune_mode"].get("type")
    return _Checkpoint(_strip_module_prefix(state), mode if isinstance(mode, str) else None, model_config)


_GIVE_THEIR_FILE = ("give the .pth file that PFM_Segmentation's trainer saved (best_lora_and_decoder_head.pth or "
                    "best_decoder_head.pth), as it wrote it")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
# The older format starts with the pickled magic number 0x1950a86a20f9469cfc6c (here at pickle protocol 2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _check_torch_file(path: Path) -> None:
    """Refuse, before unpickling anything, a file that is not in either of torch.save's formats or whose zip
    archive ends early (a truncated download or copy)."""
    import zipfile

    with path.open("rb") as file:
        head = file.read(len(_LEGACY_MAGIC))
    if not head:
        raise WeightsMismatchError(f"checkpoint {str(path)!r} is empty, not a PyTorch checkpoint of PFM_Segmentation; "
                                   f"{_GIVE_THEIR_FILE}")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise WeightsMismatchError(
                f"checkpoint {str(path)!r} is not a complete PyTorch checkpoint of PFM_Segmentation: it is truncated "
                f"(its zip archive ends after {path.stat().st_size} bytes, before its directory); copy it again "
                "from where PFM_Segmentation saved it"
            )
        return
    if not (head[:1] == _LEGACY_MAGIC[:1] and head[2:] == _LEGACY_MAGIC[2:]):  # any pickle protocol
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint of PFM_Segmentation (it is in neither of "
            f"torch.save's formats); {_GIVE_THEIR_FILE}"
        )


def _load_failure(exc: Exception) -> str:
    """What went wrong, in our words: torch's own messages recommend unpickling with weights_only=False, which runs
    whatever code the file names, and that is never done here."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"is not a PyTorch checkpoint of PFM_Segmentation's trainer: it holds Python objects{what} besides "
                "tensors and plain data (e.g. a whole pickled model), and HepatoQuant never unpickles code")
    if "central directory" in text or "failed finding" in text or isinstance(exc, EOFError):
        return "is not a complete PyTorch checkpoint of PFM_Segmentation: it is truncated or damaged"
    return (f"is not a PyTorch checkpoint of PFM_Segmentation: torch cannot read it ({type(exc).__name__}); it may be "
            "damaged or another kind of file")


def _torch_load_plain(path: Path):
    """``torch.load(weights_only=True)``, also allowing the NumPy scalars their trainer's metrics may hold."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - retried once with NumPy scalars allowed, then reported
        import numpy as np

        try:
            scalar = np._core.multiarray.scalar  # NumPy 2
        except AttributeError:  # pragma: no cover - NumPy 1
            scalar = np.core.multiarray.scalar
        allowed = [scalar, np.dtype, *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32))]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise first from None


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved from DistributedDataParallel carry ``module.`` on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _check_backbone_name(source: _Checkpoint, backbone: str, path: Path) -> None:
    from hepatoquant.encoders import list_encoders

    recorded = source.config_model.get("pfm_name")
    expected = PFM_NAMES.get(backbone, backbone)  # the small registry encoders go by their own names
    if recorded and recorded != expected:
        ours = {v: k for k, v in PFM_NAMES.items()}.get(recorded) or (recorded if recorded in list_encoders() else None)
        hint = f"use --backbone {ours} with its weights" if ours else "HepatoQuant has no registry encoder for it"
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} was trained on {recorded!r} (its config's model.pfm_name), not on {backbone!r} "
            f"({expected!r}): {hint}"
        )


def _finetune_mode(source: _Checkpoint, lora: dict, backbone: dict, path: Path) -> str:
    if source.finetune_mode in ("dora", "cnn_adapter", "transformer_adapter"):
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} was trained in PFM_Segmentation's {source.finetune_mode!r} mode; only lora and "
            "frozen checkpoints can be imported"
        )
    if backbone and not lora and source.finetune_mode != "frozen":
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} is a full fine-tune (it holds {len(backbone)} backbone tensors such as "
            f"{sorted(backbone)[0]} and no LoRA tensors): HepatoQuant segmenters keep the foundation model's own "
            "weights frozen. Retrain with finetune_mode type lora (or frozen) to import it"
        )
    mode = "lora" if lora else "frozen"
    if source.finetune_mode in ("lora", "frozen", "full") and source.finetune_mode != mode:
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} says finetune_mode {source.finetune_mode!r} but its tensors are those of a "
            f"{mode} model; the file is damaged or was edited"
        )
    return mode


def _lora_rank(lora: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {tuple(v.shape)[1] if k.endswith("lora_a") else tuple(v.shape)[0] for k, v in lora.items() if v.ndim == 2}
    if len(ranks) != 1 or any(v.ndim != 2 for v in lora.values()):
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r}: LoRA tensors of different ranks ({sorted(ranks)}); every lora_a must be "
            "[in, r] and every lora_b [r, out] with one r"
        )
    return ranks.pop()


# Where a config may name its LoRA formula (their code writes none of these; a fork may): key path -> value.
_SCALING_KEYS = (("finetune_mode", "lora_scaling"), ("finetune_mode", "scaling"), ("lora_scaling",))
_SCALING_SPELLINGS = {"alpha": "alpha", "lora_alpha": "alpha", "alpha/r": "alpha/r", "lora_alpha/r": "alpha/r",
                      "alpha/rank": "alpha/r", "lora_alpha/rank": "alpha/r"}


def _lora_scaling(source: _Checkpoint, scaling: str | None, path: Path) -> tuple[str, str]:
    """(``alpha`` or ``alpha/r``, where it came from): the caller's, else the checkpoint config's, else their code's."""
    if scaling is not None:
        return scaling, "argument"
    for keys in _SCALING_KEYS:
        value = source.config_model
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        recorded = _SCALING_SPELLINGS.get(str(value).replace(" ", "").lower())
        if recorded is None:
            raise WeightsMismatchError(
                f"checkpoint {str(path)!r}: its config's model.{'.'.join(keys)} is {value!r}, not a LoRA scaling "
                f"HepatoQuant knows ({', '.join(LORA_SCALINGS)}); pass --lora-scaling alpha (self.scale = lora_alpha) "
                "or alpha/r (self.scale = lora_alpha / r), as the models/lora.py it was trained with computes"
            )
        return recorded, f"checkpoint config model.{'.'.join(keys)}"
    return "alpha", "default (PFM_Segmentation's models/lora.py: self.scale = lora_alpha)"


def _lora_scale(source: _Checkpoint, rank: int, scaling: str, alpha: float | None, path: Path) -> float:
    configured = source.config_model.get("finetune_mode")
    if alpha is None and isinstance(configured, dict) and isinstance(configured.get("alpha"), (int, float)):
        alpha = float(configured["alpha"])
    if alpha is None or alpha <= 0:
        raise InvalidParameterError(
            f"checkpoint {str(path)!r} does not record its LoRA alpha; pass --lora-alpha (model.finetune_mode.alpha "
            "of the config it was trained with)"
        )
    return alpha if scaling == "alpha" else alpha / rank


def _load_lora(model: SegmentationModel, lora: dict[str, torch.Tensor], path: Path) -> set[str]:
    """Their lora_a / lora_b, transposed, into peft's lora_A / lora_B of the same attention layers.

    LoRA on layers or blocks the backbone does not have, or of other shapes, means another backbone; a layer of the
    backbone with one of its two tensors (or both) absent, in a checkpoint that otherwise fits, means an incomplete
    file, and the error names the absent tensors."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in model.encoder.backbone.named_modules() if isinstance(module, LoraLayer)}
    needed: dict[str, torch.Tensor] = {}  # their key -> peft's weight
    for name, layer in layers.items():
        needed[f"pfm.{name}.lora_a"] = layer.lora_A["default"].weight
        needed[f"pfm.{name}.lora_b"] = layer.lora_B["default"].weight
    missing, unexpected = sorted(set(needed) - set(lora)), sorted(set(lora) - set(needed))
    wrong = sorted(k for k in set(needed) & set(lora) if tuple(lora[k].shape[::-1]) != tuple(needed[k].shape))

    def block(key: str) -> str:  # blocks.{i}
        module = _LORA_KEY.match(key).group("module")
        found = re.match(r"(.*?\bblocks\.\d+)\.", module)
        return found.group(1) if found else module

    theirs, ours = {block(k) for k in lora}, {block(k) for k in needed}
    if unexpected or wrong or theirs != ours:
        if wrong:
            needs = tuple(needed[wrong[0]].shape[::-1])
            detail = f": {wrong[0]} is {tuple(lora[wrong[0]].shape)}, the backbone's layer needs {needs}"
        elif unexpected:
            detail = f": unexpected {', '.join(unexpected[:3])}"
        else:
            detail = f": no LoRA on {', '.join(sorted(ours - theirs)[:3])}" if ours - theirs else ""
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} has LoRA on {len(theirs)} attention block(s); the backbone has {len(ours)}"
            f"{detail}; it was trained on another backbone"
        )
    if missing:
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} is missing LoRA tensor(s) {', '.join(missing[:6])}"
            f"{f' and {len(missing) - 6} more' if len(missing) > 6 else ''} ({len(missing)} of the {len(needed)} that "
            f"the backbone's {len(layers)} LoRA layers need, a lora_a and a lora_b each); the file is incomplete or "
            "was edited: give the checkpoint their trainer saved"
        )
    with torch.no_grad():
        for key, weight in needed.items():
            weight.copy_(lora[key].t())
    return set(needed)


def _check_backbone_copy(model: SegmentationModel, tensors: dict[str, torch.Tensor], path: Path,
                         weights: Path) -> set[str]:
    """Whole-model checkpoints (their first trainer) repeat the frozen backbone: it must be exactly ours."""
    for key, tensor in tensors.items():
        ours = model.base_state_dict.get(key.removeprefix("pfm."))
        if ours is None:
            raise WeightsMismatchError(f"checkpoint {str(path)!r}: {key} is not a tensor of the backbone")
        if tuple(ours.shape) != tuple(tensor.shape) or not torch.equal(ours.to(tensor.dtype), tensor):
            raise WeightsMismatchError(
                f"checkpoint {str(path)!r}: its backbone tensor {key} differs from {str(weights)!r}; give the backbone "
                "weights this segmenter was trained on"
            )
    return set(tensors)


def _load_decoder(model: SegmentationModel, tensors: dict[str, torch.Tensor], path: Path) -> set[str]:
    given = {k: v for k, v in tensors.items() if k.startswith(("decoder.", "segmentation_head."))}
    expected = {k: tuple(v.shape) for k, v in model.decoder.state_dict().items()}
    missing = sorted(set(expected) - set(given))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(given[k].shape) != expected[k])
    if missing or wrong:
        detail = f"missing {', '.join(missing[:3])}" if missing else (
            f"{wrong[0]} is {tuple(given[wrong[0]].shape)}, the decoder needs {expected[wrong[0]]}")
        raise WeightsMismatchError(
            f"checkpoint {str(path)!r} does not hold PFM_Segmentation's DecoderCup for this backbone: {detail}"
            + ("; BatchNorm statistics are missing: files from their older trainer lack them" if any(
                k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing) else "")
        )
    model.decoder.load_state_dict({k: given[k] for k in expected}, strict=True)
    return set(expected)
