"""An overlay PNG a pathologist can glance at: the slide, tiles tinted by class, region outlines, a legend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from hepatoquant_client.classes import REGION_CLASSES, TISSUE_CLASSES

from hepatoquant.analysis import AnalysisResult
from hepatoquant.slide import Slide

__all__ = ["render_overlay", "write_overlay"]

_LONG_SIDE_PX = 1600  # big enough to see tiles, small enough to open anywhere
_TILE_ALPHA = 0.45
_LEGEND_WIDTH_PX = 230
_LEGEND_MIN_HEIGHT_PX = 350
_ARTEFACT_COLOUR = (40, 40, 40)


def render_overlay(result: AnalysisResult) -> np.ndarray:
    """RGB image: overview of the slide with class-coloured tiles, tissue and region outlines, and a legend."""
    with Slide(result.slide.path, mpp_override_um_px=result.slide.mpp_um_px) as slide:
        width, height = slide.dimensions
        base = slide.read_overview(_overlay_spacing_um_px(slide))
    scale = base.shape[1] / width  # overlay pixels per level-0 pixel
    tint = base.copy()
    grid = result.grid
    colours = np.array([c.color_rgb for c in TISSUE_CLASSES], dtype=np.uint8)
    codes = [c.code for c in TISSUE_CLASSES]
    class_to_colour = [colours[codes.index(c)] if c in codes else np.array([128, 128, 128]) for c in result.classes]
    for x, y, cls in zip(grid.x_level0_px, grid.y_level0_px, result.predicted_class):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = int((x + grid.size_level0_px) * scale), int((y + grid.size_level0_px) * scale)
        tint[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = class_to_colour[cls]
    image = cv2.addWeighted(tint, _TILE_ALPHA, base, 1 - _TILE_ALPHA, 0)
    _draw_outline(image, result.tissue.polygons, scale, (0, 0, 0), 1)
    for geometry in result.tissue.artefacts.values():  # what was left out, hatched so it reads as excluded
        _hatch(image, geometry, scale, _ARTEFACT_COLOUR)
        _draw_outline(image, geometry, scale, _ARTEFACT_COLOUR, 2)
    region_colours = {c.code: c.color_rgb for c in REGION_CLASSES}
    for region in result.regions:
        if region.source != "tissue":
            _draw_outline(image, region.geometry, scale, region_colours[region.region_class], 3)
    out_height = max(image.shape[0], _LEGEND_MIN_HEIGHT_PX)
    padded = np.full((out_height, image.shape[1], 3), 255, dtype=np.uint8)
    padded[: image.shape[0]] = image
    return np.concatenate([padded, _legend(result, out_height)], axis=1)


def _overlay_spacing_um_px(slide: Slide) -> float:
    """About ``_LONG_SIDE_PX`` on the long side, or a pyramid level's own resolution when one is big enough.

    Reading a level at its native size costs a fraction of downscaling a finer one (a 100k px slide's level 0).
    """
    long_side_px = max(slide.dimensions)
    target = max(slide.mpp_um_px, long_side_px * slide.mpp_um_px / _LONG_SIDE_PX)
    for downsample in sorted(slide.level_downsamples, reverse=True):
        if long_side_px / downsample >= _LONG_SIDE_PX / 2:
            return max(target, downsample * slide.mpp_um_px)
    return target


def _draw_outline(image: np.ndarray, geometry, scale: float, colour: tuple[int, int, int], thickness: int) -> None:
    for polygon in getattr(geometry, "geoms", [geometry]):
        if polygon.is_empty or polygon.geom_type != "Polygon":
            continue
        rings = [polygon.exterior, *polygon.interiors]
        points = [np.round(np.asarray(r.coords) * scale).astype(np.int32) for r in rings]
        cv2.polylines(image, points, isClosed=True, color=colour, thickness=thickness, lineType=cv2.LINE_AA)


def _hatch(image: np.ndarray, geometry, scale: float, colour: tuple[int, int, int]) -> None:
    """Diagonal lines over the geometry's area."""
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    for polygon in getattr(geometry, "geoms", [geometry]):
        if polygon.is_empty or polygon.geom_type != "Polygon":
            continue
        cv2.fillPoly(mask, [np.round(np.asarray(polygon.exterior.coords) * scale).astype(np.int32)], 1)
        for hole in polygon.interiors:
            cv2.fillPoly(mask, [np.round(np.asarray(hole.coords) * scale).astype(np.int32)], 0)
    rows, cols = np.indices(mask.shape)
    lines = (mask > 0) & ((rows + cols) % 8 < 2)
    image[lines] = colour


def _legend(result: AnalysisResult, height: int) -> np.ndarray:
    panel = np.full((height, _LEGEND_WIDTH_PX, 3), 255, dtype=np.uint8)
    font, y = cv2.FONT_HERSHEY_SIMPLEX, 22
    counts = np.bincount(result.predicted_class, minlength=len(result.classes)) if len(result.grid) else None
    for cls in TISSUE_CLASSES:
        cv2.rectangle(panel, (10, y - 12), (26, y + 2), cls.color_rgb, -1)
        count = int(counts[result.classes.index(cls.code)]) if counts is not None and cls.code in result.classes else 0
        cv2.putText(panel, f"{cls.code} {cls.display_name} ({count})", (32, y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        y += 22
    y += 8
    for cls in REGION_CLASSES[:2]:
        cv2.line(panel, (10, y - 5), (26, y - 5), cls.color_rgb, 3)
        cv2.putText(panel, cls.display_name, (32, y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        y += 22
    if result.tissue.artefacts:
        cv2.line(panel, (10, y - 5), (26, y - 5), _ARTEFACT_COLOUR, 3)
        kinds = ", ".join(result.tissue.artefacts)
        cv2.putText(panel, f"left out: {kinds}", (32, y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        y += 22
    y += 8
    lines = [f"model: {result.model['name']}", f"tiles: {len(result.grid)}"]
    if result.segmenter is not None:
        lines.append(f"regions: segmenter {result.segmenter['name']}")
    demo = [m for m in (result.model, result.segmenter) if m is not None and m["model_status"] == "untrained-demo"]
    if demo:
        lines += ["UNTRAINED DEMO MODEL:", "labels are meaningless" if len(demo) == 1 and demo[0] is result.model
                  else "labels and regions meaningless"]
    lines += ["Research use only"]
    for line in lines:
        cv2.putText(panel, line, (10, y), font, 0.4, (160, 0, 0) if "DEMO" in line else (0, 0, 0), 1, cv2.LINE_AA)
        y += 18
    return panel


def write_overlay(result: AnalysisResult, path: Path) -> None:
    image = render_overlay(result)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write the overlay {str(path)!r}")
