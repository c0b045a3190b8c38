"""Segmentation benchmarks: stitching overhead, and the memory of the stitched map for a 100k x 100k px slide.

1. Overhead: ``segment_slide`` on a generated slide (window reading, blending, stitching, argmax) divided by the
   bare segmenter on the same number of already-decoded windows, same batch size and threads, in one run
   (alternating, medians). Target: at most 1.15.
2. Memory: the stitched map of a 100,000 x 100,000 px slide at 0.25 um/px (a 40x scan, 25 x 25 mm) at the
   default map resolution (8 um/px). The slide is "virtual": its size is 100k x 100k, its tissue mask has tissue
   only in one corner, backed by a small generated file there, so only the map's size follows the slide. Peak
   memory allocated during ``segment_slide`` is measured with tracemalloc (numpy reports its buffers to it).

Usage: python benchmarks/segmentation.py [--model demo-seg] [--size 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from shapely.geometry import MultiPolygon

from hepatoquant.classify import choose_device
from hepatoquant.pack_lookup import resolve_model_pack
from hepatoquant.segmentation.inference import SlidingWindowParams, segment_slide, window_grid
from hepatoquant.segmentation.pack import load_segmenter
from hepatoquant.slide import Slide
from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide
from hepatoquant.tissue import TissueMask, detect_tissue


def _bare(model, pixels: np.ndarray, batch_size: int, mean, std, device) -> float:
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(pixels[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float()
            model((batch - mean_t) / std_t)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-seg")
    parser.add_argument("--size", type=int, default=8192, help="generated slide side in px at 0.5 um/px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    pack = resolve_model_pack(args.model)
    device = choose_device(args.device)
    model = load_segmenter(pack, device)
    params = SlidingWindowParams()
    window_px = model.encoder.config.input_size_px
    print(f"segmenter {pack.name} ({pack.encoder_name}, {window_px} px windows at {pack.spacing_um_px} um/px, "
          f"overlap {params.overlap}), device {device}, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        size = args.size
        spec = SyntheticSlideSpec(width_px=size, height_px=size, tumour=(Ellipse(size * 0.3, size * 0.4, size * 0.12, size * 0.15),))
        slide_path = write_synthetic_slide(Path(tmp) / "seg.tiff", spec)
        with Slide(slide_path) as slide:
            tissue = detect_tissue(slide)
            dims, mpp = slide.dimensions, slide.mpp_um_px
        kwargs = dict(mean=pack.mean, std=pack.std, window_spacing_um_px=pack.spacing_um_px, params=params, device=device)
        windows = segment_slide(slide_path, dims, mpp, tissue, model, **kwargs).windows_run
        pixels = np.random.default_rng(0).integers(0, 256, (windows, window_px, window_px, 3), dtype=np.uint8)
        whole, bare = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            segment_slide(slide_path, dims, mpp, tissue, model, **kwargs)
            whole.append(time.perf_counter() - started)
            bare.append(_bare(model, pixels, params.batch_size, pack.mean, pack.std, device))
        whole_s, bare_s = statistics.median(whole), statistics.median(bare)
        print(f"1. {size} x {size} px slide, {windows} windows with tissue")
        print(f"   whole-slide segmentation {whole_s:.2f} s (runs {', '.join(f'{t:.2f}' for t in whole)})")
        print(f"   bare model, same windows {bare_s:.2f} s (runs {', '.join(f'{t:.2f}' for t in bare)})")
        print(f"   stitching overhead ratio {whole_s / bare_s:.3f} of medians, {min(whole) / min(bare):.3f} of the best "
              "runs (target <= 1.15)")

        # 2. A 100k x 100k px slide at 0.25 um/px whose tissue (in a corner) is the small file's.
        virtual_size, virtual_mpp = (100_000, 100_000), 0.25
        small_tissue_level0 = spec.width_px * 0.5 / virtual_mpp  # the small slide read as if it were 0.25 um/px
        downsample = 32.0  # 8 um/px mask at 0.25 um/px
        mask = np.zeros((round(virtual_size[1] / downsample), round(virtual_size[0] / downsample)), dtype=bool)
        corner = int(min(spec.width_px, small_tissue_level0) / downsample)
        mask[:corner, :corner] = True
        virtual_tissue = TissueMask(mask, downsample, 8.0, MultiPolygon(), 20, np.zeros((1, 1, 3), np.uint8))
        grid, total = window_grid(virtual_size, virtual_mpp, window_px * pack.spacing_um_px / virtual_mpp,
                                  params.overlap, virtual_tissue)
        tracemalloc.start()
        result = segment_slide(slide_path, virtual_size, virtual_mpp, virtual_tissue, model, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        map_bytes = result.probabilities.nbytes + result.mask.nbytes
        print(f"2. 100,000 x 100,000 px at {virtual_mpp} um/px: map {result.mask.shape[1]} x {result.mask.shape[0]} px "
              f"at {result.spacing_um_px} um/px, {result.windows_run} of {total} windows run")
        print(f"   map arrays kept {map_bytes / 2**20:.1f} MiB; peak allocated during segmentation {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
