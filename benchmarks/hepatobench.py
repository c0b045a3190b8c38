"""HepatoBench performance: embedding extraction vs the bare encoder, and linear-probe training time.

Both measured in this one run, on this machine, with the same encoder, batch size and torch threads:
- extraction: ``extract_embeddings`` on a generated 150 px patch dataset (PNG decoding and bicubic resizing to the
  encoder's input by a thread pool, batching, inference, writing the cache shards), fresh cache each repeat;
- bare encoder: the same encoder on the same number of patches already decoded and resized to uint8 tensors.
ratio = extraction patches/s / bare patches/s (1.0: decoding, resizing and caching cost nothing).

Probe: ``train_probe`` on N x D embeddings with class structure (default 100,000 x 1536, 7 classes, plus a
validation split of N/5), for the default AdamW grid and for L-BFGS logistic regression.

Usage: python benchmarks/hepatobench.py [--patches 1400] [--repeats 3] [--encoder demo_vit_tiny]
       [--batch-size 64] [--workers 4] [--probe-samples 100000] [--probe-dim 1536] [--skip-lbfgs]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hepatoquant.bench.dataset import load_dataset
from hepatoquant.bench.extract import decoded_batches, extract_embeddings
from hepatoquant.bench.probe import ProbeConfig, train_probe
from hepatoquant.bench.synthetic import write_synthetic_patch_dataset
from hepatoquant.classify import normalisation_buffers, normalise_uint8_nhwc
from hepatoquant.encoders import create_encoder
from hepatoquant.model_pack import ensure_demo_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=1400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="demo_vit_tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--probe-samples", type=int, default=100_000)
    parser.add_argument("--probe-dim", type=int, default=1536)
    parser.add_argument("--skip-lbfgs", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        dataset = load_dataset(write_synthetic_patch_dataset(base / "patches", per_class=args.patches // 7))
        pack = ensure_demo_pack(base / "models", encoder=args.encoder)
        encoder = create_encoder(pack.encoder_name, weights=pack.encoder_weights).eval().requires_grad_(False)
        patches = list(dataset.patches)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.workers) as pool:
            decoded = list(decoded_batches(dataset, patches, pack.input_size_px, args.batch_size, pool))
        mean, std = normalisation_buffers(pack.mean, pack.std)

        def bare() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for batch in decoded:
                    encoder(normalise_uint8_nhwc(torch.from_numpy(batch), mean, std))
            return len(patches) / (time.perf_counter() - started)

        def pipeline(repeat: int) -> float:
            started = time.perf_counter()
            extract_embeddings(dataset, patches, pack, base / f"cache{repeat}", "all", batch_size=args.batch_size,
                               workers=args.workers, encoder=encoder)
            return len(patches) / (time.perf_counter() - started)

        bare()  # warm-up
        rates_bare, rates_pipeline = [], []
        for repeat in range(args.repeats):
            rates_bare.append(bare())
            rates_pipeline.append(pipeline(repeat))
        b, p = statistics.median(rates_bare), statistics.median(rates_pipeline)
        print(f"extraction, {len(patches)} patches of 150 px -> {pack.input_size_px} px, {args.encoder}, batch "
              f"{args.batch_size}, {args.workers} decoding threads:")
        print(f"  bare encoder on decoded tensors: {b:.1f} patches/s (runs: {', '.join(f'{r:.1f}' for r in rates_bare)})")
        print(f"  extract_embeddings:              {p:.1f} patches/s (runs: {', '.join(f'{r:.1f}' for r in rates_pipeline)})")
        print(f"  ratio extraction / bare: {p / b:.3f}")

    rng = np.random.default_rng(0)
    classes = 7
    centres = rng.normal(0, 1, (classes, args.probe_dim)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return centres[y] + rng.normal(0, 4, (n, args.probe_dim)).astype(np.float32), y

    (tx, ty), (vx, vy), (sx, sy) = sample(args.probe_samples), sample(args.probe_samples // 5), sample(10_000)
    methods = ["adamw"] + ([] if args.skip_lbfgs else ["lbfgs"])
    for method in methods:
        config = ProbeConfig(method=method)
        result = train_probe(tx, ty, vx, vy, classes, config)
        accuracy = float((result.predict(sx) == sy).mean())
        print(f"probe {method}: {args.probe_samples} x {args.probe_dim} train, {len(vx)} val, "
              f"{len(result.trials)} settings: {result.seconds:.1f} s; chosen {result.chosen}; held-out accuracy "
              f"{accuracy:.3f}")


if __name__ == "__main__":
    main()
