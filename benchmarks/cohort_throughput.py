"""Cohort throughput: slides per minute with the local engine (1 and 2 workers) and Ray (2 workers) on this machine.

The same generated cohort (``--slides`` pyramidal TIFFs of ``--size`` px at 0.5 um/px), the demo classifier pack,
fresh output folders each run, in one process: local 1 worker, local 2 workers, Ray 2 workers (Ray started on
this machine by the run, so its start-up is counted, as a user would see it). Ray overhead = Ray time / local
time with the same number of workers.

Usage: python benchmarks/cohort_throughput.py [--slides 6] [--size 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hepatoquant.cohort.engines import run_cohort
from hepatoquant.cohort.inputs import read_cohort
from hepatoquant.analysis_request import AnalysisRequest
from hepatoquant.cohort.runner import CohortSettings
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "slides").mkdir()
        spec = SyntheticSlideSpec(width_px=args.size, height_px=args.size,
                                  tumour=(Ellipse(args.size * 0.3, args.size * 0.4, args.size * 0.1, args.size * 0.12),))
        first = write_synthetic_slide(base / "slides" / "slide-00.tiff", spec)
        for i in range(1, args.slides):
            (base / "slides" / f"slide-{i:02d}.tiff").write_bytes(first.read_bytes())
        ensure_demo_pack(base / "models")
        items = read_cohort(base / "slides")
        settings = CohortSettings(AnalysisRequest(model="demo", segmenter_model="none"), models_dir=str(base / "models"))
        times = {}
        for label, engine, workers in (("local, 1 worker", "local", 1), ("local, 2 workers", "local", 2),
                                       ("ray, 2 workers", "ray", 2)):
            started = time.perf_counter()
            outcomes = run_cohort(items, settings, base / label.replace(", ", "-").replace(" ", "_"), engine=engine,
                                  workers=workers)
            times[label] = time.perf_counter() - started
            tiles = sum(o.tiles for o in outcomes.values())
            assert all(o.ok and not o.skipped for o in outcomes.values()), outcomes
            print(f"{label}: {len(items)} slides ({tiles} tiles) in {times[label]:.1f} s = "
                  f"{60 * len(items) / times[label]:.2f} slides/min, {tiles / times[label]:.1f} tiles/s")
        print(f"2 workers vs 1 (local): speed-up {times['local, 1 worker'] / times['local, 2 workers']:.2f}")
        print(f"Ray overhead (ray / local, 2 workers): {times['ray, 2 workers'] / times['local, 2 workers']:.3f}")


if __name__ == "__main__":
    main()
