"""Label masks from polygons: annotations in level-0 pixel coordinates burned into a downsampled raster.

Raster pixel (i, j) covers level-0 x in [j * downsample, (j + 1) * downsample) and y in
[i * downsample, (i + 1) * downsample); it takes a shape's label when its centre, level-0
((j + 0.5) * downsample, (i + 0.5) * downsample), lies in the shape (holes excluded; a centre exactly on an
edge counts as inside, so shapes that share an edge leave no gap between them).

``cv2.fillPoly`` fills each polygon with all its rings at once (holes by the even-odd rule), but it also
paints the outline of every ring, so on its own it grows each shape and shrinks each hole by about a pixel
(an 8-pixel square becomes 9 x 9). Those outline pixels, and their neighbours, are therefore decided again by
testing their centres with shapely; every pixel farther than that from an edge is already right.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from hepatoquant_client.qupath_geojson import polygonal_part

from hepatoquant.errors import InvalidParameterError

__all__ = ["rasterize_labels"]

_SHIFT = 4  # fractional bits of the vertex coordinates given to OpenCV (1/16 pixel)
_MARGIN_PX = 3  # shapes are clipped this many raster pixels beyond the raster: their cut edges touch no pixel
_BAND_KERNEL = np.ones((5, 5), np.uint8)  # outline pixels and two pixels around them are tested exactly


def rasterize_labels(
    shapes: Sequence[tuple[BaseGeometry, int]],
    size_px: tuple[int, int],
    downsample: float,
    *,
    fill: int = 0,
) -> np.ndarray:
    """A uint8 label raster (height x width) with each shape's label burned in, later shapes over earlier ones.

    ``shapes`` are (Polygon or MultiPolygon in level-0 pixel coordinates, label 0..255) pairs; empty
    geometries are skipped, invalid ones repaired with ``make_valid``, and parts outside the raster clipped. ``size_px`` is the raster's
    (width, height); ``downsample`` is level-0 pixels per raster pixel. Pixels no shape covers hold ``fill``.
    """
    width, height = _raster_size(size_px)
    if isinstance(downsample, bool) or not isinstance(downsample, numbers.Real) or not (
        math.isfinite(downsample) and downsample > 0
    ):
        raise InvalidParameterError(f"downsample {downsample!r} must be a positive number of level-0 pixels")
    _check_label(fill, "fill value")
    raster = np.full((height, width), fill, dtype=np.uint8)
    for index, (geometry, label) in enumerate(shapes):
        _check_label(label, f"label of shape {index}")
        if not isinstance(geometry, (Polygon, MultiPolygon)):
            raise InvalidParameterError(
                f"shape {index} is a {type(geometry).__name__}; only Polygon and MultiPolygon can be rasterised"
            )
        _burn(raster, geometry, int(label), float(downsample))
    return raster


def _raster_size(size_px: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size_px)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"size_px {size_px!r} must be (width, height) in raster pixels") from None
    if width < 1 or height < 1 or (width, height) != tuple(size_px):
        raise InvalidParameterError(f"size_px {size_px!r} must be two positive integers (width, height)")
    return width, height


def _check_label(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
        raise InvalidParameterError(f"{what} {value!r} must be an integer 0..255 (the raster is uint8)")


def _burn(raster: np.ndarray, geometry: BaseGeometry, label: int, downsample: float) -> None:
    """Set the pixels of ``raster`` whose centres lie in ``geometry`` (level-0 coordinates) to ``label``."""
    geometry = polygonal_part(geometry)  # None when empty; an invalid (self-crossing) shape is repaired first
    if geometry is None:
        return
    height, width = raster.shape
    # Raster window (columns x0..x1, rows y0..y1, exclusive ends) around the shape, within the raster.
    min_x, min_y, max_x, max_y = geometry.bounds
    x0 = max(math.floor(min_x / downsample) - 1, 0)
    y0 = max(math.floor(min_y / downsample) - 1, 0)
    x1 = min(math.ceil(max_x / downsample) + 1, width)
    y1 = min(math.ceil(max_y / downsample) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    margin = _MARGIN_PX * downsample
    clipped = shapely.clip_by_rect(
        geometry, x0 * downsample - margin, y0 * downsample - margin, x1 * downsample + margin,
        y1 * downsample + margin,
    )
    polygons = [p for p in shapely.get_parts(clipped) if isinstance(p, Polygon) and not p.is_empty]
    if not polygons:
        return
    # Window coordinates in which pixel centres are integers, as fixed-point for OpenCV.
    scale = 1 << _SHIFT
    rings = [
        np.round(((np.asarray(ring.coords)[:-1, :2] / downsample) - (x0 + 0.5, y0 + 0.5)) * scale).astype(np.int32)
        for polygon in polygons
        for ring in (polygon.exterior, *polygon.interiors)
    ]
    rings = [ring for ring in rings if len(ring) >= 3]
    if not rings:
        return
    inside = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.fillPoly(inside, rings, 1, lineType=cv2.LINE_8, shift=_SHIFT)
    outline = np.zeros_like(inside)
    cv2.polylines(outline, rings, isClosed=True, color=1, thickness=1, lineType=cv2.LINE_8, shift=_SHIFT)
    rows, cols = np.nonzero(cv2.dilate(outline, _BAND_KERNEL))
    exact = shapely.MultiPolygon(polygons) if len(polygons) > 1 else polygons[0]
    shapely.prepare(exact)
    inside[rows, cols] = shapely.intersects_xy(
        exact, (x0 + cols + 0.5) * downsample, (y0 + rows + 0.5) * downsample
    )
    raster[y0:y1, x0:x1][inside.astype(bool)] = label
