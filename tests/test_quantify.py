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


def test_tile_goes_to_the_region_containing_its_centre() -> None:
    grid = _grid([0, 100, 200, 500], [0, 0, 0, 0])
    tumour = _region("t", "tumour", box(0, 0, 130, 100))  # covers tile 0 fully, 30% of tile 1
    normal = _region("n", "non_tumour", box(130, 0, 300, 100))  # 70% of tile 1 (its centre 150), all of tile 2
    assignment = assign_tiles(grid, [tumour, normal])
    assert assignment.tolist() == [0, 1, 1, UNASSIGNED]


def test_a_tile_whose_centre_is_outside_every_region_is_unassigned_however_much_it_overlaps() -> None:
    """QuPath nests by the centre alone: a tile 96 % inside a region whose centre lies in a notch of it, or one
    that a region touches by 0.4 %, is not under that region in QuPath, so it is not counted in it."""
    grid = _grid([0, 300], [0, 0])
    notched = _region("notched", "non_tumour", box(0, 0, 100, 100).difference(box(40, 40, 60, 60)))
    sliver = _region("sliver", "tumour", box(399.6, 0, 500, 100))  # 0.4 % of tile 1
    assert assign_tiles(grid, [notched, sliver]).tolist() == [UNASSIGNED, UNASSIGNED]


def test_a_centre_on_an_outline_is_inside_as_in_qupath() -> None:
    """QuPath 0.6.0 nested tiles whose centre lies exactly on an annotation's edge or corner under it (seen
    with the kit); the earlier region wins where two share that edge."""
    grid = _grid([50, 50], [0, 50])  # centres (100, 50) on the right edge; (100, 100) on the corner
    region = _region("r", "tumour", box(0, 0, 100, 100))
    assert assign_tiles(grid, [region]).tolist() == [0, 0]


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


def test_a_centre_in_nested_regions_goes_to_the_innermost_one() -> None:
    """QuPath nests a tile under the deepest annotation containing its centre: the smallest one."""
    grid = _grid([0, 500], [0, 0])
    outer = _region("outer", "non_tumour", box(0, 0, 1000, 1000))
    inner_normal = _region("inner", "non_tumour", box(400, 0, 700, 200))
    tumour = _region("t", "tumour", box(0, 0, 200, 200))
    assert assign_tiles(grid, [outer, tumour, inner_normal]).tolist() == [1, 2]
    assert assign_tiles(grid, [inner_normal, tumour, outer]).tolist() == [1, 0]


def test_assignment_follows_the_centre_on_a_curved_outline() -> None:
    from shapely.geometry import Point

    disc = Point(500, 500).buffer(300, quad_segs=256)
    xs = [x for x in range(0, 1000, 100) for _ in range(10)]
    ys = [y for _ in range(10) for y in range(0, 1000, 100)]
    grid = _grid(xs, ys)
    assignment = assign_tiles(grid, [_region("d", "tumour", disc)])
    expected = [disc.intersects(Point(x + 50, y + 50)) for x, y in zip(xs, ys)]
    assert (assignment == 0).tolist() == expected
    assert 0 < sum(expected) < sum(disc.intersects(box(x, y, x + 100, y + 100)) for x, y in zip(xs, ys))


def test_a_region_without_tiles_has_no_composition_not_zero_percent() -> None:
    grid = _grid([0], [0])
    tumour = _region("t", "tumour", box(0, 0, 100, 100))
    empty_normal = _region("n", "non_tumour", box(500, 500, 520, 520))  # holds no tile centre
    regions = [tumour, empty_normal]
    composition = quantify(grid, np.array([2]), CLASSES, regions, assign_tiles(grid, regions), 0.5)
    t, n = composition.regions
    assert t.class_percent == {"TUM": 0.0, "FIB": 0.0, "INF": 100.0, "NEC": 0.0, "NOR": 0.0, "REA": 0.0, "STE": 0.0}
    assert t.no_data is None
    assert n.tile_count == 0 and n.class_percent is None and "no tile" in n.no_data
    assert n.class_tiles == dict.fromkeys(CLASSES, 0)  # counts stay: zero tiles is a count
    assert composition.headline_indicators["non_tumour"] == {"STE": None, "REA": None, "FIB": None, "INF": None}
    assert composition.headline_indicators["tumour"]["INF"] == pytest.approx(100.0)
    assert composition.to_dict()["regions"][1]["class_percent"] is None
