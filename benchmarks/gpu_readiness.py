"""GPU readiness: tiles/s of UNI-, Virchow2- and GigaPath-sized encoders (random weights) under the precision
policy, and the fraction of this GPU's measured bf16 matrix-multiply rate they reach. A few minutes on one GPU.

For each encoder: FLOPs per tile counted with FlopCounterMode (meta device), then batches of ``--batch-size``
uint8 tiles from pinned host memory, copied non-blocking, normalised and encoded under autocast, timed with CUDA
synchronisation after warm-up. The reference rate is a large bf16 (or fp16) matmul on the same GPU.
Runs on a CPU too (``--device cpu``, small encoders) as a smoke test.

Usage: python benchmarks/gpu_readiness.py [--device cuda] [--encoders uni virchow2 gigapath] [--batch-size 128]
       [--batches 20] [--precision auto]
"""

from __future__ import annotations

import argparse
import time

import torch

from capacity_model import flops_per_tile  # benchmarks/ is on the path when a script runs
from hepatoquant.classify import choose_device, normalisation_buffers, normalise_uint8_nhwc
from hepatoquant.encoders import create_encoder, encoder_config
from hepatoquant.precision import autocast_for, resolve_precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a square matmul: the GPU's practical peak at this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronise(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronise(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--encoders", nargs="+", default=["uni", "virchow2", "gigapath"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--matmul-size", type=int, default=8192)
    args = parser.parse_args()
    device = choose_device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name in args.encoders:
        config = encoder_config(name)
        precision = resolve_precision(args.precision, device, config.recommended_dtype)
        reference = matmul_rate(device, _DTYPES[precision], args.matmul_size)
        model = create_encoder(name).to(device).eval().requires_grad_(False)
        mean, std = (t.to(device) for t in normalisation_buffers(config.mean, config.std))
        size = config.input_size_px
        host = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8)
        if device.type == "cuda":
            host = host.pin_memory()
        with torch.inference_mode(), autocast_for(device, precision):
            for _ in range(3):  # warm-up: kernels chosen, memory allocated
                model(normalise_uint8_nhwc(host.to(device, non_blocking=True), mean, std))
            synchronise(device)
            started = time.perf_counter()
            for _ in range(args.batches):
                model(normalise_uint8_nhwc(host.to(device, non_blocking=True), mean, std))
            synchronise(device)
        seconds = time.perf_counter() - started
        tiles_per_s = args.batch_size * args.batches / seconds
        achieved = tiles_per_s * flops_per_tile(name)
        memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{name}: {precision}, batch {args.batch_size}: {tiles_per_s:.1f} tiles/s, {achieved / 1e12:.1f} TFLOP/s "
              f"= {achieved / reference:.2f} of the measured {precision} matmul rate ({reference / 1e12:.1f} TFLOP/s)"
              f"{memory}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
