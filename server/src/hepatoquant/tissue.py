"""Tissue detection on a low-resolution overview, in the spirit of CLAM and WSInfer.

H&E tissue is coloured (saturated) while glass, background and most scanner artefacts are grey: a saturation
threshold (Otsu's, with a floor so that a blank slide's noise never counts as tissue) separates them, then
morphology and area filters in physical units (um^2) remove dust and fill small holes. The mask and the tissue
polygons are returned; polygons are in level-0 pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon

from hepatoquant_client.qupath_geojson import polygonal_part

from hepatoquant.errors import InvalidParameterError
from hepatoquant.slide import Slide

__all__ = [
    "TissueDetectionParams",
    "TissueMask",
    "detect_tissue",
    "tissue_mask_from_rgb",
    "mask_to_polygons",
    "pixel_edge_polygons",
]


@dataclass(frozen=True)
class TissueDetectionParams:
    """Tissue detection settings; areas in um^2, spacing in um/px.

    ``saturation_threshold`` (0-255) fixes the threshold; ``None`` lets Otsu choose it per slide, never below
    ``min_saturation`` (0-255) so that faint noise on empty glass is not tissue.
    """

    spacing_um_px: float = 8.0
    saturation_threshold: int | None = None
    min_saturation: int = 20
    max_brightness: int = 250  # pixels brighter than this in every channel are glass, whatever their hue
    min_object_area_um2: float = 20_000.0  # about a 140 um square: smaller specks are dust or debris
    min_hole_area_um2: float = 5_000.0  # smaller holes (vessels, fat droplets) stay tissue

    def __post_init__(self) -> None:
        if not 1.0 <= self.spacing_um_px <= 64.0:
            raise InvalidParameterError(
                f"tissue detection spacing {self.spacing_um_px} um/px is outside 1..64 um/px"
            )
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise InvalidParameterError(f"saturation threshold {self.saturation_threshold} is outside 0..255")
        if self.min_object_area_um2 < 0 or self.min_hole_area_um2 < 0:
            raise InvalidParameterError("minimum object and hole areas must be >= 0 um^2")


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask of the overview and the same tissue as polygons in level-0 pixels.

    ``downsample`` is level-0 pixels per mask pixel: mask pixel (i, j) covers level-0 x in
    [j * downsample, (j + 1) * downsample).
    """

    mask: np.ndarray
    downsample: float
    spacing_um_px: float
    polygons: MultiPolygon
    saturation_threshold: int
    overview_rgb: np.ndarray  # the overview the mask was computed on, kept for overlays

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.spacing_um_px**2


def tissue_mask_from_rgb(
    rgb: np.ndarray, spacing_um_px: float, params: TissueDetectionParams
) -> tuple[np.ndarray, int]:
    """Tissue mask (bool, same height and width as ``rgb``) and the saturation threshold that was used."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], 5)
    if params.saturation_threshold is not None:
        threshold = params.saturation_threshold
    else:
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(int(otsu), params.min_saturation)
    mask = saturation > threshold
    mask &= ~np.all(rgb > params.max_brightness, axis=-1)

    # Close small gaps, then drop specks and fill holes below the area limits (in pixels of this raster).
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_area_um2 = spacing_um_px**2
    mask = _remove_small_components(mask, params.min_object_area_um2 / px_area_um2)
    mask = ~_remove_small_components(~mask, params.min_hole_area_um2 / px_area_um2)
    return mask, threshold


def _remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area_px`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the complement of mask
    return keep[labels]


def mask_to_polygons(mask: np.ndarray, downsample: float, *, centre_offset: float = 0.5) -> MultiPolygon:
    """Polygons with holes tracing ``mask``, scaled by ``downsample`` to level-0 pixel coordinates.

    Contours run through the centres of the mask's border pixels: pixel (i, j) maps to level-0
    x = (j + centre_offset) * downsample, y = (i + centre_offset) * downsample. The default puts the contour
    half a pixel inside the pixel footprint; ``centre_offset=0`` suits rasters whose pixels stand for lattice
    points (``hepatoquant.segmentation.vectorize`` traces pixel edges that way).
    """
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return MultiPolygon()
    polygons: list[Polygon] = []
    for index, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(contours[index]) < 3:
            continue
        holes = []
        child = first_child
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(contours[child][:, 0, :])
            child = hierarchy[0][child][0]
        polygon = Polygon(contours[index][:, 0, :], holes)
        polygons.append(polygon)
    if not polygons:
        return MultiPolygon()
    # Traced contours can touch themselves (invalid); make_valid may then return a collection.
    merged = polygonal_part(shapely.make_valid(shapely.union_all(polygons)))
    if merged is None:
        return MultiPolygon()
    offset = centre_offset * downsample
    merged = affinity.affine_transform(merged, [downsample, 0, 0, downsample, offset, offset])
    return merged if isinstance(merged, MultiPolygon) else MultiPolygon([merged])


def pixel_edge_polygons(region: np.ndarray, downsample: float) -> MultiPolygon:
    """The union of the pixel squares of boolean ``region``, in level-0 pixels (valid; may be empty).

    ``mask_to_polygons`` traces through pixel centres, so it is given a lattice raster: cell (2i + 1, 2j + 1)
    is pixel (i, j), and cells in even rows or columns are the pixels' edges and corners, set when a pixel
    they bound is set. Lattice point (a, b) is level-0 (b * downsample / 2, a * downsample / 2). The tracer
    follows 8-connected borders, so it cuts each concave corner with a diagonal unit step; the corner is put
    back on every ring, which also splits two pixels touching at a corner into squares meeting at a point.
    """
    height, width = region.shape
    lattice = np.zeros((2 * height + 1, 2 * width + 1), dtype=np.uint8)
    lattice[1::2, 1::2] = region
    lattice = cv2.dilate(lattice, np.ones((3, 3), dtype=np.uint8))
    traced = mask_to_polygons(lattice, 1.0, centre_offset=0.0)  # in lattice units
    squared = [
        Polygon(_restore_corners(polygon.exterior.coords), [_restore_corners(r.coords) for r in polygon.interiors])
        for polygon in traced.geoms
    ]
    merged_part = polygonal_part(shapely.make_valid(MultiPolygon(squared))) if squared else None
    merged = MultiPolygon() if merged_part is None else (
        merged_part if isinstance(merged_part, MultiPolygon) else MultiPolygon([merged_part]))
    scale = downsample / 2
    return affinity.affine_transform(merged, [scale, 0, 0, scale, 0, 0])


def _restore_corners(ring: Sequence[tuple[float, float]]) -> np.ndarray:
    """A closed lattice ring with the pixel corner put back in each diagonal unit step, and only its turns kept.

    A diagonal step p -> q joins the midpoints of the two pixel edges that meet at a corner; of its two
    coordinates, the corner takes the even one (pixel edges lie on even lattice lines). The edge midpoints and
    any other vertex on a straight run are then dropped, the ring's first one included.
    """
    points = np.rint(np.asarray(ring, dtype=float)).astype(np.int64)[:-1]  # open ring
    following = np.roll(points, -1, axis=0)
    diagonal = np.all(np.abs(following - points) == 1, axis=1)
    corner = np.where(points % 2 == 0, points, following)
    keep = np.stack([np.ones_like(diagonal), diagonal], axis=1)
    points = np.stack([points, corner], axis=1)[keep]
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    turns = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0] != 0
    points = points[turns]
    return np.concatenate([points, points[:1]])


def detect_tissue(slide: Slide, params: TissueDetectionParams = TissueDetectionParams()) -> TissueMask:
    """Detect tissue on an overview of ``slide`` read at ``params.spacing_um_px`` (never at full size)."""
    spacing = max(params.spacing_um_px, slide.mpp_um_px)
    overview = slide.read_overview(spacing)
    mask, threshold = tissue_mask_from_rgb(overview, spacing, params)
    # Overview pixel (i, j) covers level-0 [j * s, (j + 1) * s) with s = spacing / MPP, on both axes (its sides
    # are truncated to whole pixels, so width / overview width would overstate s and push y off the slide).
    downsample = spacing / slide.mpp_um_px
    return TissueMask(
        mask=mask,
        downsample=downsample,
        spacing_um_px=downsample * slide.mpp_um_px,
        polygons=pixel_edge_polygons(mask, downsample),  # pixel edges: the polygons' area is the mask's
        saturation_threshold=threshold,
        overview_rgb=overview,
    )
