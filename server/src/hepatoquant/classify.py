"""Patch classification: a frozen encoder and one linear layer give seven class probabilities per tile.

The classifier takes uint8 RGB batches straight from the tile reader and does the model's own normalisation
on the device, so the reader never builds float copies. Inference runs under ``torch.inference_mode`` at the
precision policy's choice (:mod:`hepatoquant.precision`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from hepatoquant.encoders import Encoder, create_encoder
from hepatoquant.errors import InvalidParameterError, ModelPackError, WeightsMismatchError
from hepatoquant.model_pack import ModelPack, load_head_weights

__all__ = [
    "PatchClassifier",
    "load_classifier",
    "choose_device",
    "predict_batches",
    "BatchPrediction",
    "normalisation_buffers",
    "normalise_uint8_nhwc",
    "one_behind",
    "tiles_to_device",
]

T, L, R = TypeVar("T"), TypeVar("L"), TypeVar("R")


def normalisation_buffers(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors scaled to 0-255 pixel values, for :func:`normalise_uint8_nhwc`."""
    return torch.tensor(mean).view(1, 3, 1, 1) * 255.0, torch.tensor(std).view(1, 3, 1, 1) * 255.0


def normalise_uint8_nhwc(tiles: torch.Tensor, mean_255: torch.Tensor, std_255: torch.Tensor) -> torch.Tensor:
    """uint8 (batch, height, width, 3) straight from the reader → normalised float (batch, 3, height, width)."""
    return (tiles.permute(0, 3, 1, 2).float() - mean_255) / std_255


class PatchClassifier(nn.Module):
    """Encoder + linear head over uint8 (batch, height, width, 3) tiles already at the input size."""

    def __init__(
        self,
        encoder: Encoder,
        head: nn.Linear,
        classes: tuple[str, ...],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classes = classes
        mean_255, std_255 = normalisation_buffers(mean, std)
        self.register_buffer("mean", mean_255, persistent=False)
        self.register_buffer("std", std_255, persistent=False)

    def forward(self, tiles_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (batch, classes) and embeddings (batch, dim)."""
        pixels = normalise_uint8_nhwc(tiles_uint8_nhwc, self.mean, self.std)
        embeddings = self.encoder(pixels)
        return self.head(embeddings.float()), embeddings


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` otherwise, checked here."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidParameterError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameterError(f"--device {requested} was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidParameterError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    return device


def load_classifier(pack: ModelPack, device: torch.device) -> PatchClassifier:
    """The pack's encoder and head on ``device``, in eval mode, frozen."""
    if pack.kind != "classifier":
        raise ModelPackError(
            f"model pack {pack.name!r} is a {pack.kind} pack; `analyze` needs a classifier pack (encoder + head)"
        )
    encoder = create_encoder(pack.encoder_name, weights=pack.encoder_weights)
    head_state = load_head_weights(pack)
    head = nn.Linear(encoder.config.embedding_dim, len(pack.classes))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in head_state.items()}
    if given != expected:  # e.g. a manifest whose class list was edited
        raise WeightsMismatchError(
            f"model pack {str(pack.path)!r}: head file {pack.head_weights.name!r} holds {given}, but "
            f"{len(pack.classes)} classes and encoder {pack.encoder_name!r} need {expected}; "
            "make the manifest's classes match the head or recreate the pack"
        )
    head.load_state_dict(head_state, strict=True)
    model = PatchClassifier(encoder, head, pack.classes, pack.mean, pack.std).to(device).eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class BatchPrediction:
    """Probabilities (batch, classes) float32 and, if asked for, embeddings (batch, dim) float32."""

    start: int
    probabilities: np.ndarray
    embeddings: np.ndarray | None


def predict_batches(
    model: PatchClassifier,
    batches: Iterable,  # of objects with .start and .pixels (uint8 NHWC numpy)
    device: torch.device,
    *,
    keep_embeddings: bool = False,
    precision: str = "fp32",
) -> Iterator[BatchPrediction]:
    """Run the classifier over batches of tiles, yielding results in the same order, at ``precision`` (a resolved
    one: :func:`hepatoquant.precision.resolve_precision`); one batch behind (:func:`one_behind`)."""
    from hepatoquant.precision import autocast_for

    def launch(batch) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        logits, embeddings = model(tiles_to_device(batch.pixels, device))
        return batch.start, logits, embeddings if keep_embeddings else None

    def fetch(launched: tuple[int, torch.Tensor, torch.Tensor | None]) -> BatchPrediction:
        start, logits, embeddings = launched
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        kept = embeddings.float().cpu().numpy() if embeddings is not None else None
        return BatchPrediction(start, probabilities, kept)

    with torch.inference_mode(), autocast_for(device, precision):
        yield from one_behind(batches, launch, fetch)


def tiles_to_device(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC tiles on ``device``; to a GPU through page-locked memory (PyTorch's host cache keeps those
    blocks), which the copy needs to be asynchronous."""
    tiles = torch.from_numpy(pixels)
    if device.type == "cuda":
        tiles = tiles.pin_memory()
    return tiles.to(device, non_blocking=True)


def one_behind(items: Iterable[T], launch: Callable[[T], L], fetch: Callable[[L], R]) -> Iterator[R]:
    """``fetch(launch(item))`` for each item, in order, each fetched only once the next one is launched. A GPU
    runs kernels asynchronously: it then always has the next batch queued while this thread waits for results
    and for the readers, instead of idling through each batch's copy back, read and copy in."""
    in_flight: list[L] = []
    for item in items:
        in_flight.append(launch(item))
        if len(in_flight) == 2:
            yield fetch(in_flight.pop(0))
    if in_flight:
        yield fetch(in_flight.pop())
