"""Tests of ``hepatoquant.segmentation.vectorize``: label masks drawn with known shapes become level-0 polygons
with the expected bounds, holes and islands follow the um^2 limits on both sides of them, simplification
smooths staircases without moving area, and regions come out named, ordered and classed as documented."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon

from hepatoquant.errors import InvalidParameterError
from hepatoquant.segmentation import BACKGROUND, IGNORE_INDEX, NON_TUMOUR, TUMOUR
from hepatoquant.segmentation.vectorize import VectorizeParams, mask_to_region_polygons, regions_from_label_mask

DOWNSAMPLE = 16.0  # level-0 px per mask px
MPP = 0.5  # um per level-0 px
PIXEL_UM = DOWNSAMPLE * MPP  # 8 um per mask pixel
PIXEL_UM2 = PIXEL_UM**2  # 64 um^2 per mask pixel
NO_CLEANING = VectorizeParams(min_region_area_um2=0, min_hole_area_um2=0, simplify_tolerance_um=0)


def polygons(mask: np.ndarray, label: int = TUMOUR, params: VectorizeParams = NO_CLEANING) -> MultiPolygon:
    result = mask_to_region_polygons(mask, label, downsample=DOWNSAMPLE, mpp_um_px=MPP, params=params)
    assert isinstance(result, MultiPolygon) and result.is_valid
    return result


def level0_centre(row: float, col: float) -> Point:
    """Level-0 point at the centre of mask pixel (row, col)."""
    return Point((col + 0.5) * DOWNSAMPLE, (row + 0.5) * DOWNSAMPLE)


def area_um2(geometry: shapely.Geometry) -> float:
    return geometry.area * MPP**2


def vertex_count(geometry: shapely.Geometry) -> int:
    return int(shapely.get_num_coordinates(geometry))


# -- geometry of one label --------------------------------------------------------------------------------------
def test_rectangle_bounds_and_area_in_level0() -> None:
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[10:30, 20:50] = TUMOUR
    result = polygons(mask, params=VectorizeParams(min_region_area_um2=0, min_hole_area_um2=0))
    assert len(result.geoms) == 1
    expected = (20 * DOWNSAMPLE, 10 * DOWNSAMPLE, 50 * DOWNSAMPLE, 30 * DOWNSAMPLE)
    assert result.bounds == pytest.approx(expected, abs=DOWNSAMPLE)
    # The outline follows pixel edges: the polygon covers the pixels' footprint, not half a pixel less.
    assert area_um2(result) == pytest.approx(20 * 30 * PIXEL_UM2, rel=0.01)
    assert result.contains(level0_centre(10, 20)) and result.contains(level0_centre(29, 49))
    assert not result.contains(level0_centre(9, 20)) and not result.contains(level0_centre(29, 50))


def test_non_integer_downsample_scales_to_level0() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[4:8, 2:12] = TUMOUR
    result = mask_to_region_polygons(mask, TUMOUR, downsample=12.5, mpp_um_px=0.25, params=NO_CLEANING)
    assert result.bounds == pytest.approx((2 * 12.5, 4 * 12.5, 12 * 12.5, 8 * 12.5), abs=1e-9)


def test_adjacent_labels_share_their_border() -> None:
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:25, 5:20] = TUMOUR
    mask[5:25, 20:35] = NON_TUMOUR
    tumour, non_tumour = polygons(mask, TUMOUR), polygons(mask, NON_TUMOUR)
    assert tumour.bounds[2] == non_tumour.bounds[0] == 20 * DOWNSAMPLE  # no gap between them
    assert shapely.intersection(tumour, non_tumour).area == pytest.approx(0.0, abs=1e-9)
    assert shapely.union(tumour, non_tumour).area == pytest.approx(20 * 30 * DOWNSAMPLE**2)


@pytest.mark.parametrize("hole_label", [BACKGROUND, NON_TUMOUR])
def test_hole_kept_when_large_and_filled_when_small(hole_label: int) -> None:
    mask = np.zeros((50, 50), dtype=np.uint8)
    mask[5:45, 5:45] = TUMOUR
    mask[20:30, 20:30] = hole_label  # 100 mask px = 6400 um^2
    hole_um2 = 100 * PIXEL_UM2
    inside_hole = level0_centre(25, 25)

    kept = polygons(mask, params=VectorizeParams(min_region_area_um2=0, min_hole_area_um2=hole_um2 - 1))
    assert len(kept.geoms) == 1 and len(kept.geoms[0].interiors) == 1
    assert area_um2(Polygon(kept.geoms[0].interiors[0])) == pytest.approx(hole_um2, rel=0.01)
    assert not kept.contains(inside_hole)
    assert area_um2(kept) == pytest.approx((1600 - 100) * PIXEL_UM2, rel=0.01)

    filled = polygons(mask, params=VectorizeParams(min_region_area_um2=0, min_hole_area_um2=hole_um2 + 1))
    assert len(filled.geoms) == 1 and len(filled.geoms[0].interiors) == 0
    assert filled.contains(inside_hole)
    assert area_um2(filled) == pytest.approx(1600 * PIXEL_UM2, rel=0.01)


def test_notch_at_mask_border_is_not_a_hole() -> None:
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[:, :20] = TUMOUR
    mask[0:3, 5:8] = BACKGROUND  # enclosed by tumour and the mask's edge only
    result = polygons(mask, params=VectorizeParams(min_region_area_um2=0, min_hole_area_um2=1e9))
    assert not result.contains(level0_centre(1, 6))


def test_small_island_dropped_or_kept_by_area() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[5:35, 5:35] = TUMOUR  # 900 px
    mask[45:55, 45:55] = TUMOUR  # 100 px island = 6400 um^2
    island_um2 = 100 * PIXEL_UM2
    island_centre = level0_centre(50, 50)

    kept = polygons(mask, params=VectorizeParams(min_region_area_um2=island_um2 - 1, min_hole_area_um2=0))
    assert len(kept.geoms) == 2 and kept.contains(island_centre)

    dropped = polygons(mask, params=VectorizeParams(min_region_area_um2=island_um2 + 1, min_hole_area_um2=0))
    assert len(dropped.geoms) == 1 and not dropped.contains(island_centre)
    assert area_um2(dropped) == pytest.approx(900 * PIXEL_UM2, rel=0.01)

    nothing = polygons(mask, params=VectorizeParams(min_region_area_um2=901 * PIXEL_UM2, min_hole_area_um2=0))
    assert nothing.is_empty


def test_pixels_touching_at_a_corner_are_separate_islands() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:6, 2:6] = TUMOUR  # 16 px
    mask[6:10, 6:10] = TUMOUR  # 16 px, touching the first block at one corner only
    both = polygons(mask, params=VectorizeParams(min_region_area_um2=16 * PIXEL_UM2, min_hole_area_um2=0))
    assert len(both.geoms) == 2
    assert [area_um2(p) for p in both.geoms] == pytest.approx([16 * PIXEL_UM2] * 2)
    none = polygons(mask, params=VectorizeParams(min_region_area_um2=20 * PIXEL_UM2, min_hole_area_um2=0))
    assert none.is_empty  # 32 px in all, but neither island reaches 20 px


def test_unsimplified_polygons_are_exactly_the_pixel_squares() -> None:
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 3, size=(30, 40), dtype=np.uint8)
    covered = []
    for label in (BACKGROUND, NON_TUMOUR, TUMOUR):
        result = polygons(mask, label)
        rows, cols = np.nonzero(mask == label)
        squares = shapely.union_all(shapely.box(cols, rows, cols + 1, rows + 1))
        squares = affinity.scale(squares, DOWNSAMPLE, DOWNSAMPLE, origin=(0, 0))
        assert shapely.symmetric_difference(result, squares).area == pytest.approx(0.0, abs=1e-6)
        covered.append(result)
    # The three labels tile the mask's footprint: no gap, no overlap.
    assert sum(g.area for g in covered) == pytest.approx(30 * 40 * DOWNSAMPLE**2)
    assert shapely.union_all(covered).area == pytest.approx(30 * 40 * DOWNSAMPLE**2)


def test_simplification_smooths_a_staircase_and_keeps_area() -> None:
    mask = np.zeros((110, 110), dtype=np.uint8)
    mask[5:105, 5:105] = np.tril(np.full((100, 100), TUMOUR, dtype=np.uint8))  # one-pixel staircase diagonal
    raw = polygons(mask, params=NO_CLEANING)
    # A one-pixel staircase lies within 1/sqrt(2) px of its straight line: a one-pixel tolerance smooths it.
    simplified = polygons(mask, params=VectorizeParams(0, 0, simplify_tolerance_um=PIXEL_UM))
    assert vertex_count(raw) > 190  # the premise: both corners of every step are traced
    assert vertex_count(simplified) <= 10
    assert abs(simplified.area - raw.area) / raw.area < 0.02
    assert abs(area_um2(simplified) - 5050 * PIXEL_UM2) / (5050 * PIXEL_UM2) < 0.02


def test_outputs_valid_on_noisy_mask() -> None:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 3, size=(80, 90), dtype=np.uint8)
    noise[10:70, 10:50] = np.where(rng.random((60, 40)) < 0.9, TUMOUR, noise[10:70, 10:50])
    for params in (NO_CLEANING, VectorizeParams(), VectorizeParams(min_region_area_um2=500, min_hole_area_um2=300)):
        for label in (TUMOUR, NON_TUMOUR):
            result = polygons(noise, label, params)
            assert all(p.is_valid and not p.is_empty for p in result.geoms)
        for region in regions_from_label_mask(noise, downsample=DOWNSAMPLE, mpp_um_px=MPP, params=params):
            assert isinstance(region.geometry, Polygon) and region.geometry.is_valid


# -- regions ----------------------------------------------------------------------------------------------------
def test_regions_named_and_ordered_by_area() -> None:
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[5:25, 5:25] = TUMOUR  # small tumour blob: 400 px
    mask[40:90, 40:90] = TUMOUR  # large tumour blob: 2500 px
    mask[5:35, 60:95] = NON_TUMOUR  # 1050 px
    params = VectorizeParams(min_region_area_um2=0, min_hole_area_um2=0)
    regions = regions_from_label_mask(mask, downsample=DOWNSAMPLE, mpp_um_px=MPP, params=params)

    assert [r.name for r in regions] == ["Tumour region 1", "Tumour region 2", "Non-tumour region 1"]
    assert [r.region_class for r in regions] == ["tumour", "tumour", "non_tumour"]
    assert all(r.source == "segmenter" and r.source_class is None for r in regions)
    assert regions[0].geometry.area > regions[1].geometry.area
    assert regions[0].geometry.contains(level0_centre(60, 60))
    assert regions[1].geometry.contains(level0_centre(15, 15))
    assert area_um2(regions[0].geometry) == pytest.approx(2500 * PIXEL_UM2, rel=0.01)
    assert regions[2].geometry.contains(level0_centre(20, 80))


def test_background_and_other_labels_never_give_regions() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[10:40, 10:40] = NON_TUMOUR
    mask[45:55, 45:55] = IGNORE_INDEX
    regions = regions_from_label_mask(mask, downsample=DOWNSAMPLE, mpp_um_px=MPP, params=NO_CLEANING)
    assert [r.region_class for r in regions] == ["non_tumour"]
    for point in (level0_centre(2, 2), level0_centre(50, 50), level0_centre(58, 58)):
        assert not any(r.geometry.contains(point) for r in regions)


@pytest.mark.parametrize("shape", [(40, 30), (1, 1), (0, 0)])
def test_empty_mask_gives_no_regions(shape: tuple[int, int]) -> None:
    mask = np.zeros(shape, dtype=np.uint8)
    assert regions_from_label_mask(mask, downsample=DOWNSAMPLE, mpp_um_px=MPP) == []
    assert polygons(mask).is_empty


def test_regions_below_default_minimum_are_dropped() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[10:20, 10:20] = TUMOUR  # 6400 um^2 < 50 000 um^2 by default
    mask[20:50, 20:50] = NON_TUMOUR  # 57 600 um^2
    regions = regions_from_label_mask(mask, downsample=DOWNSAMPLE, mpp_um_px=MPP)
    assert [r.name for r in regions] == ["Non-tumour region 1"]


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_region_area_um2": -1.0},
        {"min_hole_area_um2": -0.5},
        {"simplify_tolerance_um": -0.1},
        {"simplify_tolerance_um": float("nan")},
        {"min_region_area_um2": float("inf")},
    ],
)
def test_params_validation(kwargs: dict) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        VectorizeParams(**kwargs)
    assert isinstance(excinfo.value, ValueError)


def test_zero_params_are_allowed() -> None:
    assert VectorizeParams(0, 0, 0) == NO_CLEANING


@pytest.mark.parametrize(
    ("mask", "downsample", "mpp"),
    [
        (np.zeros((4, 4, 3), dtype=np.uint8), DOWNSAMPLE, MPP),
        (np.zeros(16, dtype=np.uint8), DOWNSAMPLE, MPP),
        (np.zeros((4, 4), dtype=np.uint8), 0.0, MPP),
        (np.zeros((4, 4), dtype=np.uint8), DOWNSAMPLE, -0.5),
        (np.zeros((4, 4), dtype=np.uint8), float("nan"), MPP),
    ],
)
def test_bad_inputs_rejected(mask: np.ndarray, downsample: float, mpp: float) -> None:
    with pytest.raises(InvalidParameterError):
        regions_from_label_mask(mask, downsample=downsample, mpp_um_px=mpp)
    with pytest.raises(InvalidParameterError):
        mask_to_region_polygons(mask, TUMOUR, downsample=downsample, mpp_um_px=mpp)
