"""Quantification: which region each tile lies in, and the tissue composition of each region.

A tile belongs to the region that covers the largest part of it; a tile that touches no region is
"unassigned". Percentages are of the region's classified tiles; areas are tile counts times the tile area.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import shapely
from hepatoquant_client.classes import HEADLINE_INDICATORS

from hepatoquant.regions import Region
from hepatoquant.tiling import TileGrid

__all__ = ["UNASSIGNED", "RegionComposition", "Composition", "assign_tiles", "quantify"]

UNASSIGNED = -1
UM2_PER_MM2 = 1e6


def assign_tiles(grid: TileGrid, regions: list[Region]) -> np.ndarray:
    """Index into ``regions`` of the region covering most of each tile, or ``UNASSIGNED`` (-1).

    Equal cover (nested regions that both hold the whole tile) goes to a tumour region first, then to the
    smaller (inner) region, then to the earlier one. Tiles wholly inside a region are found with prepared
    geometries; only tiles on a region's outline are intersected, so the cost does not grow with
    tiles x outline vertices.
    """
    assignment = np.full(len(grid), UNASSIGNED, dtype=np.int64)
    if not len(grid) or not regions:
        return assignment
    geometries = np.array([r.geometry for r in regions], dtype=object)
    shapely.prepare(geometries)
    boxes = grid.boxes()
    # The tree holds the tiles and the (prepared) regions query it: preparing each tile against a region of
    # thousands of vertices instead was 100x slower (5.1 s vs 0.05 s for 20,000 tiles and vertices).
    region_index, tile_index = shapely.STRtree(boxes).query(geometries, predicate="intersects")
    if not len(tile_index):
        return assignment
    cover = np.ones(len(tile_index))  # fraction of the tile inside the region
    edge = ~shapely.contains_properly(geometries[region_index], boxes[tile_index])
    size = grid.size_level0_px
    # Tiles on an outline: clipping the region to the tile's rectangle is ~6x faster than a general overlay.
    cover[edge] = [
        shapely.clip_by_rect(geometries[r], x, y, x + size, y + size).area / size**2
        for r, x, y in zip(region_index[edge], grid.x_level0_px[tile_index[edge]], grid.y_level0_px[tile_index[edge]])
    ]
    cover = np.round(cover, 6)  # equal cover compares equal despite floating-point noise
    not_tumour = np.array([r.region_class != "tumour" for r in regions])[region_index]
    region_area = shapely.area(geometries)[region_index]
    # Sort by tile, then decreasing cover, tumour first, smaller region first, file order: first row wins.
    order = np.lexsort((region_index, region_area, not_tumour, -cover, tile_index))
    tile_sorted, region_sorted, cover_sorted = tile_index[order], region_index[order], cover[order]
    first = np.r_[True, tile_sorted[1:] != tile_sorted[:-1]]
    winners = first & (cover_sorted > 0)
    assignment[tile_sorted[winners]] = region_sorted[winners]
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
    class_percent: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Composition:
    """Per region, per region class (tumour / non_tumour / tissue / unassigned), and the headline indicators."""

    regions: list[RegionComposition]
    region_classes: list[RegionComposition]
    headline_indicators: dict[str, dict[str, float]]

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
        class_percent={c: (100.0 * float(n) / total if total else 0.0) for c, n in zip(classes, counts)},
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
        c.region_class: {code: c.class_percent[code] for code in HEADLINE_INDICATORS[c.region_class] if code in classes}
        for c in per_class
        if c.region_class in HEADLINE_INDICATORS
    }
    return Composition(regions=per_region, region_classes=per_class, headline_indicators=headline)
