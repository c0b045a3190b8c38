"""Pipeline efficiency: whole `analyze` run vs the bare encoder + head on the same number of tiles.

Both are measured in this one run, on this machine, with the same model, batch size and torch threads:
- pipeline: ``analyze_slide`` + ``write_outputs`` on a generated slide (tissue detection, tiling, parallel tile
  reading from the pyramid, classification, quantification, GeoJSON / report / CSV / overlay);
- bare model: the same classifier on already-decoded uint8 tensors of the same count, no I/O.
efficiency = pipeline tiles/s / bare tiles/s (1.0 would mean reading and bookkeeping cost nothing).

Usage: python benchmarks/pipeline_efficiency.py [--size 6144] [--repeats 3] [--model demo] [--batch-size 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hepatoquant.analysis import AnalysisOptions, ModelCache, analyze_slide
from hepatoquant.classify import choose_device, predict_batches
from hepatoquant.encoders import encoder_config
from hepatoquant.inference_backend import resolve_backend
from hepatoquant.precision import resolve_precision
from hepatoquant.pack_lookup import resolve_model_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.synthetic import SyntheticSlideSpec, write_synthetic_slide
from hepatoquant.tile_reader import TileBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6144, help="generated slide side in px at 0.5 um/px")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians are compared")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pack = resolve_model_pack(args.model)
    device = choose_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        slide = write_synthetic_slide(Path(tmp) / "bench.tiff", SyntheticSlideSpec(width_px=args.size, height_px=args.size))
        options = AnalysisOptions(batch_size=args.batch_size, num_workers=args.workers, device=args.device)

        # Warm-up (first-call allocations, lazy imports) on the bare model, outside both timings. The bare model is
        # the one analyze runs: same backend and precision (each analysis below loads its own, as a run does).
        models = ModelCache()
        precision = resolve_precision("auto", device, encoder_config(pack.encoder_name).recommended_dtype)
        model = models.classifier(pack, device, resolve_backend("auto", device), precision)
        size = pack.input_size_px
        warm = TileBatch(0, np.zeros((args.batch_size, size, size, 3), np.uint8))
        list(predict_batches(model, [warm], device, precision=precision))

        # Alternate the two measurements and take medians: this machine's speed drifts between runs.
        pipeline_runs, bare_runs = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            result = analyze_slide(slide, pack, options)
            write_outputs(result, Path(tmp) / "out")
            pipeline_runs.append(time.perf_counter() - started)
            tiles = len(result.grid)
            if repeat == 0:
                rng = np.random.default_rng(0)
                pixels = rng.integers(0, 256, (tiles, size, size, 3), dtype=np.uint8)
                batches = [TileBatch(i, pixels[i : i + args.batch_size]) for i in range(0, tiles, args.batch_size)]
            started = time.perf_counter()
            for _ in predict_batches(model, batches, device, precision=precision):
                pass
            bare_runs.append(time.perf_counter() - started)
        pipeline_s, bare_s = statistics.median(pipeline_runs), statistics.median(bare_runs)

    pipeline_tps, bare_tps = tiles / pipeline_s, tiles / bare_s
    print(f"model {pack.name} ({pack.encoder_name}), device {device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, reader workers {args.workers}")
    print(f"tiles: {tiles}")
    print(f"pipeline (analyze + outputs): {pipeline_s:.2f} s, {pipeline_tps:.1f} tiles/s "
          f"(runs: {', '.join(f'{t:.2f}' for t in pipeline_runs)})")
    print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings_s.items()))
    print(f"bare encoder + head:          {bare_s:.2f} s, {bare_tps:.1f} tiles/s "
          f"(runs: {', '.join(f'{t:.2f}' for t in bare_runs)})")
    print(f"pipeline efficiency: {pipeline_tps / bare_tps:.3f} of medians, "
          f"{min(bare_runs) / min(pipeline_runs):.3f} of the best runs")


if __name__ == "__main__":
    main()
