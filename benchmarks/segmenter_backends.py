"""The region segmenter on a CPU: PyTorch against OpenVINO, bare and inside `hepatoquant analyze`, in one run.

1. Bare: the segmenter pack's windows (uint8, already decoded, batches of ``--batch-size``) through the model the
   pipeline runs (:meth:`hepatoquant.analysis.ModelCache.segmenter`) on each backend, at the precision ``auto``
   resolves to on this CPU: windows per second, and the per-pixel labels' agreement with PyTorch fp32.
2. Whole runs: `hepatoquant analyze` with the segmenter on issue 20's mosaic slide (``--repeat`` copies of
   CMU-1-Small-Region, built by ``gpu_e2e.build_mosaic``), each backend ``--repeats`` times, alternating: wall time,
   the report's segmentation stage and total, and the share of the stitched map's tissue pixels whose label the two
   backends agree on.

Default segmenter: the demo pack (ViT-Ti/16 + LoRA + decoder, random weights: a speed measurement). ``--segmenter``
takes a pack folder (a trained one measures agreement that means something).

Usage: python benchmarks/segmenter_backends.py [--repeat 3 3] [--repeats 2] [--segmenter PACK] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import DEFAULT_SOURCE, analyze_process, build_mosaic  # noqa: E402

from hepatoquant.analysis import ModelCache  # noqa: E402
from hepatoquant.encoders import encoder_config  # noqa: E402
from hepatoquant.model_pack import ensure_demo_pack, load_model_pack  # noqa: E402
from hepatoquant.precision import resolve_precision  # noqa: E402
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack  # noqa: E402

CPU = torch.device("cpu")


def bare_windows_per_second(model, windows: torch.Tensor, batch_size: int, precision: str) -> tuple[float, np.ndarray]:
    """Windows/s of the model calls alone over ``windows`` (after one warm-up batch), and every window's labels
    (argmax per pixel, outside the timing)."""
    from hepatoquant.precision import autocast_for

    with torch.inference_mode(), autocast_for(CPU, precision):
        model(windows[:batch_size])
        started = time.perf_counter()
        logits = [model(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
        seconds = time.perf_counter() - started
    return len(windows) / seconds, np.concatenate([batch.float().argmax(1).numpy() for batch in logits])


def analyze(slide: Path, models: Path, segmenter: str, backend: str, out: Path) -> dict:
    _, wall, report = analyze_process(models, slide, out, ["--seg-model", segmenter, "--device", "cpu", "--backend",
                                                           backend, "--omit-tiles"])
    return {"wall_s": wall, "segmentation_s": report["timings_s"]["segmentation"],
            "segmenter_loading_s": report["timings_s"]["segmenter_loading"], "total_s": report["timings_s"]["total"],
            "windows": report["segmentation"]["windows_run"], "precision": report["segmentation"]["precision"],
            "backend": report["segmentation"]["backend"], "mask": tifffile.imread(next(out.glob("*.region-mask.tif")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeat", type=int, nargs=2, default=(3, 3), metavar=("ACROSS", "DOWN"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--segmenter", type=Path, help="a segmenter pack folder (default: the demo segmenter)")
    parser.add_argument("--windows", type=int, default=64, help="windows in the bare measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="the segmenter's batch size in analyze")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.environ["HEPATOQUANT_CACHE_DIR"] = str(base / "cache")  # converted graphs, here and in analyze
        models = base / "models"
        pack = load_model_pack(args.segmenter) if args.segmenter else ensure_demo_segmentation_pack(models)
        precision = resolve_precision("auto", CPU, encoder_config(pack.encoder_name).recommended_dtype)
        # The classifier analyze runs beside the segmenter: made and converted before any run is timed.
        classifier = ensure_demo_pack(models)
        ModelCache().classifier(classifier, CPU, "openvino", resolve_precision(
            "auto", CPU, encoder_config(classifier.encoder_name).recommended_dtype))
        size = pack.input_size_px
        windows = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.windows, size, size, 3), np.uint8))
        results: dict = {"segmenter": pack.name, "encoder": pack.encoder_name, "precision": precision, "bare": {}}
        reference = None
        for backend, at in (("torch", "fp32"), ("torch", precision), ("openvino", "fp32"), ("openvino", precision)):
            name = f"{backend} {at}"
            if name in results["bare"]:
                continue
            model = ModelCache().segmenter(pack, CPU, backend, at)
            rate, labels = bare_windows_per_second(model, windows, args.batch_size, at)
            reference = labels if reference is None else reference
            results["bare"][name] = {"windows_per_s": round(rate, 1),
                                     "label_agreement_with_torch_fp32": round(float((labels == reference).mean()), 4)}
            print(f"bare {name:14s} {rate:7.1f} windows/s  labels agree with torch fp32 on "
                  f"{(labels == reference).mean():.4f} of pixels")

        slide, dims = build_mosaic(args.source, base / "mosaic.tiff", tuple(args.repeat))
        segmenter = str(args.segmenter) if args.segmenter else pack.name
        runs: dict[str, list[dict]] = {"torch": [], "openvino": []}
        for repeat in range(args.repeats):
            for backend in runs:
                runs[backend].append(analyze(slide, models, segmenter, backend, base / f"{backend}-{repeat}"))
        summary = {}
        for backend, measured in runs.items():
            segmentation = statistics.median(run["segmentation_s"] for run in measured)
            summary[backend] = {
                "wall_s": round(statistics.median(run["wall_s"] for run in measured), 2),
                "total_s": round(statistics.median(run["total_s"] for run in measured), 2),
                "segmentation_s": round(segmentation, 2),
                "segmenter_loading_s": round(statistics.median(run["segmenter_loading_s"] for run in measured), 2),
                "windows": measured[0]["windows"], "windows_per_s": round(measured[0]["windows"] / segmentation, 1),
                "precision": measured[0]["precision"], "backend": measured[0]["backend"],
            }
        torch_mask, openvino_mask = runs["torch"][0]["mask"], runs["openvino"][0]["mask"]
        tissue = (torch_mask != 0) | (openvino_mask != 0)
        agreement = float((torch_mask[tissue] == openvino_mask[tissue]).mean()) if tissue.any() else None
        results |= {"slide_px": list(dims), "analyze": summary, "mask_agreement_on_tissue": agreement,
                    "segmentation_speedup": round(summary["torch"]["segmentation_s"]
                                                  / summary["openvino"]["segmentation_s"], 2),
                    "wall_speedup": round(summary["torch"]["wall_s"] / summary["openvino"]["wall_s"], 2)}
        print(f"mosaic {dims[0]} x {dims[1]} px, {summary['torch']['windows']} windows, medians of {args.repeats}:")
        for backend, row in summary.items():
            print(f"  {backend:8s} wall {row['wall_s']:6.2f} s  report total {row['total_s']:6.2f} s  segmentation "
                  f"{row['segmentation_s']:6.2f} s ({row['windows_per_s']} windows/s, {row['precision']})  "
                  f"segmenter loading {row['segmenter_loading_s']:.2f} s")
        print(f"segmentation {results['segmentation_speedup']}x, wall {results['wall_speedup']}x; region labels "
              f"agree on {agreement:.4f} of tissue pixels")
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
