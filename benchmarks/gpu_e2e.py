"""Issue 20's end-to-end benchmark, in one short call: a whole `hepatoquant analyze` against the bare encoder.

1. Builds a mosaic slide from a real one (default: CMU-1-Small-Region, 13 x 13 copies = 28,860 x 38,571 px, the
   issue's slide), a tiled pyramidal TIFF with the source's pixel size, written tile by tile (never whole in
   memory); zlib, not JPEG as Aperio's own (tifffile writes JPEG only with imagecodecs), so decoding costs differ.
2. Builds a classifier pack with UNI's architecture and random weights (``--encoder``), and the demo segmenter.
3. Measures the bare classifier (encoder + head on decoded uint8 tiles already in memory, same batch size and
   precision), then runs ``hepatoquant analyze`` as a process of its own, with and without the segmenter, and
   reads each report's timings (which cover the whole run: start-up, loading, each stage, each output).
4. Samples GPU utilisation every 0.1 s (NVML through ``torch.cuda.utilization``) and reports it over the
   classification stage.

Prints a table and writes JSON (``--out``). On a CPU, ``--smoke`` runs it small (2 x 1 mosaic, a micro encoder):
CI runs that, so that the script works when a GPU session runs it.

Usage: python benchmarks/gpu_e2e.py [--device cuda] [--encoder uni] [--repeat 13 13] [--batch-size 256]
       [--workers 12] [--out F] | --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
import torch
from safetensors.torch import save_file

from hepatoquant.analysis import ModelCache
from hepatoquant.classify import choose_device, predict_batches
from hepatoquant.encoders import create_encoder, encoder_config
from hepatoquant.pack_import import add_model_pack
from hepatoquant.inference_backend import resolve_backend
from hepatoquant.precision import resolve_precision
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack
from hepatoquant.tile_reader import TileBatch, resolve_readers

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared/testdata/slides/CMU-1-Small-Region.svs"
_TILE = 256
_MAX_SOURCE_PX = 8192


def build_mosaic(source: Path, out: Path, repeat: tuple[int, int]) -> tuple[Path, tuple[int, int]]:
    """``repeat`` = (across, down) copies of ``source``'s level 0 as a pyramidal tiled TIFF at its pixel size."""
    with openslide.OpenSlide(str(source)) as slide:
        if max(slide.dimensions) > _MAX_SOURCE_PX:  # the source is held in memory once, the mosaic never
            raise SystemExit(f"{source} is {slide.dimensions[0]} x {slide.dimensions[1]} px: give a source of at most "
                             f"{_MAX_SOURCE_PX} px a side (a region cut from a slide) and repeat it with --repeat")
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    height, width = image.shape[0] * repeat[1], image.shape[1] * repeat[0]
    downsample = 1
    with tifffile.TiffWriter(out, bigtiff=True) as writer:
        while True:
            src = image if downsample == 1 else cv2.resize(
                image, (max(1, image.shape[1] // downsample), max(1, image.shape[0] // downsample)),
                interpolation=cv2.INTER_AREA)
            level_w, level_h = width // downsample, height // downsample

            def tiles(src=src, level_w=level_w, level_h=level_h):
                for y in range(0, level_h, _TILE):
                    rows = np.arange(y, y + _TILE) % src.shape[0]
                    for x in range(0, level_w, _TILE):
                        yield src[rows][:, np.arange(x, x + _TILE) % src.shape[1]]

            per_cm = 1e4 / (mpp * downsample)
            writer.write(tiles(), shape=(level_h, level_w, 3), dtype=np.uint8, tile=(_TILE, _TILE),
                         photometric="rgb", compression="zlib", compressionargs={"level": 1},
                         subfiletype=0 if downsample == 1 else 1, resolution=(per_cm, per_cm),
                         resolutionunit="CENTIMETER", maxworkers=os.cpu_count())
            if max(level_w, level_h) <= 2048:
                break
            downsample *= 4
    return out, (width, height)


def random_classifier_pack(encoder: str, models: Path) -> object:
    """A classifier pack of ``encoder``'s architecture with random weights (throughput only: its labels mean
    nothing; the pack says "trained" because it is made through the import path users take)."""
    torch.manual_seed(0)
    weights = models.parent / f"{encoder}-random.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder(encoder).backbone.state_dict().items()}, str(weights))
    dim = encoder_config(encoder).embedding_dim
    head = models.parent / "head.pth"
    torch.save({"weight": torch.randn(7, dim) * 0.01, "bias": torch.zeros(7)}, head)
    return add_model_pack(weights, encoder=encoder, name=f"{encoder}-random", models_dir=models, head=head)


def bare_tiles_per_second(pack, device: torch.device, batch_size: int, precision: str, batches: int) -> float:
    """Encoder + head on uint8 tiles already decoded, through the pipeline's own batch predictor and backend."""
    model = ModelCache().classifier(pack, device, resolve_backend("auto", device), precision)
    size = pack.input_size_px
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8)
    warm = [TileBatch(0, pixels) for _ in range(2)]
    list(predict_batches(model, warm, device, precision=precision))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    list(predict_batches(model, [TileBatch(i * batch_size, pixels) for i in range(batches)], device,
                         precision=precision))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * batch_size / (time.perf_counter() - started)


class UtilisationSampler:
    """GPU utilisation (%) every 0.1 s with wall-clock times, while the context is open (none on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self.problem = None if device.type == "cuda" else "no GPU"

    def __enter__(self) -> UtilisationSampler:
        if self.problem is None:
            try:
                torch.cuda.utilization(self.device)
            except Exception as error:  # NVML missing: say so in the results rather than guess
                self.problem = f"NVML unavailable ({error})"
        if self.problem is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append((time.time(), torch.cuda.utilization(self.device)))

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean_between(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None


def analyze_process(models: Path, slide: Path, out: Path, options: list[str]) -> tuple[float, float, dict]:
    """``hepatoquant analyze SLIDE --out OUT OPTIONS`` as a process of its own: when it started (epoch seconds),
    its wall time and its report; a failed run ends the benchmark with its stderr."""
    command = [sys.executable, "-m", "hepatoquant.cli", "--models-dir", str(models), "analyze", str(slide),
               "--out", str(out), "--no-progress", *options]
    started_wall = time.time()
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"analyze {' '.join(options)} failed ({finished.returncode}):\n{finished.stderr[-4000:]}")
    return started_wall, wall, json.loads(next(out.glob("*.report.json")).read_text())


def run_analyze(slide: Path, models: Path, model: str, segmenter: str, readers: str, args, out: Path,
                sampler: UtilisationSampler) -> dict:
    started_wall, wall, report = analyze_process(models, slide, out, [
        "--model", model, "--seg-model", segmenter, "--device", args.device, "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--readers", readers, "--profile", str(out.parent / f"{out.name}-trace.json"),
    ] + (["--omit-tiles"] if args.omit_tiles else []))
    timings = report["timings_s"]
    trace = json.loads((out.parent / f"{out.name}-trace.json").read_text())["traceEvents"]
    classification = next((e for e in trace if e["name"] == "classification"), None)
    busy = None
    if classification is not None:  # trace times count from the process's start (within milliseconds of ours)
        begin = started_wall + classification["ts"] / 1e6
        busy = sampler.mean_between(begin, begin + classification["dur"] / 1e6)
    return {"wall_s": round(wall, 2), "readers": report["parameters"]["readers"], "tiles": report["tiles"]["count"],
            "timings_s": timings,
            "classification_tiles_per_s": report["tiles_per_second"], "gpu_busy_classification_pct": busy}


def analyze_runs(other_readers: str) -> tuple[tuple[str, str, str], ...]:
    """(label, segmenter, readers) of the analyze runs."""
    return (("with_segmenter", "demo-seg", "auto"), ("classifier_only", "none", "auto"),
            (f"classifier_only_{other_readers}", "none", other_readers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real slide the mosaic repeats")
    parser.add_argument("--repeat", type=int, nargs=2, default=(13, 13), metavar=("ACROSS", "DOWN"))
    parser.add_argument("--encoder", default="uni")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--bare-batches", type=int, default=20)
    parser.add_argument("--omit-tiles", action="store_true", help="region objects only in the GeoJSON")
    parser.add_argument("--smoke", action="store_true", help="small: 2 x 1 mosaic, micro encoder (CI on a CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.encoder, args.batch_size, args.workers, args.bare_batches = (2, 1), "test_vit_micro", 32, 2, 3
    if not args.source.is_file():
        raise SystemExit(f"the source slide {args.source} is missing: give --source (any slide OpenSlide reads)")
    device = choose_device(args.device)
    args.device = str(device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "encoder": args.encoder, "batch_size": args.batch_size, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="hq-gpu-e2e-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        slide, size = build_mosaic(args.source, work / "mosaic.tiff", tuple(args.repeat))
        results["slide_px"], results["mosaic_build_s"] = size, round(time.perf_counter() - started, 1)
        models = work / "models"
        pack = random_classifier_pack(args.encoder, models)
        ensure_demo_segmentation_pack(models)
        precision = resolve_precision("auto", device, encoder_config(args.encoder).recommended_dtype)
        results["precision"] = precision
        results["bare_tiles_per_s"] = round(bare_tiles_per_second(pack, device, args.batch_size, precision,
                                                                  args.bare_batches), 1)
        # The third run reads with the readers auto does not pick (threads on a GPU), for the ratio in one run.
        other_readers = "threads" if resolve_readers("auto", device) == "processes" else "processes"
        with UtilisationSampler(device) as sampler:
            for label, segmenter, readers in analyze_runs(other_readers):
                run = run_analyze(slide, models, pack.path.name, segmenter, readers, args, work / label, sampler)
                run["efficiency_vs_bare"] = round(run["classification_tiles_per_s"] / results["bare_tiles_per_s"], 3)
                results[label] = run
        results["gpu_utilisation"] = sampler.problem or f"{len(sampler.samples)} samples"

    print(f"{results['device']}, {args.encoder} ({precision}), slide {size[0]} x {size[1]} px, "
          f"bare {results['bare_tiles_per_s']} tiles/s")
    for label, _, _ in analyze_runs(other_readers):
        run = results[label]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in run["timings_s"].items())
        print(f"{label} ({run['readers']}): wall {run['wall_s']} s, {run['tiles']} tiles, classification "
              f"{run['classification_tiles_per_s']:.0f} tiles/s = {run['efficiency_vs_bare']} of bare, GPU busy "
              f"{run['gpu_busy_classification_pct']} % in classification\n  stages (s): {stages}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
