"""Tests of ``hepatoquant.tissue``: tissue found on synthetic slides matches the analytic shapes that drew it,
real tissue is found on the CMU slide, a blank slide gives nothing, and the area filters do what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Point

from hepatoquant.errors import InvalidParameterError
from hepatoquant.slide import Slide
from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide
from hepatoquant.geometry import mask_to_polygons
from hepatoquant.tissue import TissueDetectionParams, TissueMask, detect_tissue, tissue_mask_from_rgb

SYNTHETIC_SPEC = SyntheticSlideSpec(width_px=2048, height_px=2048)  # the conftest slide's tissue shapes
TALL_TISSUE = (Ellipse(500, 2650, 300, 250), Ellipse(450, 700, 250, 400))


def ellipse_polygon(ellipse: Ellipse) -> shapely.Geometry:
    return affinity.scale(Point(ellipse.cx, ellipse.cy).buffer(1.0, quad_segs=64), ellipse.rx, ellipse.ry)


def analytic_tissue(ellipses: tuple[Ellipse, ...]) -> shapely.Geometry:
    return shapely.union_all([ellipse_polygon(e) for e in ellipses])


def analytic_fraction(ellipses: tuple[Ellipse, ...], width: int, height: int) -> float:
    """Share of level-0 pixels whose centre lies in an ellipse: exactly what the generator paints as tissue."""
    x, y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    inside = np.zeros(x.shape, dtype=bool)
    for ellipse in ellipses:
        inside |= ellipse.contains(x, y)
    return float(inside.mean())


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return shapely.intersection(a, b).area / shapely.union(a, b).area


def assert_within_slide(polygons: MultiPolygon, width: int, height: int) -> None:
    minx, miny, maxx, maxy = polygons.bounds
    assert minx >= 0 and miny >= 0, polygons.bounds
    assert maxx <= width and maxy <= height, (polygons.bounds, (width, height))


@pytest.fixture(scope="module")
def synthetic_tissue(synthetic_slide: Path) -> TissueMask:
    with Slide(synthetic_slide) as slide:
        return detect_tissue(slide)


@pytest.fixture(scope="module")
def cmu_tissue(cmu_slide: Path) -> TissueMask:
    with Slide(cmu_slide) as slide:
        return detect_tissue(slide)


@pytest.fixture(scope="module")
def tall_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 x 3000 px at 0.5 um/px: neither side a multiple of the 16 px overview step."""
    spec = SyntheticSlideSpec(width_px=1000, height_px=3000, tissue=TALL_TISSUE)
    return write_synthetic_slide(tmp_path_factory.mktemp("tall") / "tall.tiff", spec)


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSlideSpec(width_px=1024, height_px=768, tissue=())
    return write_synthetic_slide(tmp_path_factory.mktemp("blank") / "blank.tiff", spec)


# -- synthetic slides: compare with the shapes that were drawn ------------------------------------------------
def test_synthetic_tissue_fraction_matches_ellipse_area(synthetic_tissue: TissueMask) -> None:
    expected = analytic_fraction(SYNTHETIC_SPEC.tissue_shapes(), 2048, 2048)
    assert 0.3 < expected < 0.4  # the premise: two ellipses covering about a third of the slide
    assert synthetic_tissue.tissue_fraction == pytest.approx(expected, abs=0.02)
    expected_um2 = expected * 2048 * 2048 * 0.5**2
    assert synthetic_tissue.area_um2() == pytest.approx(expected_um2, rel=0.05)


def test_synthetic_mask_geometry(synthetic_tissue: TissueMask) -> None:
    assert synthetic_tissue.mask.dtype == bool
    assert synthetic_tissue.mask.shape == (128, 128)  # 2048 px * 0.5 um/px / 8 um/px
    assert synthetic_tissue.downsample == pytest.approx(16.0)
    assert synthetic_tissue.spacing_um_px == pytest.approx(8.0)
    assert synthetic_tissue.overview_rgb.shape == (128, 128, 3)
    # faint tissue is kept: the threshold sits just above the glass, not where Otsu splits pale from dense tissue
    assert TissueDetectionParams().min_saturation <= synthetic_tissue.saturation_threshold <= 255


def test_synthetic_polygons_match_ellipses(synthetic_tissue: TissueMask) -> None:
    polygons = synthetic_tissue.polygons
    assert isinstance(polygons, MultiPolygon)
    assert polygons.is_valid
    assert not polygons.is_empty
    assert_within_slide(polygons, 2048, 2048)
    truth = analytic_tissue(SYNTHETIC_SPEC.tissue_shapes())
    assert iou(polygons, truth) > 0.9
    for ellipse in SYNTHETIC_SPEC.tissue_shapes():
        assert polygons.contains(Point(ellipse.cx, ellipse.cy))
    assert not polygons.contains(Point(100, 100))  # glass in the corner
    assert not polygons.contains(Point(1900, 200))


def test_polygons_in_level0_on_non_square_slide(tall_slide: Path) -> None:
    """Each detected piece sits where its ellipse was drawn, also far down a slide whose sides are not
    multiples of the overview step (where a mis-scaled mask would drift by a whole mask pixel or more)."""
    with Slide(tall_slide) as slide:
        tissue = detect_tissue(slide)
    height, width = tissue.mask.shape
    # every mask pixel's level-0 footprint [j * downsample, (j + 1) * downsample) lies on the slide
    assert width * tissue.downsample <= 1000 and height * tissue.downsample <= 3000
    assert width * tissue.downsample > 1000 - tissue.downsample
    assert height * tissue.downsample > 3000 - tissue.downsample
    assert tissue.spacing_um_px == pytest.approx(8.0, rel=1e-6)
    polygons = tissue.polygons
    assert polygons.is_valid
    assert len(polygons.geoms) == 2
    assert_within_slide(polygons, 1000, 3000)
    assert iou(polygons, analytic_tissue(TALL_TISSUE)) > 0.9
    for ellipse in TALL_TISSUE:
        piece = next(g for g in polygons.geoms if g.contains(Point(ellipse.cx, ellipse.cy)))
        assert abs(piece.centroid.x - ellipse.cx) < tissue.downsample / 2
        assert abs(piece.centroid.y - ellipse.cy) < tissue.downsample / 2
        assert iou(piece, ellipse_polygon(ellipse)) > 0.9


def test_blank_slide_gives_no_tissue(blank_slide: Path) -> None:
    with Slide(blank_slide) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.shape == (48, 64)
    assert not tissue.mask.any()
    assert tissue.tissue_fraction == 0.0
    assert tissue.area_um2() == 0.0
    assert isinstance(tissue.polygons, MultiPolygon)
    assert tissue.polygons.is_empty
    assert len(tissue.polygons.geoms) == 0
    assert tissue.saturation_threshold >= TissueDetectionParams().min_saturation


# -- real slide --------------------------------------------------------------------------------------------
def test_cmu_finds_plausible_tissue(cmu_tissue: TissueMask) -> None:
    # CMU-1-Small-Region: a strip of skin down the middle, glass on both sides (about a third is tissue)
    assert 0.2 < cmu_tissue.tissue_fraction < 0.5
    assert 0.3e6 < cmu_tissue.area_um2() < 0.8e6
    polygons = cmu_tissue.polygons
    assert polygons.is_valid and not polygons.is_empty
    assert_within_slide(polygons, 2220, 2967)
    assert polygons.contains(Point(1400, 2600))  # dermis, lower middle
    assert not polygons.contains(Point(150, 150))  # glass, top left
    assert not polygons.contains(Point(2100, 2800))  # glass, bottom right
    # polygons (traced through mask pixel centres) and the mask agree on the area
    polygon_um2 = polygons.area * 0.499**2
    assert polygon_um2 == pytest.approx(cmu_tissue.area_um2(), rel=0.1)


def test_cmu_coarser_spacing_agrees(cmu_slide: Path, cmu_tissue: TissueMask) -> None:
    with Slide(cmu_slide) as slide:
        coarse = detect_tissue(slide, TissueDetectionParams(spacing_um_px=16.0))
    assert coarse.mask.shape[0] == pytest.approx(cmu_tissue.mask.shape[0] / 2, abs=1)
    assert coarse.tissue_fraction == pytest.approx(cmu_tissue.tissue_fraction, abs=0.05)
    assert iou(coarse.polygons, cmu_tissue.polygons) > 0.85


# -- the filters on a drawn image ------------------------------------------------------------------------------
GLASS = (244, 243, 245)
PINK = (232, 160, 196)


def drawn_image() -> np.ndarray:
    """200 x 200 px at 8 um/px: a 100 px tissue square with a small and a large hole, and a small speck."""
    rgb = np.empty((200, 200, 3), dtype=np.uint8)
    rgb[:] = GLASS
    rgb[40:140, 40:140] = PINK
    rgb[80:88, 60:68] = GLASS  # small hole: 64 px * 64 um^2 = 4096 um^2 (< 5000)
    rgb[100:125, 100:125] = GLASS  # large hole: 625 px = 40000 um^2
    rgb[170:178, 170:178] = PINK  # speck: 4096 um^2 (< 20000)
    return rgb


def test_min_object_area_removes_speck() -> None:
    rgb = drawn_image()
    mask, _ = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams())
    assert not mask[165:185, 165:185].any()
    kept, _ = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams(min_object_area_um2=0.0))
    assert kept[172:176, 172:176].all()  # the speck is there when the filter is off
    assert mask[50:60, 50:60].all() and kept[50:60, 50:60].all()  # the big piece is always kept


def test_min_object_area_in_physical_units() -> None:
    """The same speck at 2 um/px is only 256 um^2; at 32 um/px it is 65536 um^2 and stays."""
    rgb = drawn_image()
    fine, _ = tissue_mask_from_rgb(rgb, 2.0, TissueDetectionParams(min_object_area_um2=1000.0))
    coarse, _ = tissue_mask_from_rgb(rgb, 32.0, TissueDetectionParams(min_object_area_um2=1000.0))
    assert not fine[172:176, 172:176].any()
    assert coarse[172:176, 172:176].all()


def test_min_hole_area_fills_small_hole() -> None:
    rgb = drawn_image()
    mask, _ = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams())
    assert mask[80:88, 60:68].all()  # small hole filled
    assert not mask[105:120, 105:120].any()  # large hole kept
    unfilled, _ = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams(min_hole_area_um2=0.0))
    assert not unfilled[82:86, 62:66].any()


def test_fixed_saturation_threshold_is_used() -> None:
    rgb = drawn_image()
    _, automatic = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams())
    assert TissueDetectionParams().min_saturation <= automatic < 60
    mask, used = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams(saturation_threshold=90))
    assert used == 90
    assert not mask.any()  # pink's saturation is about 79: below 90, nothing is tissue
    mask, used = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams(saturation_threshold=60))
    assert used == 60 and mask[50:60, 50:60].all()


def test_bright_pixels_are_glass_whatever_their_hue() -> None:
    rgb = np.full((64, 64, 3), 253, dtype=np.uint8)
    rgb[..., 1] = 251  # faintly tinted white: saturated-ish after thresholding but brighter than 250
    mask, _ = tissue_mask_from_rgb(rgb, 8.0, TissueDetectionParams(saturation_threshold=0, min_object_area_um2=0))
    assert not mask.any()


def test_mask_to_polygons_level0_and_holes() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:25, 5:25] = True
    mask[12:18, 12:18] = False  # a hole
    mask[30:35, 30:38] = True  # a second piece
    polygons = mask_to_polygons(mask, 4.0)
    assert polygons.is_valid and len(polygons.geoms) == 2
    square = next(g for g in polygons.geoms if g.contains(Point(30, 30)))
    assert len(square.interiors) == 1
    # within the pixel footprint of the mask, at most half a mask pixel inside it
    minx, miny, maxx, maxy = square.bounds
    assert 20 <= minx <= 22 and 20 <= miny <= 22 and 98 <= maxx <= 100 and 98 <= maxy <= 100
    assert not square.contains(Point(60, 60))  # in the hole
    assert mask_to_polygons(np.zeros((10, 10), dtype=bool), 4.0).is_empty


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spacing_um_px": 0.5},
        {"spacing_um_px": 100.0},
        {"saturation_threshold": -1},
        {"saturation_threshold": 256},
        {"min_object_area_um2": -1.0},
        {"min_hole_area_um2": -0.1},
        {"min_saturation": 256},
        {"faint_margin": -1},
        {"min_pen_area_um2": -1.0},
        {"pen_margin_um": 1000.0},
    ],
)
def test_params_validation(kwargs: dict) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        TissueDetectionParams(**kwargs)
    assert isinstance(excinfo.value, ValueError)


def test_params_defaults_are_valid() -> None:
    params = TissueDetectionParams()
    assert params.spacing_um_px == 8.0 and params.saturation_threshold is None


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_edge_polygons_of_a_ragged_mask_are_valid_and_exactly_its_pixels(seed: int) -> None:
    """Many parts, holes and pixels touching at corners only: one valid MultiPolygon whose area is the mask's
    and which covers each set pixel's centre and no unset one's (only invalid parts are repaired, not the
    whole collection, which was three times slower on a 2,500 px overview)."""
    import shapely

    from hepatoquant.geometry import pixel_edge_polygons

    rng = np.random.default_rng(seed)
    mask = rng.random((120, 90)) > 0.45
    polygons = pixel_edge_polygons(mask, 4.0)
    assert polygons.is_valid and polygons.area == pytest.approx(mask.sum() * 16.0)
    rows, cols = np.indices(mask.shape)
    inside = shapely.contains_xy(polygons, (cols.ravel() + 0.5) * 4.0, (rows.ravel() + 0.5) * 4.0)
    assert (inside == mask.ravel()).all()
