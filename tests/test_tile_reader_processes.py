"""Reader processes (``iter_tile_batches(readers="processes")``, issue 20): the same pixels and focus scores as
reader threads on real slides; errors, a reader process that dies and early closing leave nothing behind and
the next reading works; and ``auto`` picks processes only for a GPU."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hepatoquant import tile_reader
from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.errors import CorruptSlideError, InvalidParameterError
from hepatoquant.slide import Slide
from hepatoquant.tile_reader import iter_tile_batches, resolve_readers
from hepatoquant.tiling import TileGrid, TileSpec, build_tile_grid
from hepatoquant.tissue import detect_tissue


def _grid(slide_path: Path, limit: int | None = None) -> TileGrid:
    with Slide(slide_path) as slide:
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, detect_tissue(slide), TileSpec())
    return grid if limit is None else grid.subset(np.arange(min(limit, len(grid))))


def _read(slide_path: Path, grid: TileGrid, readers: str, **kwargs) -> tuple[list[int], np.ndarray, np.ndarray]:
    batches = list(iter_tile_batches(slide_path, grid, out_size_px=kwargs.pop("out_size_px", 224),
                                     readers=readers, **kwargs))
    focus = [b.focus for b in batches if b.focus is not None]
    return ([b.start for b in batches], np.concatenate([b.pixels for b in batches]),
            np.concatenate(focus) if focus else np.empty(0))


def _our_shared_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


@pytest.mark.parametrize("slide_name", ["cmu_slide", "tcga_slide"])
def test_processes_read_what_threads_read_on_real_slides(slide_name: str, request) -> None:
    slide_path = request.getfixturevalue(slide_name)
    if slide_name == "tcga_slide":  # no MPP: 300 px tiles read to 150 px from level 1, as the thread test does
        xs, ys = np.meshgrid(np.arange(6) * 300.0 + 1200, np.arange(5) * 300.0 + 900)
        grid = TileGrid(xs.ravel(), ys.ravel(), 300.0, np.ones(xs.size), TileSpec(spacing_um_px=1.0))
        kwargs = {"out_size_px": 150}
    else:
        grid = _grid(slide_path)
        kwargs = {"focus_px": 150}
    before = _our_shared_blocks()
    threads = _read(slide_path, grid, "threads", batch_size=7, **kwargs)
    processes = _read(slide_path, grid, "processes", batch_size=7, num_workers=3, **kwargs)
    assert processes[0] == threads[0] == list(range(0, len(grid), 7))
    np.testing.assert_array_equal(processes[1], threads[1])  # exact, tile for tile
    np.testing.assert_array_equal(processes[2], threads[2])  # focus scores too (empty for the window-like read)
    assert processes[1].std() > 5  # real tissue
    assert _our_shared_blocks() == before  # the shared block is gone with the reading


def test_an_error_in_a_reader_process_names_the_slide_and_the_next_reading_works(damaged_cmu_slide: Path,
                                                                                 cmu_slide: Path) -> None:
    damaged = damaged_cmu_slide
    xs, ys = np.meshgrid(np.arange(5) * 150.0, np.arange(5) * 150.0)
    grid = TileGrid(xs.ravel(), ys.ravel(), 150.0, np.ones(xs.size), TileSpec())
    before = _our_shared_blocks()
    with pytest.raises(CorruptSlideError) as excinfo:
        _read(damaged, grid, "processes", batch_size=4, num_workers=2, out_size_px=64)
    assert str(damaged) in str(excinfo.value)
    assert _our_shared_blocks() == before
    starts, pixels, _ = _read(cmu_slide, grid, "processes", batch_size=4, num_workers=2, out_size_px=64)
    assert starts == list(range(0, 25, 4)) and pixels.std() > 5


def test_a_reader_process_that_dies_fails_the_reading_clearly_and_a_new_one_serves_the_next(cmu_slide: Path) -> None:
    grid = _grid(cmu_slide)
    batches = iter_tile_batches(cmu_slide, grid, out_size_px=64, batch_size=4, num_workers=2, readers="processes")
    assert next(batches).start == 0
    pool = tile_reader._pools[2]
    for process in list(pool._processes.values()):  # as the kernel's OOM killer or a crash in a decoder would
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(CorruptSlideError) as excinfo:
        for _ in batches:
            pass
    message = str(excinfo.value)
    assert str(cmu_slide) in message and "process died" in message and "--workers" in message
    assert tile_reader._pools.get(2) is not pool  # the broken pool is not handed out again
    starts, pixels, _ = _read(cmu_slide, grid, "processes", batch_size=4, num_workers=2, out_size_px=64)
    assert starts == list(range(0, len(grid), 4))


def test_a_reader_that_died_between_batches_fails_the_next_submission_clearly(cmu_slide: Path) -> None:
    """The batches in flight were all read before the kill: the error comes when the next one is handed to the
    broken pool (it came out as a bare BrokenProcessPool)."""
    import time

    grid = _grid(cmu_slide)
    before = _our_shared_blocks()
    batches = iter_tile_batches(cmu_slide, grid, out_size_px=64, batch_size=4, num_workers=2, readers="processes")
    assert next(batches).start == 0
    time.sleep(1.0)  # the two batches in flight are read by now
    pool = tile_reader._pools[2]
    for process in list(pool._processes.values()):
        os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool._broken
    with pytest.raises(CorruptSlideError) as excinfo:
        for _ in batches:
            pass
    assert str(cmu_slide) in str(excinfo.value) and "process died" in str(excinfo.value)
    assert _our_shared_blocks() == before
    assert _read(cmu_slide, grid, "processes", batch_size=4, num_workers=2, out_size_px=64)[0] == \
        list(range(0, len(grid), 4))


def test_closing_early_keeps_the_processes_and_removes_the_shared_block(cmu_slide: Path) -> None:
    grid = _grid(cmu_slide)
    before = _our_shared_blocks()
    batches = iter_tile_batches(cmu_slide, grid, out_size_px=64, batch_size=4, num_workers=2, readers="processes")
    assert next(batches).start == 0
    assert len(_our_shared_blocks() - before) == 1
    pool = tile_reader._pools[2]
    batches.close()  # what analyze does when the consumer fails or the job is cancelled
    assert _our_shared_blocks() == before
    assert tile_reader._pools[2] is pool and all(p.is_alive() for p in pool._processes.values())


def test_a_slide_replaced_under_the_same_name_is_read_afresh(tmp_path: Path, cmu_slide: Path,
                                                              synthetic_slide: Path) -> None:
    """Reader processes keep slides open between readings: a new file at the same path must not be read
    through the old handle."""
    path = tmp_path / "slide.tiff"
    xs, ys = np.meshgrid(np.arange(3) * 150.0 + 300, np.arange(2) * 150.0 + 300)
    grid = TileGrid(xs.ravel(), ys.ravel(), 150.0, np.ones(xs.size), TileSpec())
    shutil.copy(cmu_slide, path)
    first = _read(path, grid, "processes", num_workers=1, out_size_px=64)[1]
    shutil.copy(synthetic_slide, path)
    second = _read(path, grid, "processes", num_workers=1, out_size_px=64)[1]
    np.testing.assert_array_equal(second, _read(path, grid, "threads", num_workers=1, out_size_px=64)[1])
    assert not np.array_equal(first, second)


def test_auto_readers_are_processes_on_a_gpu_only() -> None:
    assert resolve_readers("auto", torch.device("cuda", 0)) == "processes"
    assert resolve_readers("auto", torch.device("cpu")) == "threads"
    assert resolve_readers("processes", torch.device("cpu")) == "processes"
    with pytest.raises(InvalidParameterError, match="pigeons"):
        resolve_readers("pigeons", torch.device("cpu"))
    with pytest.raises(InvalidParameterError, match="pigeons"):
        AnalysisOptions(readers="pigeons")


def test_analyze_with_reader_processes_gives_the_same_result_and_says_so(
    cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pack = ensure_demo_pack(tmp_path_factory.mktemp("tiny-models"), encoder="test_vit_micro")
    threads = analyze_slide(cmu_slide, pack, AnalysisOptions(device="cpu", backend="torch", readers="threads"))
    processes = analyze_slide(cmu_slide, pack, AnalysisOptions(device="cpu", backend="torch",
                                                                    readers="processes"))
    assert (threads.readers, processes.readers) == ("threads", "processes")
    np.testing.assert_array_equal(processes.focus, threads.focus)
    np.testing.assert_allclose(processes.probabilities, threads.probabilities, atol=1e-6)
    assert processes.composition.to_dict() == threads.composition.to_dict()


def _read_in_a_child(slide_path: str) -> None:
    grid = _grid(Path(slide_path), limit=8)
    _read(Path(slide_path), grid, "processes", num_workers=2, out_size_px=32)


def test_a_spawned_process_that_used_reader_processes_exits(cmu_slide: Path) -> None:
    """A cohort worker is such a process: multiprocessing joins a process's children when it exits, and idle
    readers never end unless told to first (it hung for ever)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_read_in_a_child, args=(str(cmu_slide),))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "the process hung at exit waiting for its reader processes"
    assert child.exitcode == 0


_SCRIPT_WITHOUT_MAIN_GUARD = """
import sys
from pathlib import Path
import numpy as np
from hepatoquant.tile_reader import iter_tile_batches
from hepatoquant.tiling import TileGrid, TileSpec
print("script body ran", flush=True)
xs, ys = np.meshgrid(np.arange(4) * 150.0, np.arange(2) * 150.0)
grid = TileGrid(xs.ravel(), ys.ravel(), 150.0, np.ones(xs.size), TileSpec())
batches = iter_tile_batches(Path(sys.argv[1]), grid, out_size_px=32, num_workers=2, readers="processes")
print("tiles", sum(len(b) for b in batches))
"""


def test_a_script_without_a_main_guard_is_not_run_again_by_the_readers(tmp_path: Path, cmu_slide: Path) -> None:
    """A lab's analysis script calling analyze on a GPU (auto: reader processes) at its top level: multiprocessing's
    spawn would import it again in every reader, run it there and fail (reported as a damaged slide)."""
    import subprocess
    import sys

    script = tmp_path / "my_analysis.py"
    script.write_text(_SCRIPT_WITHOUT_MAIN_GUARD)
    run = subprocess.run([sys.executable, str(script), str(cmu_slide)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["script body ran", "tiles 8"]


def test_reader_processes_are_started_before_the_tissue_is_found(cmu_slide: Path, monkeypatch,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Their start (about half a second of imports each) overlaps the tissue detection and the model loading
    instead of delaying the first batch."""
    from hepatoquant import analysis

    pack = ensure_demo_pack(tmp_path_factory.mktemp("tiny-models"), encoder="test_vit_micro")
    workers = 5  # a pool of its own: no earlier test started one of this size
    assert workers not in tile_reader._pools
    seen: list[int] = []
    real = analysis.detect_tissue

    def detect(*args, **kwargs):
        pool = tile_reader._pools.get(workers)
        seen.append(0 if pool is None else sum(p.is_alive() for p in pool._processes.values()))
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "detect_tissue", detect)
    result = analyze_slide(cmu_slide, pack, AnalysisOptions(device="cpu", backend="torch", readers="processes",
                                                            num_workers=workers))
    assert seen == [workers] and result.readers == "processes"
    threads = analyze_slide(cmu_slide, pack, AnalysisOptions(device="cpu", backend="torch", num_workers=6))
    assert threads.readers == "threads" and 6 not in tile_reader._pools  # threads: no processes started
