"""Tile-to-region assignment and composition arithmetic, on hand-made grids where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, box

from hepatoquant.quantify import UNASSIGNED, assign_tiles, quantify
from hepatoquant.regions import Region
from hepatoquant.tiling import TileGrid, TileSpec

CLASSES = ("TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE")


def _grid(xs: list[float], ys: list[float], size: float = 100.0) -> TileGrid:
    return TileGrid(np.array(xs, float), np.array(ys, float), size, np.ones(len(xs)), TileSpec())


def _region(name: str, region_class: str, geometry) -> Region:
    return Region(name=name, region_class=region_class, geometry=geometry, source="user", source_class=None)


def test_tile_goes_to_the_region_covering_most_of_it() -> None:
    grid = _grid([0, 100, 200, 500], [0, 0, 0, 0])
    tumour = _region("t", "tumour", box(0, 0, 130, 100))  # covers tile 0 fully, 30% of tile 1
    normal = _region("n", "non_tumour", box(130, 0, 300, 100))  # 70% of tile 1, all of tile 2
    assignment = assign_tiles(grid, [tumour, normal])
    assert assignment.tolist() == [0, 1, 1, UNASSIGNED]


def test_equal_overlap_goes_to_the_first_region_and_touching_is_not_overlap() -> None:
    grid = _grid([0, 300], [0, 0])
    left = _region("a", "tumour", box(0, 0, 50, 100))
    right = _region("b", "non_tumour", box(50, 0, 100, 100))
    touching = _region("c", "non_tumour", box(400, 0, 500, 100))  # shares only an edge with tile 1
    assert assign_tiles(grid, [left, right, touching]).tolist() == [0, UNASSIGNED]


def test_no_regions_or_no_tiles() -> None:
    assert assign_tiles(_grid([0], [0]), []).tolist() == [UNASSIGNED]
    assert assign_tiles(_grid([], []), [_region("a", "tumour", box(0, 0, 1, 1))]).tolist() == []


def test_composition_counts_areas_percentages_and_headline_indicators() -> None:
    grid = _grid([0, 100, 200, 300, 400, 900], [0, 0, 0, 0, 0, 0])
    tumour = _region("T1", "tumour", box(0, 0, 200, 100))
    normal = _region("N1", "non_tumour", MultiPolygon([box(200, 0, 300, 100), box(400, 0, 500, 100)]))
    normal2 = _region("N2", "non_tumour", box(300, 0, 400, 100))
    predicted = np.array([0, 3, 6, 6, 1, 4])  # TUM NEC | STE | STE | FIB | NOR (unassigned)
    regions = [tumour, normal, normal2]
    assignment = assign_tiles(grid, regions)
    mpp = 0.5
    composition = quantify(grid, predicted, CLASSES, regions, assignment, mpp)

    tile_mm2 = (100 * mpp) ** 2 / 1e6
    t1, n1, n2 = composition.regions
    assert t1.tile_count == 2 and t1.class_tiles["TUM"] == 1 and t1.class_tiles["NEC"] == 1
    assert t1.class_percent["TUM"] == pytest.approx(50.0)
    assert t1.tile_area_mm2 == pytest.approx(2 * tile_mm2)
    assert t1.region_area_mm2 == pytest.approx(200 * 100 * mpp**2 / 1e6)
    assert n1.class_tiles["STE"] == 1 and n1.class_tiles["FIB"] == 1 and n2.class_tiles["STE"] == 1

    by_class = {c.region_class: c for c in composition.region_classes}
    assert set(by_class) == {"tumour", "non_tumour", "unassigned"}
    non_tumour = by_class["non_tumour"]
    assert non_tumour.tile_count == 3
    assert non_tumour.class_percent["STE"] == pytest.approx(200 / 3)
    assert non_tumour.class_area_mm2["STE"] == pytest.approx(2 * tile_mm2)
    assert by_class["unassigned"].class_tiles["NOR"] == 1 and by_class["unassigned"].region_area_mm2 is None
    assert sum(c.tile_count for c in composition.region_classes) == len(grid)

    headline = composition.headline_indicators
    assert set(headline["tumour"]) == {"NEC", "FIB", "INF"} and headline["tumour"]["NEC"] == pytest.approx(50.0)
    assert set(headline["non_tumour"]) == {"STE", "REA", "FIB", "INF"}
    assert headline["non_tumour"]["FIB"] == pytest.approx(100 / 3)


def test_percentages_of_every_region_sum_to_100() -> None:
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 50, 300) * 100.0
    ys = rng.integers(0, 50, 300) * 100.0
    grid = _grid(list(xs), list(ys))
    regions = [_region("a", "tumour", box(0, 0, 2500, 5000)), _region("b", "non_tumour", box(2500, 0, 5000, 5000))]
    composition = quantify(grid, rng.integers(0, 7, 300), CLASSES, regions, assign_tiles(grid, regions), 0.5)
    for entry in composition.regions + composition.region_classes:
        if entry.tile_count:
            assert sum(entry.class_percent.values()) == pytest.approx(100.0)
            assert sum(entry.class_tiles.values()) == entry.tile_count


def test_nested_regions_that_both_hold_a_tile_give_it_to_the_tumour_then_the_inner_one() -> None:
    grid = _grid([0, 500], [0, 0])
    outer = _region("outer", "non_tumour", box(0, 0, 1000, 1000))
    inner_normal = _region("inner", "non_tumour", box(400, 0, 700, 200))
    tumour = _region("t", "tumour", box(0, 0, 200, 200))
    assert assign_tiles(grid, [outer, tumour, inner_normal]).tolist() == [1, 2]


def test_assignment_counts_partial_cover_on_outlines_exactly() -> None:
    """Interior tiles use the fast containment path; tiles on the outline are intersected."""
    from shapely.geometry import Point

    disc = Point(500, 500).buffer(300, quad_segs=256)
    xs = [x for x in range(0, 1000, 100) for _ in range(10)]
    ys = [y for _ in range(10) for y in range(0, 1000, 100)]
    grid = _grid(xs, ys)
    assignment = assign_tiles(grid, [_region("d", "tumour", disc)])
    expected = [disc.intersection(box(x, y, x + 100, y + 100)).area > 0 for x, y in zip(xs, ys)]
    assert (assignment == 0).tolist() == expected
