"""The README's capacity model: counted FLOPs per tile of each encoder, and the GPUs a cohort needs.

FLOPs are counted with PyTorch's FlopCounterMode on the meta device (no weights, no memory), forward pass at the
encoder's input size, a multiply-add counted as 2. GPU throughput is computed from a peak and a utilisation you
give (measure yours with benchmarks/pipeline_efficiency.py --device cuda and pass --tiles-per-second instead).

Usage: python benchmarks/capacity_model.py [--peak-tflops 312] [--utilisation 0.4] [--tiles-per-slide 30000]
       [--slides 5000] [--hours 24 168]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from hepatoquant.encoders import create_encoder, encoder_config


def flops_per_tile(name: str) -> float:
    with torch.device("meta"):
        model = create_encoder(name)
    size = encoder_config(name).input_size_px
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="GPU bf16 dense peak (A100: 312)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of the peak reached")
    parser.add_argument("--tiles-per-slide", type=int, default=30_000)
    parser.add_argument("--slides", type=int, default=5_000)
    parser.add_argument("--hours", type=float, nargs="+", default=[24, 168])
    args = parser.parse_args()
    effective = args.peak_tflops * 1e12 * args.utilisation
    print(f"{effective / 1e12:.0f} TFLOPS effective, {args.tiles_per_slide} tiles per slide, {args.slides} slides")
    for name in ("demo_vit_tiny", "uni", "virchow2", "gigapath"):
        flops = flops_per_tile(name)
        tiles_per_s = effective / flops
        seconds = args.tiles_per_slide / tiles_per_s
        gpus = ", ".join(f"{math.ceil(args.slides * seconds / (h * 3600))} GPUs in {h:g} h "
                         f"({args.slides * seconds / (h * 3600):.2f})" for h in args.hours)
        print(f"{name}: {flops / 1e9:.1f} GFLOP/tile, {tiles_per_s:.0f} tiles/s, {seconds:.1f} s/slide; {gpus}")


if __name__ == "__main__":
    main()
