"""Training the segmenter: LoRA + decoder on image/mask pairs and on annotated slides.

Only the LoRA matrices and the decoder learn (their count and share are printed); cross-entropy with an
ignore label, AdamW or SGD, cosine schedule with linear warm-up, gradient accumulation, AMP on CUDA. After
every epoch the model is scored on the validation data (mean Dice over the classes present), the run's
checkpoint is saved (for ``--resume``), and the best model so far is written as a segmenter pack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from hepatoquant.atomic_write import write_file_atomic
from hepatoquant.classify import choose_device
from hepatoquant.errors import InvalidParameterError
from hepatoquant.model_pack import ModelPack, default_models_dir
from hepatoquant.regions import DEFAULT_TUMOUR_CLASS_NAMES
from hepatoquant.segmentation import IGNORE_INDEX, SEG_CLASS_NAMES
from hepatoquant.segmentation.data import (
    PairDataset,
    SlideWindowDataset,
    eval_transforms,
    load_pair_list,
    train_transforms,
)
from hepatoquant.segmentation.metrics import confusion_matrix, segmentation_scores
from hepatoquant.segmentation.model import LoRASettings, SegmentationModel, build_segmentation_model, parameter_counts
from hepatoquant.segmentation.pack import DEFAULT_WINDOW_SPACING_UM_PX, write_segmentation_pack

__all__ = ["TrainingConfig", "load_training_config", "train_segmenter", "TrainingResult"]

_CHECKPOINT = "checkpoint-last.pt"


@cache
def _schema() -> dict:
    return json.loads(resources.files("hepatoquant").joinpath("schemas/seg_train.schema.json").read_text())


@dataclass(frozen=True)
class TrainingConfig:
    """A validated training configuration; relative paths are resolved against the config file's folder."""

    raw: dict
    base_dir: Path

    def path(self, value: str | None) -> Path | None:
        return None if value is None else (self.base_dir / value)

    def get(self, section: str, key: str, default):
        return self.raw.get(section, {}).get(key, default)


def load_training_config(path: str | Path) -> TrainingConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        jsonschema.validate(raw, _schema())
    except FileNotFoundError:
        raise InvalidParameterError(f"training config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"training config {str(path)!r} is not valid JSON ({exc})") from exc
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise InvalidParameterError(
            f"training config {str(path)!r} at {where}: {exc.message}; see hepatoquant/schemas/seg_train.schema.json"
        ) from exc
    data = raw["data"]
    if not data.get("pairs") and not data.get("slides"):
        raise InvalidParameterError(f"training config {str(path)!r} names no data: give data.pairs and/or data.slides")
    return TrainingConfig(raw=raw, base_dir=path.resolve().parent)


@dataclass(frozen=True)
class TrainingResult:
    pack: ModelPack
    best_val_dice: float
    history: list[dict]
    trainable_parameters: int
    total_parameters: int


def _datasets(config: TrainingConfig, model: SegmentationModel) -> tuple[Dataset, Dataset]:
    encoder = model.encoder.config
    size, mean, std = encoder.input_size_px, encoder.mean, encoder.std
    train_parts: list[Dataset] = []
    val_parts: list[Dataset] = []
    data = config.raw["data"]
    if data.get("pairs"):
        splits = load_pair_list(config.path(data["pairs"]))
        if splits["train"]:
            train_parts.append(PairDataset(splits["train"], train_transforms(size, mean, std)))
        if splits["val"]:
            val_parts.append(PairDataset(splits["val"], eval_transforms(size, mean, std)))
    slides = data.get("slides") or []
    common = dict(
        input_size_px=size,
        window_spacing_um_px=data.get("window_spacing_um_px", DEFAULT_WINDOW_SPACING_UM_PX),
        rest_of_tissue=data.get("rest_of_tissue", "non_tumour"),
        tumour_class_names=tuple(data.get("tumour_class_names", DEFAULT_TUMOUR_CLASS_NAMES)),
    )
    seed = config.get("train", "seed", 0)
    for split, windows, transform, parts, offset in (
        ("train", data.get("windows_per_slide", 64), train_transforms(size, mean, std), train_parts, 0),
        ("val", data.get("val_windows_per_slide", 16), eval_transforms(size, mean, std), val_parts, 1000),
    ):
        chosen = [s for s in slides if s.get("split", "train") == split]
        if split == "val" and not chosen:
            chosen = [s for s in slides if s.get("split", "train") == "train"]  # other windows, same slides
        if chosen:
            entries = [(config.path(s["slide"]), config.path(s["annotations"]), s.get("mpp")) for s in chosen]
            parts.append(
                SlideWindowDataset(entries, windows_per_slide=windows, transform=transform, seed=seed + offset, **common)
            )
    if not train_parts:
        raise InvalidParameterError("the training config's data has no training items (empty train split, no slides)")
    if not val_parts:
        raise InvalidParameterError("the training config's data has no validation items: add a val split or slides")
    return ConcatDataset(train_parts), ConcatDataset(val_parts)


def _schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def evaluate_model(model: SegmentationModel, loader: DataLoader, device: torch.device) -> dict:
    """Pixel scores of ``model`` on a loader of (image, mask) batches."""
    confusion = np.zeros((len(SEG_CLASS_NAMES),) * 2, dtype=np.int64)
    model.eval()
    with torch.inference_mode():
        for images, masks in loader:
            predicted = model(images.to(device)).argmax(dim=1).cpu().numpy()
            confusion += confusion_matrix(masks.numpy(), predicted, len(SEG_CLASS_NAMES), ignore_index=IGNORE_INDEX)
    return segmentation_scores(confusion, SEG_CLASS_NAMES)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def train_segmenter(
    config: TrainingConfig, *, resume: bool = False, log: Callable[[str], None] = print
) -> TrainingResult:
    """Train as configured; returns the best pack (by validation mean Dice) and the per-epoch history."""
    train_cfg = config.raw.get("train", {})
    seed = train_cfg.get("seed", 0)
    torch.manual_seed(seed)
    lora_raw = config.raw.get("lora", {})
    lora = LoRASettings(**{k: lora_raw[k] for k in ("rank", "alpha", "dropout") if k in lora_raw})
    decoder_width = config.raw.get("decoder_width", 64)
    model = build_segmentation_model(
        config.raw["encoder"], encoder_weights=config.path(config.raw.get("encoder_weights")), lora=lora,
        decoder_width=decoder_width,
    )
    device = choose_device(train_cfg.get("device", "auto"))
    model.to(device)
    trainable, total = parameter_counts(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%: LoRA + decoder)")

    train_set, val_set = _datasets(config, model)
    batch_size = train_cfg.get("batch_size", 8)
    workers = train_cfg.get("num_workers", 0)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator,
                              drop_last=len(train_set) > batch_size)
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=workers)

    parameters = [p for p in model.parameters() if p.requires_grad]
    lr, weight_decay = train_cfg.get("lr", 1e-3), train_cfg.get("weight_decay", 1e-4)
    if train_cfg.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    epochs = train_cfg.get("epochs", 10)
    accumulation = train_cfg.get("grad_accum_steps", 1)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / accumulation))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(train_cfg.get("warmup_steps", 0), epochs * steps_per_epoch)
    )
    use_amp = device.type == "cuda" and train_cfg.get("amp", True)
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    run_dir = config.path(config.raw["output"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    models_dir = config.path(config.raw["output"].get("models_dir")) or default_models_dir()
    pack_dest = models_dir / config.raw["output"]["pack_name"]
    if pack_dest.exists() and not resume:
        raise InvalidParameterError(
            f"segmenter pack {str(pack_dest)!r} already exists; a new run would replace it with its first epoch's "
            "model: choose another output.pack_name, remove the pack, or continue its run with --resume"
        )
    start_epoch, best_dice, history = 0, -1.0, []
    if resume:
        checkpoint_path = run_dir / _CHECKPOINT
        if not checkpoint_path.is_file():
            raise InvalidParameterError(f"--resume: no checkpoint {str(checkpoint_path)!r} to resume from")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_dice, history = state["epoch"], state["best_dice"], json.loads(state["history"])
        log(f"resumed after epoch {start_epoch} (best validation Dice {best_dice:.4f})")

    pack = None
    for epoch in range(start_epoch, epochs):
        model.train()
        losses = []
        optimizer.zero_grad(set_to_none=True)
        for step, (images, masks) in enumerate(train_loader):
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(model(images.to(device)).float(), masks.to(device)) / accumulation
            scaler.scale(loss).backward()
            if (step + 1) % accumulation == 0 or step + 1 == len(train_loader):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            losses.append(loss.item() * accumulation)
        scores = evaluate_model(model, val_loader, device)
        dice = scores["mean"]["dice"] or 0.0
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_mean_dice": dice,
                  "val_dice": {c: scores["classes"][c]["dice"] for c in SEG_CLASS_NAMES}, "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        log(f"epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f}, validation mean Dice {dice:.4f}")
        if dice > best_dice:
            best_dice = dice
            pack = write_segmentation_pack(
                pack_dest, model, lora=lora, decoder_width=decoder_width,
                spacing_um_px=config.raw["data"].get("window_spacing_um_px", DEFAULT_WINDOW_SPACING_UM_PX),
                description=f"LoRA segmenter on {config.raw['encoder']}",
                training={"best_val_mean_dice": dice, "epoch": epoch + 1, "config": config.raw},
                replace=True,
            )
            log(f"  best so far: wrote segmenter pack {pack.path}")
        checkpoint = {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_dice": best_dice,
                      "history": json.dumps(history)}
        # atomic: a crash never leaves half a checkpoint
        write_file_atomic(run_dir / _CHECKPOINT, lambda handle: torch.save(checkpoint, handle), what="training checkpoint")
    (run_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    if pack is None:  # resumed after the last epoch
        from hepatoquant.model_pack import load_model_pack

        pack = load_model_pack(pack_dest)
    return TrainingResult(pack, best_dice, history, trainable, total)
