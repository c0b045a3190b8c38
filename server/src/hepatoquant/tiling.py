"""The tile grid: square tiles of a fixed physical size laid over the tissue.

A tile is defined in physical units (default 150 px at 0.5 um/px, i.e. 75 um, the HepatoBench patch) and
placed on a regular grid in level-0 pixels; it is kept when enough of it is tissue and, if regions are given,
when its centre lies inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from hepatoquant.errors import InvalidParameterError
from hepatoquant.tissue import TissueMask

__all__ = ["TileSpec", "TileGrid", "build_tile_grid", "tissue_fraction_grid", "without_artefacts"]


@dataclass(frozen=True)
class TileSpec:
    """Tile size and magnification: ``tile_size_px`` pixels at ``spacing_um_px`` micrometres per pixel."""

    tile_size_px: int = 150
    spacing_um_px: float = 0.5
    min_tissue_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 16 <= self.tile_size_px <= 4096:
            raise InvalidParameterError(
                f"tile size {self.tile_size_px} px is outside 16..4096 px; HepatoBench tiles are 150 px"
            )
        if not 0.1 <= self.spacing_um_px <= 16.0:
            raise InvalidParameterError(
                f"tile spacing {self.spacing_um_px} um/px is outside 0.1..16 um/px; 20x is 0.5 um/px"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise InvalidParameterError(
                f"minimum tissue fraction {self.min_tissue_fraction} is outside 0..1"
            )

    @property
    def tile_size_um(self) -> float:
        return self.tile_size_px * self.spacing_um_px

    def tile_size_level0_px(self, slide_mpp_um_px: float) -> float:
        """Side of one tile in level-0 pixels of a slide with that pixel size (need not be an integer)."""
        return self.tile_size_um / slide_mpp_um_px


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles: top-left corners in level-0 pixels (float64) and each tile's tissue fraction.

    Every tile has side :attr:`size_level0_px`; tile ``i`` covers x in [x[i], x[i] + size) and likewise y.
    """

    x_level0_px: np.ndarray
    y_level0_px: np.ndarray
    size_level0_px: float
    tissue_fraction: np.ndarray
    spec: TileSpec

    def __len__(self) -> int:
        return int(self.x_level0_px.shape[0])

    def boxes(self) -> np.ndarray:
        """Shapely box geometries of all tiles, in level-0 pixels."""
        return shapely.box(
            self.x_level0_px,
            self.y_level0_px,
            self.x_level0_px + self.size_level0_px,
            self.y_level0_px + self.size_level0_px,
        )

    def subset(self, keep: np.ndarray) -> TileGrid:
        return TileGrid(
            self.x_level0_px[keep], self.y_level0_px[keep], self.size_level0_px, self.tissue_fraction[keep], self.spec
        )


def build_tile_grid(
    slide_size_px: tuple[int, int],
    slide_mpp_um_px: float,
    tissue: TissueMask,
    spec: TileSpec = TileSpec(),
    regions: BaseGeometry | None = None,
) -> TileGrid:
    """Tiles of ``spec`` over a slide of ``slide_size_px`` (level 0) that are mostly tissue.

    The tissue fraction of a tile is the mean of the tissue mask over the tile's footprint, computed with a
    summed-area table so the cost does not depend on the tile count. With ``regions`` (level-0 polygons),
    only tiles whose centre lies inside them are kept.
    """
    if spec.spacing_um_px < slide_mpp_um_px * 0.99:
        raise InvalidParameterError(
            f"tiles at {spec.spacing_um_px} um/px need a slide scanned at that resolution or finer, but this "
            f"slide's pixels are {slide_mpp_um_px} um; use a larger --tile-spacing or check --mpp"
        )
    side = spec.tile_size_level0_px(slide_mpp_um_px)
    width, height = slide_size_px
    cols, rows = int(width // side), int(height // side)
    if cols == 0 or rows == 0:
        empty = np.empty(0)
        return TileGrid(empty, empty, side, empty, spec)
    xs = np.arange(cols) * side
    ys = np.arange(rows) * side
    fraction = tissue_fraction_grid(tissue, xs, ys, side)  # (rows, cols)
    row_index, col_index = np.nonzero(fraction >= max(spec.min_tissue_fraction, 1e-9))
    grid = TileGrid(xs[col_index], ys[row_index], side, fraction[row_index, col_index], spec)
    if regions is not None and len(grid):
        centres_x = grid.x_level0_px + side / 2
        centres_y = grid.y_level0_px + side / 2
        grid = grid.subset(shapely.contains_xy(regions, centres_x, centres_y))
    return grid


def tissue_fraction_grid(tissue: TissueMask, xs: np.ndarray, ys: np.ndarray, side: float) -> np.ndarray:
    """Mean of the tissue mask over each tile of the grid (rows = ys, cols = xs), from a summed-area table."""
    mask_h, mask_w = tissue.mask.shape
    # int64 counts, cumulated in place: one array of the mask's size, whatever the slide's size.
    integral = np.zeros((mask_h + 1, mask_w + 1), dtype=np.int64)
    np.cumsum(tissue.mask, axis=0, dtype=np.int64, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    def edges(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(starts / tissue.downsample).astype(int), 0, limit)
        hi = np.clip(np.round((starts + side) / tissue.downsample).astype(int), 0, limit)
        hi = np.maximum(hi, np.minimum(lo + 1, limit))  # at least one mask pixel where the mask allows
        return lo, hi

    x0, x1 = edges(xs, mask_w)
    y0, y1 = edges(ys, mask_h)
    total = (
        integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)]
    ).astype(np.float64)
    area = np.outer(y1 - y0, x1 - x0).astype(np.float64)
    return np.divide(total, area, out=np.zeros_like(total), where=area > 0)


def without_artefacts(grid: TileGrid, artefacts: dict) -> tuple[TileGrid, dict[str, int]]:
    """The grid without tiles that touch an artefact (pen ink, ...), and how many each kind took away: a tile
    partly on ink would be classified on ink. The first kind touching a tile counts it."""
    excluded: dict[str, int] = {}
    if not len(grid) or not artefacts:
        return grid, excluded
    boxes = grid.boxes()
    keep = np.ones(len(grid), dtype=bool)
    for kind, geometry in artefacts.items():
        if geometry is None or geometry.is_empty:
            continue
        shapely.prepare(geometry)
        touching = keep & shapely.intersects(geometry, boxes) & ~shapely.touches(geometry, boxes)
        if touching.any():
            excluded[kind] = int(touching.sum())
            keep &= ~touching
    return grid.subset(keep), excluded
