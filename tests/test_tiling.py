"""Tests of ``hepatoquant.tiling``: the tile spec's units, and the grid laid over detected tissue compared with
what the geometry of a synthetic slide predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point

from hepatoquant.errors import InvalidParameterError
from hepatoquant.slide import Slide
from hepatoquant.synthetic import SyntheticSlideSpec
from hepatoquant.tiling import TileGrid, TileSpec, build_tile_grid
from hepatoquant.tissue import TissueMask, detect_tissue

SYNTHETIC_SPEC = SyntheticSlideSpec(width_px=2048, height_px=2048)  # the conftest slide's tissue shapes


def full_tissue(mask_shape: tuple[int, int], downsample: float, value: bool = True) -> TissueMask:
    """A hand-made tissue mask: every mask pixel ``value``."""
    return TissueMask(
        mask=np.full(mask_shape, value, dtype=bool),
        downsample=downsample,
        spacing_um_px=downsample * 0.5,
        polygons=MultiPolygon(),
        saturation_threshold=0,
        overview_rgb=np.zeros(mask_shape + (3,), dtype=np.uint8),
    )


def analytic_tile_fractions(side: float, count: int, sub: int = 30) -> np.ndarray:
    """(rows, cols) share of each grid tile inside the synthetic slide's ellipses, sampled sub x sub per tile."""
    offsets = (np.arange(sub) + 0.5) * side / sub
    fractions = np.zeros((count, count))
    for row in range(count):
        for col in range(count):
            x, y = np.meshgrid(col * side + offsets, row * side + offsets)
            inside = np.zeros(x.shape, dtype=bool)
            for ellipse in SYNTHETIC_SPEC.tissue_shapes():
                inside |= ellipse.contains(x, y)
            fractions[row, col] = inside.mean()
    return fractions


def assert_disjoint_and_on_slide(grid: TileGrid, width: float, height: float) -> None:
    side = grid.size_level0_px
    assert (grid.x_level0_px >= 0).all() and (grid.y_level0_px >= 0).all()
    assert (grid.x_level0_px + side <= width + 1e-6).all()
    assert (grid.y_level0_px + side <= height + 1e-6).all()
    boxes = grid.boxes()
    assert len(boxes) == len(grid)
    union = shapely.union_all(boxes)
    assert union.area == pytest.approx(len(grid) * side * side, rel=1e-9)  # no two tiles overlap


@pytest.fixture(scope="module")
def synthetic_tissue(synthetic_slide: Path) -> TissueMask:
    with Slide(synthetic_slide) as slide:
        return detect_tissue(slide)


# -- TileSpec ----------------------------------------------------------------------------------------------
def test_tile_spec_defaults_are_hepatobench() -> None:
    spec = TileSpec()
    assert (spec.tile_size_px, spec.spacing_um_px, spec.min_tissue_fraction) == (150, 0.5, 0.5)
    assert spec.tile_size_um == pytest.approx(75.0)


def test_tile_size_in_level0_pixels() -> None:
    spec = TileSpec()
    assert spec.tile_size_level0_px(0.25) == pytest.approx(300.0)  # 40x scan: twice as many pixels
    assert spec.tile_size_level0_px(0.5) == pytest.approx(150.0)
    assert spec.tile_size_level0_px(0.499) == pytest.approx(75.0 / 0.499)  # need not be an integer
    assert TileSpec(tile_size_px=224, spacing_um_px=1.0).tile_size_level0_px(0.25) == pytest.approx(896.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size_px": 15},
        {"tile_size_px": 0},
        {"tile_size_px": 4097},
        {"spacing_um_px": 0.05},
        {"spacing_um_px": 16.5},
        {"min_tissue_fraction": -0.01},
        {"min_tissue_fraction": 1.01},
    ],
)
def test_tile_spec_validation(kwargs: dict) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        TileSpec(**kwargs)
    assert isinstance(excinfo.value, ValueError)
    assert str(next(iter(kwargs.values()))) in str(excinfo.value)  # the message names the bad value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size_px": 16},
        {"tile_size_px": 4096},
        {"spacing_um_px": 0.1},
        {"spacing_um_px": 16.0},
        {"min_tissue_fraction": 0.0},
        {"min_tissue_fraction": 1.0},
    ],
)
def test_tile_spec_range_ends_are_allowed(kwargs: dict) -> None:
    TileSpec(**kwargs)


# -- grid size from the slide's pixel size -------------------------------------------------------------------
@pytest.mark.parametrize(("mpp", "side", "per_row"), [(0.5, 150.0, 13), (0.25, 300.0, 6)])
def test_grid_tile_size_follows_slide_mpp(mpp: float, side: float, per_row: int) -> None:
    tissue = full_tissue((128, 128), 16.0)
    grid = build_tile_grid((2048, 2048), mpp, tissue, TileSpec())
    assert grid.size_level0_px == pytest.approx(side)
    assert len(grid) == per_row * per_row
    assert (grid.tissue_fraction == 1.0).all()
    assert_disjoint_and_on_slide(grid, 2048, 2048)
    assert grid.x_level0_px.dtype == np.float64


def test_no_tissue_gives_empty_grid() -> None:
    grid = build_tile_grid((2048, 2048), 0.5, full_tissue((128, 128), 16.0, value=False), TileSpec())
    assert len(grid) == 0
    assert grid.boxes().shape == (0,)
    # even with min_tissue_fraction 0, a tile without any tissue is not kept
    grid = build_tile_grid((2048, 2048), 0.5, full_tissue((128, 128), 16.0, value=False),
                           TileSpec(min_tissue_fraction=0.0))
    assert len(grid) == 0


def test_slide_smaller_than_a_tile_gives_empty_grid() -> None:
    grid = build_tile_grid((100, 1000), 0.5, full_tissue((62, 6), 16.0), TileSpec())
    assert len(grid) == 0
    assert grid.size_level0_px == pytest.approx(150.0)


def test_spacing_finer_than_slide_is_an_error() -> None:
    tissue = full_tissue((128, 128), 16.0)
    with pytest.raises(InvalidParameterError) as excinfo:
        build_tile_grid((2048, 2048), 0.5, tissue, TileSpec(spacing_um_px=0.25))
    assert "0.25" in str(excinfo.value) and "0.5" in str(excinfo.value)
    # a hair finer (CMU's 0.499 um/px against 0.5, or the reverse) is the same magnification: allowed
    assert len(build_tile_grid((2048, 2048), 0.5, tissue, TileSpec(spacing_um_px=0.499))) > 0
    assert len(build_tile_grid((2048, 2048), 0.499, tissue, TileSpec(spacing_um_px=0.5))) > 0


# -- grid on a synthetic slide against its geometry -----------------------------------------------------------
def test_grid_on_synthetic_slide_matches_geometry(synthetic_tissue: TissueMask) -> None:
    spec = TileSpec()
    grid = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, spec)
    side = grid.size_level0_px
    assert side == pytest.approx(150.0)
    assert len(grid) > 20
    assert (grid.tissue_fraction >= spec.min_tissue_fraction).all()
    assert (grid.tissue_fraction <= 1.0).all()
    assert_disjoint_and_on_slide(grid, 2048, 2048)
    # tiles sit on the grid of side 150 px from the origin
    np.testing.assert_allclose(grid.x_level0_px / side, np.round(grid.x_level0_px / side), atol=1e-9)
    np.testing.assert_allclose(grid.y_level0_px / side, np.round(grid.y_level0_px / side), atol=1e-9)

    expected = analytic_tile_fractions(side, int(2048 // side))
    want = set(zip(*np.nonzero(expected >= spec.min_tissue_fraction)))
    rows = np.round(grid.y_level0_px / side).astype(int)
    cols = np.round(grid.x_level0_px / side).astype(int)
    got = set(zip(rows, cols))
    assert len(got) == len(grid)  # each tile once
    assert abs(len(got) - len(want)) <= 2
    assert len(got ^ want) <= 3  # only tiles right at the 50 % line may differ
    # each kept tile's tissue fraction is close to the geometric one
    np.testing.assert_allclose(grid.tissue_fraction, expected[rows, cols], atol=0.1)


def test_higher_threshold_keeps_a_subset(synthetic_tissue: TissueMask) -> None:
    loose = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec(min_tissue_fraction=0.1))
    default = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec())
    strict = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec(min_tissue_fraction=1.0))
    assert len(loose) > len(default) > len(strict) > 0
    loose_set = set(zip(loose.x_level0_px, loose.y_level0_px))
    assert set(zip(default.x_level0_px, default.y_level0_px)) <= loose_set
    assert (strict.tissue_fraction == 1.0).all()


@pytest.mark.parametrize(
    "region",
    [
        shapely.box(0, 0, 1024, 2048),  # left half
        Point(900, 900).buffer(400),  # a disc
        MultiPolygon([shapely.box(0, 0, 700, 700), shapely.box(1300, 1100, 2048, 2048)]),
    ],
)
def test_regions_keep_tiles_whose_centres_are_inside(synthetic_tissue: TissueMask, region) -> None:
    full = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec())
    restricted = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec(), regions=region)
    side = full.size_level0_px
    centres = [Point(x + side / 2, y + side / 2) for x, y in zip(full.x_level0_px, full.y_level0_px)]
    inside = np.array([region.contains(c) for c in centres])
    assert 0 < inside.sum() < len(full)  # the premise: the region cuts the tissue
    np.testing.assert_array_equal(restricted.x_level0_px, full.x_level0_px[inside])
    np.testing.assert_array_equal(restricted.y_level0_px, full.y_level0_px[inside])
    np.testing.assert_array_equal(restricted.tissue_fraction, full.tissue_fraction[inside])
    assert restricted.size_level0_px == side
    assert restricted.spec == full.spec


def test_region_outside_tissue_gives_empty_grid(synthetic_tissue: TissueMask) -> None:
    grid = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec(), regions=shapely.box(0, 1900, 300, 2048))
    assert len(grid) == 0


def test_grid_on_cmu_non_integer_tile_side(cmu_slide: Path) -> None:
    with Slide(cmu_slide) as slide:
        tissue = detect_tissue(slide)
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, tissue, TileSpec())
    assert grid.size_level0_px == pytest.approx(75.0 / 0.499)
    assert 50 < len(grid) < 200  # about a third of the (14 x 19) grid is tissue
    assert (grid.tissue_fraction >= 0.5).all()
    assert_disjoint_and_on_slide(grid, 2220, 2967)
    # most kept tiles' centres lie in the tissue polygons
    side = grid.size_level0_px
    centres = shapely.points(grid.x_level0_px + side / 2, grid.y_level0_px + side / 2)
    assert shapely.contains(tissue.polygons, centres).mean() > 0.9


def test_subset_keeps_spec_and_side(synthetic_tissue: TissueMask) -> None:
    grid = build_tile_grid((2048, 2048), 0.5, synthetic_tissue, TileSpec())
    half = grid.subset(np.arange(len(grid)) % 2 == 0)
    assert len(half) == (len(grid) + 1) // 2
    assert half.size_level0_px == grid.size_level0_px and half.spec is grid.spec
    np.testing.assert_array_equal(half.x_level0_px, grid.x_level0_px[::2])
