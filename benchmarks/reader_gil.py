"""Tile readers beside a model that holds the GIL: threads against processes, in one run (issue 20).

On a GPU the thread driving an eager PyTorch model holds the GIL while it launches kernels and lets it go while
it waits for the GPU. Reader threads need the GIL between their OpenSlide and OpenCV calls, so they wait for that
thread (and for each other); reader processes do not. This runs the real reader (``iter_tile_batches``) over a
slide's tissue tiles while a stand-in for the model's thread, per batch, runs Python for ``--hold-ms`` (the
launches) and then sleeps ``--wait-ms`` (the GPU's work, GIL released), and prints tiles/s for each kind of
reader, alternating, plus the reader alone (no model). Also this process's CPU time per tile: the part of the
reading that cannot spread over more cores.

Without SLIDE it reads a 4 x 4 mosaic of CMU-1-Small-Region (8,880 x 11,868 px, built in a temporary folder).

Usage: python benchmarks/reader_gil.py [SLIDE] [--batch-size 64] [--workers 2] [--hold-ms 4] [--wait-ms 10]
       [--rounds 2] [--max-tiles 3000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from gpu_e2e import DEFAULT_SOURCE, build_mosaic
from hepatoquant.slide import Slide
from hepatoquant.tile_reader import READERS, iter_tile_batches
from hepatoquant.tiling import TileSpec, build_tile_grid
from hepatoquant.tissue import detect_tissue


def _hold_gil(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read(slide: Path, grid, readers: str, args, model: bool) -> tuple[float, float]:
    """(tiles/s, this process's CPU ms per tile) for one pass over the grid."""
    started, cpu = time.perf_counter(), _cpu_s()
    for batch in iter_tile_batches(slide, grid, out_size_px=224, batch_size=args.batch_size,
                                   num_workers=args.workers, focus_px=150, readers=readers):
        if model:
            _hold_gil(args.hold_ms / 1e3)
            time.sleep(args.wait_ms / 1e3)
    elapsed = time.perf_counter() - started
    return len(grid) / elapsed, (_cpu_s() - cpu) / len(grid) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path, nargs="?")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hold-ms", type=float, default=4.0, help="Python (GIL held) per batch in the model thread")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="waiting (GIL released) per batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tiles", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hq-reader-gil-") as tmp:
        if args.slide is None:
            args.slide, _ = build_mosaic(DEFAULT_SOURCE, Path(tmp) / "mosaic.tiff", (4, 4))
        measure(args)


def measure(args) -> None:
    with Slide(args.slide) as slide:
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, detect_tissue(slide), TileSpec())
    grid = grid.subset(np.arange(min(len(grid), args.max_tiles)))
    read(args.slide, grid.subset(np.arange(min(len(grid), args.batch_size * 2))), "processes", args, False)  # start
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for model in (False, True):
            for readers in READERS:
                results.setdefault((readers, model), []).append(read(args.slide, grid, readers, args, model))
    model_bound = len(grid) / args.batch_size * (args.hold_ms + args.wait_ms) / 1e3
    print(f"{args.slide.name}: {len(grid)} tiles, batches of {args.batch_size}, {args.workers} readers; the model "
          f"stand-in alone would take {model_bound:.1f} s = {len(grid) / model_bound:.0f} tiles/s")
    for (readers, model), runs in results.items():
        rates = [rate for rate, _ in runs]
        cpu = np.median([ms for _, ms in runs])
        print(f"  {'beside the model' if model else 'reader alone    '} {readers:9s}: "
              f"{np.median(rates):6.0f} tiles/s (runs {', '.join(f'{r:.0f}' for r in rates)}), "
              f"this process's CPU {cpu:.3f} ms per tile")


if __name__ == "__main__":
    main()
