"""Whole-slide segmentation: overlapping windows, blended logits, a low-resolution map, a label mask.

Windows of the model's input size are read at the pack's resolution (about 2 um/px) with the parallel tile
reader, only where the tissue mask has tissue. Each window's logits are shrunk to the map's resolution
(default 8 um/px, the tissue mask's) and added with a smooth weight that falls towards the window's edges,
so overlaps blend without seams. Memory is the map's: (classes + 1) float32 values per map pixel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hepatoquant.classify import normalisation_buffers, normalise_uint8_nhwc, one_behind, tiles_to_device
from hepatoquant.errors import InvalidParameterError
from hepatoquant.precision import autocast_for
from hepatoquant.segmentation import BACKGROUND
from hepatoquant.segmentation.model import SegmentationModel
from hepatoquant.tile_reader import iter_tile_batches
from hepatoquant.tiling import TileGrid, TileSpec, tissue_fraction_grid
from hepatoquant.tissue import TissueMask

__all__ = ["SlidingWindowParams", "SegmentationMap", "WindowSegmenter", "window_grid", "segment_slide", "blend_weights"]


@dataclass(frozen=True)
class SlidingWindowParams:
    """Window resolution (None: the pack's), overlap fraction, stitched map resolution, batching."""

    spacing_um_px: float | None = None
    overlap: float = 0.25
    map_spacing_um_px: float = 8.0
    batch_size: int = 8
    num_workers: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 0.9:
            raise InvalidParameterError(f"window overlap {self.overlap} is outside 0..0.9")
        if self.spacing_um_px is not None and not 0.25 <= self.spacing_um_px <= 32:
            raise InvalidParameterError(f"window spacing {self.spacing_um_px} um/px is outside 0.25..32 um/px")
        if not 1.0 <= self.map_spacing_um_px <= 64:
            raise InvalidParameterError(f"map spacing {self.map_spacing_um_px} um/px is outside 1..64 um/px")


@dataclass(frozen=True)
class SegmentationMap:
    """Stitched class probabilities (classes, height, width) and labels at ``spacing_um_px``.

    Map pixel (i, j) covers level-0 [j * downsample, (j + 1) * downsample) in x, likewise in y.
    """

    probabilities: np.ndarray
    mask: np.ndarray
    downsample: float
    spacing_um_px: float
    windows_total: int
    windows_run: int
    precision: str = "fp32"  # the resolved precision the windows ran at (hepatoquant.precision)
    backend: str = "torch"  # what ran them: torch, or openvino (hepatoquant.inference_backend)


class WindowSegmenter(nn.Module):
    """uint8 NHWC windows, as the tile reader gives them -> per-pixel logits (B, classes, H, W): the pack's
    normalisation and the segmenter as one module. PyTorch runs it in :func:`segment_slide`; OpenVINO converts it
    whole (:func:`hepatoquant.inference_backend.load_openvino_segmenter`), so both take the same input."""

    def __init__(self, model: SegmentationModel, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.model = model
        mean_255, std_255 = normalisation_buffers(mean, std)
        self.register_buffer("mean_255", mean_255.to(next(model.parameters()).device), persistent=False)
        self.register_buffer("std_255", std_255.to(next(model.parameters()).device), persistent=False)
        self.classes = model.classes
        self.input_size_px = model.input_size_px
        self.patch_size_px = model.patch_size_px

    def forward(self, windows_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        return self.model(normalise_uint8_nhwc(windows_uint8_nhwc, self.mean_255, self.std_255))


def window_grid(
    slide_size_px: tuple[int, int], slide_mpp_um_px: float, window_size_level0_px: float, overlap: float,
    tissue: TissueMask,
) -> tuple[TileGrid, int]:
    """Overlapping windows covering the slide (the last row/column flush with its edge), those with tissue.

    Returns the windows to run and the number of windows the slide has in all.
    """
    stride = window_size_level0_px * (1.0 - overlap)

    def starts(length: int) -> np.ndarray:
        if length <= window_size_level0_px:
            return np.zeros(1)
        count = math.ceil((length - window_size_level0_px) / stride) + 1
        return np.minimum(np.arange(count) * stride, length - window_size_level0_px)

    xs, ys = starts(slide_size_px[0]), starts(slide_size_px[1])
    fraction = tissue_fraction_grid(tissue, xs, ys, window_size_level0_px)
    rows, cols = np.nonzero(fraction > 0)
    spec = TileSpec(tile_size_px=max(16, min(4096, round(window_size_level0_px))), spacing_um_px=slide_mpp_um_px,
                    min_tissue_fraction=0.0)
    return TileGrid(xs[cols], ys[rows], window_size_level0_px, fraction[rows, cols], spec), xs.size * ys.size


def blend_weights(size_px: int) -> np.ndarray:
    """Square weights, 1 in the middle falling smoothly (raised cosine) to 0.1 at the border."""
    ramp = 0.1 + 0.9 * np.sin(np.pi * (np.arange(size_px) + 0.5) / size_px)
    return np.outer(ramp, ramp).astype(np.float32)


def segment_slide(
    slide_path: str | Path,
    slide_size_px: tuple[int, int],
    slide_mpp_um_px: float,
    tissue: TissueMask,
    model,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    window_spacing_um_px: float,
    params: SlidingWindowParams = SlidingWindowParams(),
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    readers: str = "threads",
) -> SegmentationMap:
    """Segment a slide into background / non-tumour / tumour at ``params.map_spacing_um_px``.

    ``model``: a :class:`SegmentationModel`, run here with the pack's ``mean`` and ``std`` under autocast at the
    resolved ``precision`` (:func:`hepatoquant.precision.resolve_precision`); or one that takes the reader's uint8
    windows itself, normalisation included (a :class:`WindowSegmenter`, or OpenVINO's compiled copy of one, whose
    precision is then the one it was compiled at).
    """
    if isinstance(model, SegmentationModel):
        model = WindowSegmenter(model, mean, std)
    window_px = model.input_size_px
    if window_px % model.patch_size_px:
        raise InvalidParameterError(
            f"window size {window_px} px is not a multiple of the patch size {model.patch_size_px} px"
        )
    if window_spacing_um_px < slide_mpp_um_px * 0.99:
        raise InvalidParameterError(
            f"segmentation windows at {window_spacing_um_px} um/px need a slide at least that fine; this slide is "
            f"{slide_mpp_um_px} um/px"
        )
    map_spacing = max(params.map_spacing_um_px, window_spacing_um_px)
    map_downsample = map_spacing / slide_mpp_um_px  # level-0 px per map px
    map_w = math.ceil(slide_size_px[0] / map_downsample)
    map_h = math.ceil(slide_size_px[1] / map_downsample)
    window_level0 = window_px * window_spacing_um_px / slide_mpp_um_px
    window_map_px = max(1, round(window_level0 / map_downsample))
    grid, windows_total = window_grid(slide_size_px, slide_mpp_um_px, window_level0, params.overlap, tissue)

    num_classes = len(model.classes)
    logit_sum = np.zeros((num_classes, map_h, map_w), dtype=np.float32)
    weight_sum = np.zeros((map_h, map_w), dtype=np.float32)
    weights = blend_weights(window_map_px)
    done = 0
    batches = iter_tile_batches(
        slide_path, grid, out_size_px=window_px, batch_size=params.batch_size, num_workers=params.num_workers,
        readers=readers,
    )

    def launch(batch):
        return batch, model(tiles_to_device(batch.pixels, device))

    def fetch(launched) -> tuple:
        batch, logits = launched
        return batch, F.interpolate(logits.float(), size=(window_map_px, window_map_px), mode="area").cpu().numpy()

    with contextlib.closing(batches), torch.inference_mode(), autocast_for(device, precision):
        for batch, small in one_behind(batches, launch, fetch):  # a GPU has the next windows queued meanwhile
            for offset, window_logits in enumerate(small):
                index = batch.start + offset
                x0 = round(grid.x_level0_px[index] / map_downsample)
                y0 = round(grid.y_level0_px[index] / map_downsample)
                x1, y1 = min(x0 + window_map_px, map_w), min(y0 + window_map_px, map_h)
                w = weights[: y1 - y0, : x1 - x0]
                logit_sum[:, y0:y1, x0:x1] += window_logits[:, : y1 - y0, : x1 - x0] * w
                weight_sum[y0:y1, x0:x1] += w
            done += len(batch)
            if progress is not None:
                progress(done, len(grid))

    tissue_here = _on_map(tissue, map_downsample, (map_h, map_w))
    mask = _finalise(logit_sum, weight_sum, tissue_here)
    probabilities = logit_sum  # normalised in place
    return SegmentationMap(
        probabilities=probabilities,
        mask=mask,
        downsample=map_downsample,
        spacing_um_px=map_spacing,
        windows_total=windows_total,
        windows_run=len(grid),
        precision=precision,
    )


def _on_map(tissue: TissueMask, map_downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask on the map's raster: cropped or padded when both share a pixel size (no shift at the
    edges from rounding the two widths differently), resampled otherwise."""
    if abs(tissue.downsample - map_downsample) < 1e-6 * map_downsample:
        out = np.zeros(shape, dtype=bool)
        height, width = min(shape[0], tissue.mask.shape[0]), min(shape[1], tissue.mask.shape[1])
        out[:height, :width] = tissue.mask[:height, :width]
        return out
    resized = cv2.resize(tissue.mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return resized > 0


def _finalise(logit_sum: np.ndarray, weight_sum: np.ndarray, tissue: np.ndarray, rows: int = 256) -> np.ndarray:
    """Blend weights out, softmax (in place: ``logit_sum`` becomes the probabilities), labels clipped to tissue.

    Done in strips of ``rows`` so temporaries stay small next to the map (the largest array of an analysis).
    Map pixels no window covered are certain background.
    """
    mask = np.empty(weight_sum.shape, dtype=np.uint8)
    for top in range(0, weight_sum.shape[0], rows):
        strip = logit_sum[:, top : top + rows]
        weight = weight_sum[top : top + rows]
        covered = weight > 0
        np.divide(strip, weight, out=strip, where=covered)
        strip -= strip.max(axis=0, keepdims=True)
        np.exp(strip, out=strip)
        strip /= strip.sum(axis=0, keepdims=True)
        strip[:, ~covered] = 0.0
        strip[BACKGROUND, ~covered] = 1.0
        labels = strip.argmax(axis=0).astype(np.uint8)
        labels[~tissue[top : top + rows]] = BACKGROUND
        mask[top : top + rows] = labels
    return mask
