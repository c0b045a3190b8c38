"""Parallel tile reading: batches of tile pixels streamed from the slide, in grid order.

Workers each hold their own OpenSlide handle, read the tiles from the best pyramid level (a row's tiles in one
call, :meth:`Slide.read_scaled_boxes`) and resize them to the encoder's input size. Workers are threads of this
process (OpenSlide and OpenCV release the GIL while decoding and resizing) or processes (``readers``, for a GPU,
where threads would wait for the GIL of the thread driving the model), which write each batch into shared memory.
At most ``prefetch_batches`` batches are in flight, so memory is bounded by the batch size, not the slide.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.util
import os
import signal
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hepatoquant.errors import CorruptSlideError, InvalidParameterError
from hepatoquant.slide import Slide
from hepatoquant.tiling import TileGrid

__all__ = ["READERS", "TileBatch", "focus_score", "iter_tile_batches", "resolve_readers", "shutdown_reader_processes",
           "start_reader_processes"]

READERS = ("threads", "processes")


def resolve_readers(readers: str, device) -> str:
    """``auto``: reader processes when the model runs on a GPU, threads on a CPU. On a GPU the readers set the
    pace, and reader threads share this process's GIL with the thread driving the model: measured on an H200,
    12 reader threads gave 2,300 tiles/s and 16 gave fewer (1,686). On a CPU the model sets the pace, and
    threads start at once where processes take about half a second the first time."""
    if readers == "auto":
        return "processes" if getattr(device, "type", str(device)) == "cuda" else "threads"
    if readers not in READERS:
        raise InvalidParameterError(f"tile readers {readers!r} must be one of auto, {', '.join(READERS)}")
    return readers


def focus_score(tile_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the tile's grey levels, on the tile at its own resolution (150 px at
    0.5 um/px by default, before any resizing for the model, so that one threshold fits every pack): high for
    sharp detail, low for out-of-focus or smeared tissue. Thresholds: see ``AnalysisOptions.min_focus``."""
    grey = cv2.cvtColor(tile_rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_32F).var())


@dataclass(frozen=True)
class TileBatch:
    """Tiles ``start`` to ``start + len(pixels)`` of the grid as RGB uint8 (batch, height, width, 3), and each
    tile's focus score (:func:`focus_score`) where the reader computed it."""

    start: int
    pixels: np.ndarray
    focus: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


class _OpenCVThreads:
    """Our worker threads are the parallelism: OpenCV's own thread pool on 150 px resizes only adds overhead
    (measured: 1.86 vs 1.31 ms CPU per tile on 2 cores). The setting is process-wide, so it is counted: the
    first reader sets one thread, the last one to finish restores what was there (readers may overlap in a
    server running several jobs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 1

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = cv2.getNumThreads()
                cv2.setNumThreads(1)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                cv2.setNumThreads(self._saved)


_single_threaded_opencv = _OpenCVThreads()


class _ThreadLocalSlides:
    """One open slide per worker thread, all closed together."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()

    def get(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            # The grid is already in level-0 pixels: the reader never needs the slide's MPP.
            slide = Slide(self._path)
            self._local.slide = slide
            with self._lock:
                self._opened.append(slide)
        return slide

    def close(self) -> None:
        with self._lock:
            for slide in self._opened:
                slide.close()
            self._opened.clear()


def iter_tile_batches(
    slide_path: str | Path,
    grid: TileGrid,
    *,
    out_size_px: int,
    batch_size: int = 32,
    num_workers: int = 2,
    prefetch_batches: int | None = None,
    focus_px: int | None = None,
    readers: str = "threads",
) -> Iterator[TileBatch]:
    """The grid's tiles in order, ``batch_size`` at a time, each resized to ``out_size_px`` square.

    With ``focus_px`` each tile is read at that size first (its defined resolution, e.g. 150 px at 0.5 um/px),
    scored there (:func:`focus_score`, in ``TileBatch.focus``) and then resized to ``out_size_px``; without, it
    is read straight at ``out_size_px`` (segmentation windows) and not scored.
    ``readers``: ``threads`` of this process, or ``processes`` (``num_workers`` of them, kept for later readings):
    each reader holds the GIL only between its OpenSlide and OpenCV calls, but a thread that runs Python for
    long (a model on a GPU launching kernels) makes every reader thread wait for it at each of those returns,
    which reader processes never do.
    Arguments are checked here, at the call; reading starts when the returned iterator is first advanced.
    """
    if readers not in READERS:
        raise InvalidParameterError(f"tile readers {readers!r} must be one of {', '.join(READERS)}")
    if batch_size < 1 or num_workers < 1 or (prefetch_batches is not None and prefetch_batches < 1):
        raise InvalidParameterError(
            f"batch size ({batch_size}), workers ({num_workers}) and prefetch ({prefetch_batches}) must be >= 1"
        )
    return _read_batches(Path(slide_path), grid, out_size_px, batch_size, num_workers, prefetch_batches or num_workers + 1,
                         focus_px, readers)


def _read_tiles(
    slide: Slide, xs: np.ndarray, ys: np.ndarray, size: float, out_size_px: int, focus_px: int | None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tiles at level-0 ``(xs, ys)`` of side ``size``, as (pixels, focus scores or None): see iter_tile_batches.
    The pixels go into ``out`` where given (a reader process's slot of shared memory)."""
    pixels = np.empty((len(xs), out_size_px, out_size_px, 3), dtype=np.uint8) if out is None else out
    focus = np.empty(len(xs), dtype=np.float32) if focus_px else None
    for row, tile in enumerate(slide.read_scaled_boxes(xs, ys, size, focus_px or out_size_px)):
        if focus is None:
            pixels[row] = tile
            continue
        # The tile at its defined resolution (HepatoBench's 150 px at 20x), then the model's input size, as
        # the benchmark's patches were made; the focus score is taken before that resize, by the reader.
        focus[row] = focus_score(tile)
        pixels[row] = tile if focus_px == out_size_px else cv2.resize(
            tile, (out_size_px, out_size_px),
            interpolation=cv2.INTER_LINEAR if out_size_px > focus_px else cv2.INTER_AREA,
        )
    return pixels, focus


def _read_batches(
    slide_path: Path, grid: TileGrid, out_size_px: int, batch_size: int, num_workers: int, in_flight_limit: int,
    focus_px: int | None, readers: str,
) -> Iterator[TileBatch]:
    if readers == "processes":
        return _read_batches_in_processes(slide_path, grid, out_size_px, batch_size, num_workers, in_flight_limit,
                                          focus_px)
    return _read_batches_in_threads(slide_path, grid, out_size_px, batch_size, num_workers, in_flight_limit,
                                    focus_px)


def _in_order(submit, grid_length: int, batch_size: int, in_flight_limit: int, finish) -> Iterator[TileBatch]:
    """Batches in grid order with at most ``in_flight_limit`` submitted ahead: ``submit(start)`` gives a
    future of the batch at ``start``; ``finish(pending futures)`` runs however the iteration ends."""
    starts = iter(range(0, grid_length, batch_size))
    pending: deque[Future[TileBatch]] = deque()
    try:
        for start in starts:
            pending.append(submit(start))
            if len(pending) >= in_flight_limit:
                break
        while pending:
            batch = pending.popleft().result()
            next_start = next(starts, None)
            if next_start is not None:
                pending.append(submit(next_start))
            yield batch
    finally:
        for future in pending:
            future.cancel()
        finish(list(pending))


def _read_batches_in_threads(
    slide_path: Path, grid: TileGrid, out_size_px: int, batch_size: int, num_workers: int, in_flight_limit: int,
    focus_px: int | None,
) -> Iterator[TileBatch]:
    slides = _ThreadLocalSlides(slide_path)
    executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="tile-reader")

    def read_batch(start: int) -> TileBatch:
        stop = min(start + batch_size, len(grid))
        pixels, focus = _read_tiles(slides.get(), grid.x_level0_px[start:stop], grid.y_level0_px[start:stop],
                                    grid.size_level0_px, out_size_px, focus_px)
        return TileBatch(start, pixels, focus)

    def finish(pending: list[Future]) -> None:
        executor.shutdown(wait=True)
        slides.close()
        _single_threaded_opencv.release()

    _single_threaded_opencv.acquire()
    yield from _in_order(lambda start: executor.submit(read_batch, start), len(grid), batch_size, in_flight_limit,
                         finish)


def _read_batches_in_processes(
    slide_path: Path, grid: TileGrid, out_size_px: int, batch_size: int, num_workers: int, in_flight_limit: int,
    focus_px: int | None,
) -> Iterator[TileBatch]:
    """Reader processes write each batch into a slot of one shared memory block and this process copies it out,
    rather than unpickling it from a pipe. The CPU time here is alike (0.1-0.3 ms per tile, mostly page faults),
    but numpy copies without the GIL and unpickling holds it: beside a busy Python thread (the model's), batches
    of 256 tiles copied at 58 a second left that thread 0.99 of its speed, unpickled at 34 a second 0.19."""
    executor = _reader_processes(num_workers)
    slot_shape = (batch_size, out_size_px, out_size_px, 3)
    slot_bytes = int(np.prod(slot_shape))
    block = SharedMemory(create=True, size=slot_bytes * in_flight_limit)
    free_slots = list(range(in_flight_limit))

    def reader_died(start: int, exc: BrokenProcessPool) -> CorruptSlideError:
        _forget_reader_processes(executor)
        return CorruptSlideError(
            f"slide {str(slide_path)!r}: a tile-reader process died while reading tiles {start} onwards ({exc}); "
            "the file may be damaged (copy it again from the scanner or archive), or the machine ran out of memory "
            "(fewer --workers or a smaller --batch-size)")

    def submit(start: int) -> Future[TileBatch]:
        stop = min(start + batch_size, len(grid))
        slot = free_slots.pop()
        try:
            read = executor.submit(_read_tiles_in_process, block.name, slot * slot_bytes, str(slide_path),
                                   grid.x_level0_px[start:stop], grid.y_level0_px[start:stop], grid.size_level0_px,
                                   out_size_px, focus_px)
        except BrokenProcessPool as exc:  # a reader died since the last batch was handed over
            free_slots.append(slot)
            raise reader_died(start, exc) from exc
        batch: Future[TileBatch] = Future()
        batch.read, batch.settled = read, threading.Event()  # type: ignore[attr-defined]

        def copied_out(read: Future) -> None:
            """In this process, once the reader is done with the slot (or its read was cancelled): copy the tiles
            out, free the slot, and only then hand the batch over, so that the next submission finds a slot and
            the block outlives every copy from it."""
            try:
                focus = read.result()
                view = np.ndarray((stop - start, *slot_shape[1:]), np.uint8, block.buf, slot * slot_bytes)
                outcome: TileBatch | BaseException = TileBatch(start, view.copy(), focus)
            except BrokenProcessPool as exc:
                outcome = reader_died(start, exc)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
                outcome = exc
            free_slots.append(slot)
            batch.settled.set()  # type: ignore[attr-defined]
            try:
                if isinstance(outcome, TileBatch):
                    batch.set_result(outcome)
                else:
                    batch.set_exception(outcome)
            except InvalidStateError:  # the consumer gave the batch up (cancelled it) meanwhile
                pass

        read.add_done_callback(copied_out)
        return batch

    def finish(pending: list[Future]) -> None:
        for batch in pending:
            batch.read.cancel()
        for batch in pending:
            batch.settled.wait()  # no reader may write into the block, nor a copy read from it, once it is gone
        block.close()
        block.unlink()

    yield from _in_order(submit, len(grid), batch_size, in_flight_limit, finish)


# Reader processes: one pool per worker count, started on first use and kept for the life of this process
# (a server's or a cohort's next slides reuse them). Each holds a few slides open between batches.
_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()
_OPEN_SLIDES_PER_PROCESS = 4
_process_slides: OrderedDict[tuple[str, int, int], Slide] = OrderedDict()


class _ReaderProcess(multiprocessing.context.SpawnProcess):
    """Spawned, not forked: this process may run model, gRPC and OpenVINO threads that a fork would copy
    mid-flight. And spawned without the program's main module: multiprocessing would import it again in the
    reader (run a user's script a second time, top-level code and all, and fail there when that script has no
    ``if __name__ == "__main__"`` guard); a reader needs only this module, which it imports to find its work."""

    @staticmethod
    def _Popen(process_obj):
        main = sys.modules["__main__"]
        with _main_hidden_lock:
            saved = {name: main.__dict__.pop(name) for name in ("__spec__", "__file__") if name in main.__dict__}
            main.__spec__ = None
            try:
                return multiprocessing.context.SpawnProcess._Popen(process_obj)  # reads __main__ while launching
            finally:
                del main.__spec__
                main.__dict__.update(saved)


class _ReaderContext(multiprocessing.context.SpawnContext):
    Process = _ReaderProcess


_main_hidden_lock = threading.Lock()


def _reader_processes(workers: int) -> ProcessPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_ReaderContext(),
                                       initializer=_init_reader_process)
            _pools[workers] = pool
        return pool


def start_reader_processes(workers: int) -> None:
    """Have ``workers`` reader processes started now rather than at the first batch: each takes about half a
    second to import what reading needs, which a run spends finding the tissue and loading its models."""
    pool = _reader_processes(workers)
    for _ in range(workers):
        pool.submit(_ready)  # the pool starts a process for each task while none is idle


def _ready() -> None:
    """A reader process's first task: nothing (see start_reader_processes)."""


def _forget_reader_processes(pool: ProcessPoolExecutor) -> None:
    """A pool whose process died is broken for good: the next reading starts a new one."""
    with _pools_lock:
        for workers, kept in list(_pools.items()):
            if kept is pool:
                del _pools[workers]
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_reader_processes() -> None:
    """End the reader processes (at exit; tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


# At exit, before multiprocessing joins this process's children (which would wait for ever on idle readers):
# its exit function runs finalizers like this one first, in a main process and in a spawned one (a cohort worker)
# alike, where plain atexit handlers do not run. Its priority puts it before the finalizers (priority 10) that
# close the pools' own queues: with those closed, the readers would never get the word to stop.
multiprocessing.util.Finalize(None, shutdown_reader_processes, exitpriority=100)


def _init_reader_process() -> None:
    cv2.setNumThreads(1)  # the processes are the parallelism (see _OpenCVThreads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us at its exit


def _read_tiles_in_process(
    block_name: str, offset: int, path: str, xs: np.ndarray, ys: np.ndarray, size: float, out_size_px: int,
    focus_px: int | None,
) -> np.ndarray | None:
    """In a reader process: the tiles into the shared block at ``offset``; returns their focus scores."""
    block = SharedMemory(name=block_name)
    try:
        slot = np.ndarray((len(xs), out_size_px, out_size_px, 3), np.uint8, block.buf, offset)
        _, focus = _read_tiles(_open_in_process(path), xs, ys, size, out_size_px, focus_px, out=slot)
        del slot  # the block cannot close while an array still points into it
    finally:
        block.close()
    return focus


def _open_in_process(path: str) -> Slide:
    """The slide at ``path``, kept open for the next batches: keyed by size and modification time as well,
    so that a slide replaced under the same name is opened afresh."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    slide = _process_slides.pop(key, None) or Slide(path)
    _process_slides[key] = slide
    while len(_process_slides) > _OPEN_SLIDES_PER_PROCESS:
        _process_slides.popitem(last=False)[1].close()
    return slide
