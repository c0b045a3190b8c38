"""bf16 against fp32 on this machine: bare encoders, and the whole analysis of a real slide, in one run.

- bare: tiles/s of each encoder (random weights; only the shapes matter for speed) on decoded 224 px tiles at
  fp32 and under the bf16 policy, alternating, medians of ``--repeats``;
- end to end: ``analyze_slide`` on CMU-1-Small-Region.svs (or ``--slide``) with the demo pack at fp32 and bf16,
  with each precision's efficiency against its own bare model on the same number of tiles;
- agreement: top-1 agreement and the largest probability difference between the two runs' tiles.

Usage: python benchmarks/precision.py [--encoders demo_vit_tiny uni] [--tiles 32] [--repeats 3] [--slide PATH]
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
from hepatoquant.classify import load_classifier, normalisation_buffers, normalise_uint8_nhwc, predict_batches
from hepatoquant.encoders import create_encoder
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.precision import autocast_for, cpu_has_native_bf16
from hepatoquant.tile_reader import TileBatch

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "slides" / "CMU-1-Small-Region.svs"


def bare_rate(model, tiles: torch.Tensor, precision: str, batch: int) -> float:
    mean, std = normalisation_buffers(model.config.mean, model.config.std)
    started = time.perf_counter()
    with torch.inference_mode(), autocast_for(torch.device("cpu"), precision):
        for start in range(0, len(tiles), batch):
            model(normalise_uint8_nhwc(tiles[start:start + batch], mean, std))
    return len(tiles) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["demo_vit_tiny", "uni"])
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--slide", type=Path, default=SLIDE)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}")
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (args.tiles, 224, 224, 3), dtype=np.uint8))
    for name in args.encoders:
        model = create_encoder(name).eval()
        bare_rate(model, tiles[: args.batch_size // 4 or 1], "bf16", args.batch_size)  # warm-up
        rates = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for precision in rates:
                rates[precision].append(bare_rate(model, tiles, precision, args.batch_size))
        fp32, bf16 = (statistics.median(rates[p]) for p in ("fp32", "bf16"))
        print(f"bare {name}: fp32 {fp32:.2f} tiles/s, bf16 {bf16:.2f} tiles/s, speed-up {bf16 / fp32:.2f}")
        del model

    with tempfile.TemporaryDirectory() as tmp:
        pack = ensure_demo_pack(Path(tmp))
        models = ModelCache()
        results = {}
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternating; the second of each counts
            options = AnalysisOptions(device="cpu", precision=precision, batch_size=args.batch_size)
            started = time.perf_counter()
            result = analyze_slide(args.slide, pack, options, models=models)
            results[precision] = (result, len(result.grid) / (time.perf_counter() - started))
        model = load_classifier(pack, torch.device("cpu"))
        count = len(results["fp32"][0].grid)
        random_tiles = rng.integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            for start in range(0, count, args.batch_size):
                list(predict_batches(model, [TileBatch(start, random_tiles[start:start + args.batch_size])],
                                     torch.device("cpu"), precision=precision))
            bare = count / (time.perf_counter() - started)
            result, rate = results[precision]
            print(f"end to end {args.slide.name} ({count} tiles), demo pack, {precision}: {rate:.1f} tiles/s; bare "
                  f"model {bare:.1f} tiles/s; efficiency {rate / bare:.3f}; precision recorded: {result.precision}")
        p32, p16 = results["fp32"][0].probabilities, results["bf16"][0].probabilities
        print(f"agreement fp32 vs bf16: top-1 {(p32.argmax(1) == p16.argmax(1)).mean():.4f}, largest probability "
              f"difference {np.abs(p32 - p16).max():.4f} (demo pack: untrained head, near-uniform logits)")
        print(f"end-to-end speed-up bf16 / fp32: {results['bf16'][1] / results['fp32'][1]:.2f}")


if __name__ == "__main__":
    main()
