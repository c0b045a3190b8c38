"""The region mask and the tile-class map as rasters a program can read, with their pixel size recorded.

Each is a tiled, pyramidal, single-channel uint8 TIFF (level 0, then levels downsampled 4x by nearest neighbour,
as OpenSlide's generic-TIFF reader and QuPath open them), with its resolution in the TIFF tags (pixels per cm)
and, in its ImageDescription, JSON naming what each value means; and a small colour PNG preview.

- Tile-class map (``<slide>.tissue-map.tif``): one pixel per tile position of the grid (pixel (row, col) is the
  tile whose level-0 top-left corner is (col, row) x the tile's level-0 side); 0 where no tile was classified,
  else 1 + the class's index in ``classes``.
- Region mask (``<slide>.region-mask.tif``): the regions the composition was counted in, at the segmenter's
  spacing when it made them, else 8 um/px; 0 outside every region, 1 tumour, 2 non-tumour, 3 whole tissue
  (where user regions overlap, the later region in the report's order is drawn).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import tifffile
from hepatoquant_client.classes import REGION_CLASSES, TISSUE_CLASSES

from hepatoquant.analysis import AnalysisResult

__all__ = ["region_mask", "tile_class_map", "write_label_raster"]

REGION_MASK_SPACING_UM_PX = 8.0  # without a segmenter: regions drawn at the segmenter's default spacing
_TILE_PX = 256
_PREVIEW_LONG_SIDE_PX = 1024
_REGION_VALUES = {c.code: i + 1 for i, c in enumerate(REGION_CLASSES)}
_COLOURS = {c.code: c.color_rgb for c in TISSUE_CLASSES + REGION_CLASSES}


def tile_class_map(result: AnalysisResult) -> tuple[np.ndarray, float, dict[int, str]]:
    """(labels, um per pixel, value -> class code) of the tile grid."""
    grid = result.grid
    side = grid.size_level0_px
    labels = np.zeros((int(result.slide.height_px // side), int(result.slide.width_px // side)), dtype=np.uint8)
    cols = np.rint(grid.x_level0_px / side).astype(np.int64)
    rows = np.rint(grid.y_level0_px / side).astype(np.int64)
    labels[rows, cols] = result.predicted_class.astype(np.uint8) + 1
    return labels, side * result.slide.mpp_um_px, {i + 1: code for i, code in enumerate(result.classes)}


def region_mask(result: AnalysisResult) -> tuple[np.ndarray, float, dict[int, str]]:
    """(labels, um per pixel, value -> region class code) of the regions."""
    spacing = result.segmentation.spacing_um_px if result.segmentation is not None else REGION_MASK_SPACING_UM_PX
    downsample = spacing / result.slide.mpp_um_px  # level-0 pixels per mask pixel
    shape = (max(1, int(result.slide.height_px / downsample)), max(1, int(result.slide.width_px / downsample)))
    labels = np.zeros(shape, dtype=np.uint8)
    shift = 4  # sub-pixel vertices: cv2 draws with 1/16 px precision
    for region in result.regions:
        inside = np.zeros(shape, dtype=np.uint8)
        polygons = getattr(region.geometry, "geoms", [region.geometry])
        for polygon in polygons:
            if polygon.is_empty:
                continue

            def points(ring) -> np.ndarray:
                xy = np.asarray(ring.coords)[:, :2] / downsample - 0.5  # pixel centres
                return np.rint(xy * (1 << shift)).astype(np.int32)

            cv2.fillPoly(inside, [points(polygon.exterior)], 1, lineType=cv2.LINE_8, shift=shift)
            if polygon.interiors:
                cv2.fillPoly(inside, [points(r) for r in polygon.interiors], 0, lineType=cv2.LINE_8, shift=shift)
        labels[inside == 1] = _REGION_VALUES[region.region_class]
    return labels, spacing, {value: code for code, value in _REGION_VALUES.items()}


def write_label_raster(labels: np.ndarray, um_per_px: float, values: dict[int, str], what: str, tiff: Path,
                       preview: Path) -> None:
    """The pyramidal TIFF and its preview (colours of the classes the values name, white for 0)."""
    description = json.dumps({"hepatoquant": what, "um_per_px": um_per_px,
                              "values": {str(k): v for k, v in values.items()}, "0": "none"})
    with tifffile.TiffWriter(tiff, bigtiff=labels.size > 2**31) as writer:
        level, downsample = labels, 1
        while True:
            per_cm = 1e4 / (um_per_px * downsample)
            writer.write(level, tile=(_TILE_PX, _TILE_PX), photometric="minisblack", compression="zlib",
                         resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                         subfiletype=0 if downsample == 1 else 1,
                         description=description if downsample == 1 else None, metadata=None)
            if max(level.shape) <= 1024:
                break
            level, downsample = level[::4, ::4], downsample * 4
    palette = np.full((256, 3), 255, dtype=np.uint8)
    for value, code in values.items():
        palette[value] = _COLOURS[code]
    scale = min(1.0, _PREVIEW_LONG_SIDE_PX / max(labels.shape))
    small = labels if scale == 1.0 else cv2.resize(
        labels, (max(1, int(labels.shape[1] * scale)), max(1, int(labels.shape[0] * scale))),
        interpolation=cv2.INTER_NEAREST)
    if not cv2.imwrite(str(preview), cv2.cvtColor(palette[small], cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {preview}")
