"""A tumour / non-tumour label mask as region polygons in level-0 pixels, cleaned in physical units.

Label mask pixel (i, j) covers level-0 x in [j * downsample, (j + 1) * downsample) and y in
[i * downsample, (i + 1) * downsample); one mask pixel is ``(downsample * mpp_um_px) ** 2`` um^2.

Before simplification a label's polygons are exactly the union of its pixel squares (traced along pixel
edges, not through pixel centres), so their area is the pixel count times the pixel area, and tumour and
non-tumour polygons share their common border instead of leaving a one-pixel gap between them. Connectivity is
that of the squares: pixels touching only at a corner are separate islands (separate polygons touching at a
point), and a hole closed by such a corner contact is a hole.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from hepatoquant_client.classes import NON_TUMOUR_REGION, TUMOUR_REGION
from shapely.geometry import MultiPolygon

from hepatoquant.errors import InvalidParameterError
from hepatoquant.geometry import as_multipolygon, pixel_edge_polygons
from hepatoquant.regions import Region
from hepatoquant.segmentation import NON_TUMOUR, TUMOUR

__all__ = ["VectorizeParams", "mask_to_region_polygons", "regions_from_label_mask"]

# Region classes in output order (tumour regions first), with the label each one is traced from.
_REGION_LABELS = ((TUMOUR, TUMOUR_REGION), (NON_TUMOUR, NON_TUMOUR_REGION))


@dataclass(frozen=True)
class VectorizeParams:
    """How a label mask becomes polygons; areas in um^2, tolerance in um.

    Islands (4-connected pixels of one label) smaller than ``min_region_area_um2`` are dropped; holes (areas
    of other labels wholly enclosed by the label) smaller than ``min_hole_area_um2`` are filled; outlines are
    simplified (Douglas-Peucker, topology preserved) with ``simplify_tolerance_um``. Zero turns a step off.
    """

    min_region_area_um2: float = 20_000.0  # islands smaller than this (about 2 x 2 tiles) are dropped
    min_hole_area_um2: float = 20_000.0  # about a 140 um square
    simplify_tolerance_um: float = 4.0

    def __post_init__(self) -> None:
        for name in ("min_region_area_um2", "min_hole_area_um2", "simplify_tolerance_um"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise InvalidParameterError(f"vectorize parameter {name}={value!r} must be a finite number >= 0")


def mask_to_region_polygons(
    mask: np.ndarray,
    label: int,
    *,
    downsample: float,
    mpp_um_px: float,
    params: VectorizeParams = VectorizeParams(),
) -> MultiPolygon:
    """The pixels of ``mask`` equal to ``label`` as valid polygons with holes, in level-0 pixel coordinates.

    ``mask`` is a 2-D label mask whose pixel (i, j) covers level-0 x in [j * downsample, (j + 1) * downsample)
    (y likewise with i); ``mpp_um_px`` is the slide's level-0 pixel size. Small islands are dropped and small
    holes filled (by area in um^2), then the outline is simplified. Empty MultiPolygon when nothing is left.
    """
    _check_mask(mask)
    _check_positive("downsample", downsample)
    _check_positive("mpp_um_px", mpp_um_px)
    pixel_area_um2 = (downsample * mpp_um_px) ** 2
    region = mask == label
    # Islands first: a dropped island inside a hole then counts towards the hole's area.
    region &= ~_small_components(region, params.min_region_area_um2 / pixel_area_um2)
    region |= _small_components(~region, params.min_hole_area_um2 / pixel_area_um2, holes_only=True)
    polygons = pixel_edge_polygons(region, downsample)
    if polygons.is_empty:
        return MultiPolygon()
    # Tolerance 0 still drops the collinear vertices left along straight pixel edges.
    tolerance_px = params.simplify_tolerance_um / mpp_um_px
    polygons = shapely.simplify(polygons, tolerance_px, preserve_topology=True)
    return as_multipolygon(shapely.make_valid(polygons))


def regions_from_label_mask(
    mask: np.ndarray,
    *,
    downsample: float,
    mpp_um_px: float,
    params: VectorizeParams = VectorizeParams(),
) -> list[Region]:
    """Tumour (label 2) then non-tumour (label 1) regions of a label mask; background (0) gives none.

    One region per connected polygon, in level-0 pixels, numbered by decreasing area within its class:
    "Tumour region 1", "Tumour region 2", ..., "Non-tumour region 1", ...; ``source`` is ``segmenter``.
    See ``mask_to_region_polygons`` for the mask convention and the cleaning.
    """
    regions: list[Region] = []
    for label, region_class in _REGION_LABELS:
        polygons = mask_to_region_polygons(mask, label, downsample=downsample, mpp_um_px=mpp_um_px, params=params)
        by_area = sorted(polygons.geoms, key=lambda polygon: -polygon.area)
        regions.extend(
            Region(
                name=f"{region_class.display_name} {number}",
                region_class=region_class.code,
                geometry=polygon,
                source="segmenter",
                source_class=None,
            )
            for number, polygon in enumerate(by_area, start=1)
        )
    return regions


def _check_mask(mask: np.ndarray) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shape = getattr(mask, "shape", type(mask).__name__)
        raise InvalidParameterError(f"label mask must be a 2-D array (height, width); got {shape}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise InvalidParameterError(f"{name}={value!r} must be a finite number > 0")


def _small_components(mask: np.ndarray, max_area_px: float, *, holes_only: bool = False) -> np.ndarray:
    """Pixels of the 4-connected components of ``mask`` smaller than ``max_area_px`` pixels.

    With ``holes_only``, components touching the mask's border are never small: they are not enclosed.
    """
    if max_area_px <= 0 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < max_area_px
    small[0] = False  # label 0 is the complement of mask
    if holes_only:
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return small[labels]
