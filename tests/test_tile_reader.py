"""Tests of ``hepatoquant.tile_reader``: batches in grid order, every tile once, pixels exactly those of
``Slide.read_scaled``, the same whatever the batching and threading, and no thread left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from hepatoquant.errors import CorruptSlideError, InvalidParameterError
from hepatoquant.slide import Slide
from hepatoquant.tile_reader import TileBatch, iter_tile_batches
from hepatoquant.tiling import TileGrid, TileSpec, build_tile_grid
from hepatoquant.tissue import detect_tissue

OUT_PX = 64


def reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tile-reader") and t.is_alive()}


@pytest.fixture(scope="module")
def synthetic_grid(synthetic_slide: Path) -> TileGrid:
    with Slide(synthetic_slide) as slide:
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, detect_tissue(slide), TileSpec())
    assert len(grid) > 40
    return grid


@pytest.fixture(scope="module")
def expected_pixels(synthetic_slide: Path, synthetic_grid: TileGrid) -> np.ndarray:
    """Every tile read one by one with Slide.read_scaled: the reference."""
    side = synthetic_grid.size_level0_px
    with Slide(synthetic_slide) as slide:
        return np.stack([
            slide.read_scaled((x, y), (side, side), (OUT_PX, OUT_PX))
            for x, y in zip(synthetic_grid.x_level0_px, synthetic_grid.y_level0_px)
        ])


def collect(batches) -> tuple[list[TileBatch], np.ndarray]:
    batches = list(batches)
    return batches, np.concatenate([b.pixels for b in batches]) if batches else np.empty((0,))


def test_batches_in_order_cover_every_tile_once(
    synthetic_slide: Path, synthetic_grid: TileGrid, expected_pixels: np.ndarray
) -> None:
    batches, pixels = collect(iter_tile_batches(synthetic_slide, synthetic_grid, out_size_px=OUT_PX, batch_size=8))
    assert [b.start for b in batches] == list(range(0, len(synthetic_grid), 8))
    assert all(len(b) == 8 for b in batches[:-1])
    assert 1 <= len(batches[-1]) <= 8
    assert sum(len(b) for b in batches) == len(synthetic_grid)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(synthetic_grid), OUT_PX, OUT_PX, 3)
    np.testing.assert_array_equal(pixels, expected_pixels)  # exact, tile for tile, in grid order


@pytest.mark.parametrize(
    ("batch_size", "num_workers", "prefetch"),
    [(1, 1, None), (5, 2, None), (7, 4, 1), (13, 3, 8), (32, 2, None), (1000, 2, None)],
)
def test_batching_and_workers_do_not_change_pixels(
    synthetic_slide: Path,
    synthetic_grid: TileGrid,
    expected_pixels: np.ndarray,
    batch_size: int,
    num_workers: int,
    prefetch: int | None,
) -> None:
    batches, pixels = collect(iter_tile_batches(
        synthetic_slide, synthetic_grid, out_size_px=OUT_PX, batch_size=batch_size,
        num_workers=num_workers, prefetch_batches=prefetch,
    ))
    assert [b.start for b in batches] == list(range(0, len(synthetic_grid), batch_size))
    np.testing.assert_array_equal(pixels, expected_pixels)


def test_reads_best_level_on_slide_without_mpp(tcga_slide: Path) -> None:
    """A hand-made grid of 300 px tiles read to 150 px (2x: level 1 at 2.0005x) from the MPP-less TCGA slide:
    the reader works in level-0 pixels and never needs the MPP."""
    xs, ys = np.meshgrid(np.arange(4) * 300.0 + 1200, np.arange(3) * 300.0 + 900)
    grid = TileGrid(xs.ravel(), ys.ravel(), 300.0, np.ones(xs.size), TileSpec(spacing_um_px=1.0))
    batches, pixels = collect(iter_tile_batches(tcga_slide, grid, out_size_px=150, batch_size=5, num_workers=2))
    assert [b.start for b in batches] == [0, 5, 10]
    with Slide(tcga_slide) as slide:
        expected = np.stack([
            slide.read_scaled((x, y), (300.0, 300.0), (150, 150)) for x, y in zip(grid.x_level0_px, grid.y_level0_px)
        ])
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.std() > 5  # real tissue, not blank


def test_empty_grid_yields_nothing(synthetic_slide: Path) -> None:
    empty = TileGrid(np.empty(0), np.empty(0), 150.0, np.empty(0), TileSpec())
    before = reader_threads()
    assert list(iter_tile_batches(synthetic_slide, empty, out_size_px=OUT_PX)) == []
    assert reader_threads() - before == set()


@pytest.mark.parametrize(("batch_size", "num_workers"), [(0, 2), (-3, 2), (8, 0), (8, -1)])
def test_invalid_batch_size_or_workers(
    synthetic_slide: Path, synthetic_grid: TileGrid, batch_size: int, num_workers: int
) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        list(iter_tile_batches(synthetic_slide, synthetic_grid, out_size_px=OUT_PX, batch_size=batch_size,
                               num_workers=num_workers))
    assert str(batch_size) in str(excinfo.value) and str(num_workers) in str(excinfo.value)


def test_early_break_shuts_threads_down(
    synthetic_slide: Path, synthetic_grid: TileGrid, expected_pixels: np.ndarray
) -> None:
    before = reader_threads()
    outcome: dict[str, object] = {}

    def consume() -> None:
        batches = iter_tile_batches(synthetic_slide, synthetic_grid, out_size_px=OUT_PX, batch_size=2, num_workers=3)
        for batch in batches:
            outcome["first"] = batch
            outcome["threads_while_running"] = len(reader_threads() - before)
            break
        batches.close()  # what a for loop's early exit leads to once the generator is dropped
        outcome["closed"] = True

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "closing the tile generator early hung"
    assert outcome.get("closed") is True
    first = outcome["first"]
    assert isinstance(first, TileBatch) and first.start == 0
    np.testing.assert_array_equal(first.pixels, expected_pixels[:2])
    assert outcome["threads_while_running"] >= 1
    assert reader_threads() - before == set()  # every worker thread has ended


def test_dropping_generator_mid_way_shuts_threads_down(synthetic_slide: Path, synthetic_grid: TileGrid) -> None:
    before = reader_threads()
    batches = iter_tile_batches(synthetic_slide, synthetic_grid, out_size_px=OUT_PX, batch_size=3, num_workers=2)
    assert next(batches).start == 0
    assert next(batches).start == 3
    del batches  # CPython closes the generator when its last reference goes
    assert reader_threads() - before == set()


def test_read_error_propagates_and_threads_end(damaged_cmu_slide: Path) -> None:
    path = damaged_cmu_slide
    xs, ys = np.meshgrid(np.arange(5) * 150.0, np.arange(5) * 150.0)
    grid = TileGrid(xs.ravel(), ys.ravel(), 150.0, np.ones(xs.size), TileSpec())
    before = reader_threads()
    with pytest.raises(CorruptSlideError) as excinfo:
        list(iter_tile_batches(path, grid, out_size_px=OUT_PX, batch_size=4, num_workers=2))
    assert str(path) in str(excinfo.value)
    assert reader_threads() - before == set()


def test_a_failure_in_the_consumer_ends_the_reader_threads(synthetic_slide) -> None:
    """What analyze_slide does when classification or cancellation raises mid-slide."""
    import contextlib
    import threading

    import cv2

    from hepatoquant.slide import Slide
    from hepatoquant.tiling import build_tile_grid
    from hepatoquant.tissue import detect_tissue

    with Slide(synthetic_slide) as slide:
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, detect_tissue(slide))
    before = {t for t in threading.enumerate() if t.name.startswith("tile-reader")}
    opencv_threads = cv2.getNumThreads()
    kept_error = None
    try:
        batches = iter_tile_batches(synthetic_slide, grid, out_size_px=32, batch_size=4, num_workers=2)
        with contextlib.closing(batches):
            for _ in batches:
                raise RuntimeError("cancelled")
    except RuntimeError as exc:
        kept_error = exc  # a server keeps the error (and so the frame) alive: closing must not rely on GC
    assert kept_error is not None
    assert {t for t in threading.enumerate() if t.name.startswith("tile-reader")} == before
    assert cv2.getNumThreads() == opencv_threads
