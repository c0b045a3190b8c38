"""Quantification: which region each tile lies in, and the tissue composition of each region.

A tile belongs to the region that contains its **centre**: QuPath's own rule (``resolveHierarchy()`` and
``insertObjects`` nest a detection under the annotation containing its ROI's centre), so that the counts in the
report, the CSV, the regions' ``HQ tiles`` measurements and what QuPath nests under each region are the same
numbers. A tile whose centre lies in no region is "unassigned" (it stays at the root of QuPath's hierarchy) and is
reported as such. Percentages are of the region's classified tiles; a region without tiles has no percentages
(``None``: no data, not zero). Areas are tile counts times the tile area.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import shapely
from hepatoquant_client.classes import HEADLINE_INDICATORS

from hepatoquant.regions import Region
from hepatoquant.tiling import TileGrid

__all__ = ["UNASSIGNED", "NO_TILES", "RegionComposition", "Composition", "assign_tiles", "quantify"]

UNASSIGNED = -1
UM2_PER_MM2 = 1e6
#: Why a region has no percentages: said in the report beside the empty composition.
NO_TILES = "no tile has its centre in this region, so it has no composition (no data, not 0 %)"


def assign_tiles(grid: TileGrid, regions: list[Region]) -> np.ndarray:
    """Index into ``regions`` of the region containing each tile's centre, or ``UNASSIGNED`` (-1).

    A centre exactly on an outline counts as inside, as in QuPath. Regions should not overlap (user
    annotations are made disjoint by :mod:`hepatoquant.regions`; segmenter regions and the whole tissue are
    disjoint by construction), because QuPath resolves overlaps by its own insertion order (the inner one of
    nested annotations, the larger one of partly overlapping ones): a centre in several regions goes here to
    the smallest (QuPath's answer for nested ones), equal areas to the earlier region.
    """
    assignment = np.full(len(grid), UNASSIGNED, dtype=np.int64)
    if not len(grid) or not regions:
        return assignment
    half = grid.size_level0_px / 2
    centres = shapely.points(grid.x_level0_px + half, grid.y_level0_px + half)
    geometries = np.array([r.geometry for r in regions], dtype=object)
    # The tree holds the centres and each region queries it once: cost grows with tiles + regions, not their product.
    region_index, tile_index = shapely.STRtree(centres).query(geometries, predicate="intersects")
    if not len(tile_index):
        return assignment
    # Per tile: smallest region first, then the earlier one; the first row of each tile wins.
    order = np.lexsort((region_index, shapely.area(geometries)[region_index], tile_index))
    tiles, owners = tile_index[order], region_index[order]
    first = np.r_[True, tiles[1:] != tiles[:-1]]
    assignment[tiles[first]] = owners[first]
    return assignment


@dataclass(frozen=True)
class RegionComposition:
    """Composition of one region (or of all regions of one class): tiles and areas per tissue class."""

    name: str
    region_class: str
    source: str
    source_class: str | None
    region_area_mm2: float | None  # polygon area; None for the unassigned remainder
    tile_count: int
    tile_area_mm2: float
    class_tiles: dict[str, int]
    class_area_mm2: dict[str, float]
    class_percent: dict[str, float] | None  # None: no tiles, so no composition (never 0 %)
    no_data: str | None = None  # why class_percent is None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Composition:
    """Per region, per region class (tumour / non_tumour / tissue / unassigned), and the headline indicators."""

    regions: list[RegionComposition]
    region_classes: list[RegionComposition]
    headline_indicators: dict[str, dict[str, float | None]]  # None where the region class has no tiles

    @property
    def outside_regions(self) -> tuple[int, float]:
        """Tiles whose centre lies in no region, and their area in mm^2 (the ``unassigned`` entry; 0 without)."""
        entry = next((c for c in self.region_classes if c.region_class == "unassigned"), None)
        return (entry.tile_count, entry.tile_area_mm2) if entry is not None else (0, 0.0)

    def to_dict(self) -> dict:
        return {
            "regions": [r.to_dict() for r in self.regions],
            "region_classes": [r.to_dict() for r in self.region_classes],
            "headline_indicators_percent": self.headline_indicators,
        }


def _compose(
    *,
    name: str,
    region_class: str,
    source: str,
    source_class: str | None,
    region_area_mm2: float | None,
    predicted: np.ndarray,
    classes: tuple[str, ...],
    tile_area_mm2: float,
) -> RegionComposition:
    counts = np.bincount(predicted, minlength=len(classes)) if len(predicted) else np.zeros(len(classes), int)
    total = int(counts.sum())
    return RegionComposition(
        name=name,
        region_class=region_class,
        source=source,
        source_class=source_class,
        region_area_mm2=region_area_mm2,
        tile_count=total,
        tile_area_mm2=total * tile_area_mm2,
        class_tiles={c: int(n) for c, n in zip(classes, counts)},
        class_area_mm2={c: float(n * tile_area_mm2) for c, n in zip(classes, counts)},
        class_percent={c: 100.0 * float(n) / total for c, n in zip(classes, counts)} if total else None,
        no_data=None if total else NO_TILES,
    )


def quantify(
    grid: TileGrid,
    predicted_class: np.ndarray,
    classes: tuple[str, ...],
    regions: list[Region],
    assignment: np.ndarray,
    slide_mpp_um_px: float,
) -> Composition:
    """Composition of every region, of every region class, and the paper's headline indicators (percent)."""
    tile_area_mm2 = (grid.size_level0_px * slide_mpp_um_px) ** 2 / UM2_PER_MM2
    px_area_mm2 = slide_mpp_um_px**2 / UM2_PER_MM2
    per_region = [
        _compose(
            name=region.name,
            region_class=region.region_class,
            source=region.source,
            source_class=region.source_class,
            region_area_mm2=float(region.geometry.area) * px_area_mm2,
            predicted=predicted_class[assignment == index],
            classes=classes,
            tile_area_mm2=tile_area_mm2,
        )
        for index, region in enumerate(regions)
    ]
    per_class: list[RegionComposition] = []
    for region_class in dict.fromkeys(r.region_class for r in regions):
        members = [i for i, r in enumerate(regions) if r.region_class == region_class]
        per_class.append(
            _compose(
                name=region_class,
                region_class=region_class,
                source="aggregate",
                source_class=None,
                region_area_mm2=float(shapely.union_all([regions[i].geometry for i in members]).area) * px_area_mm2,
                predicted=predicted_class[np.isin(assignment, members)],
                classes=classes,
                tile_area_mm2=tile_area_mm2,
            )
        )
    unassigned = assignment == UNASSIGNED
    if unassigned.any():
        per_class.append(
            _compose(
                name="unassigned",
                region_class="unassigned",
                source="aggregate",
                source_class=None,
                region_area_mm2=None,
                predicted=predicted_class[unassigned],
                classes=classes,
                tile_area_mm2=tile_area_mm2,
            )
        )
    headline = {
        c.region_class: {
            code: (c.class_percent[code] if c.class_percent is not None else None)
            for code in HEADLINE_INDICATORS[c.region_class]
            if code in classes
        }
        for c in per_class
        if c.region_class in HEADLINE_INDICATORS
    }
    return Composition(regions=per_region, region_classes=per_class, headline_indicators=headline)
