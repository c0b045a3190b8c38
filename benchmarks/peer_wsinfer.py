"""Side by side with WSInfer 0.6.1: the same encoder + head on the same slides, end-to-end tiles per second.

WSInfer is installed in its own virtual environment (``--wsinfer-venv``, created on first use with the same
pinned torch / torchvision, then ``pip install wsinfer==0.6.1``). The classifier (``--encoder``: the demo's
ViT-Ti/16, or ViT-S/16 as in the issue's WSInfer measurement, random weights, + 7-class head) is exported as TorchScript (uint8-free: it takes the normalised float tensor WSInfer gives it) with a WSInfer model
config: 150 px at 0.5 um/px, resize to 224, ImageNet normalisation. WSInfer downloads its model registry when
imported; here it is pointed at a local empty registry instead, so nothing is downloaded.

Runs, alternating ``--repeats`` times: ``wsinfer run`` on a folder holding one slide, and ``hepatoquant analyze`` on
the same slide (whole tissue, no segmenter, at HepatoQuant's default precision and ``--backend``, default auto;
its converted OpenVINO graph is cached before the runs, as after a user's first run). Each tool's wall time counts its
whole process (start-up included), peak memory is the process's maximum RSS; tiles/s = that tool's tile count /
seconds. Each tool's efficiency = its tiles/s against its own model alone on the same number of decoded tiles
(WSInfer's: the TorchScript model in fp32, as WSInfer runs it; HepatoQuant's: the classifier at its precision).

``mosaic`` is issue 20's CPU slide: ``--mosaic-repeat`` copies (default 6 x 6 = 13,320 x 17,802 px, about 4,000
tiles) of CMU-1-Small-Region's real H&E, built as benchmarks/gpu_e2e.py builds it (zlib tiles, not JPEG).

Usage: python benchmarks/peer_wsinfer.py [--slides CMU TCGA generated mosaic] [--repeats 2] [--wsinfer-venv PATH]
       [--generated-size 8192] [--mosaic-repeat 6 6] [--encoder demo_vit_tiny|bench_vit_small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata" / "slides"
WSINFER_VERSION = "0.6.1"

_LAUNCHER = """
import sys, wsinfer_zoo.client as client
registry = sys.argv.pop(1)
original = client.load_registry
client.load_registry = lambda registry_file=None: original(registry_file or registry)
from wsinfer.cli.cli import cli
cli()
"""


def ensure_wsinfer(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (python.exists() and subprocess.run([python, "-c", "import wsinfer"], capture_output=True).returncode == 0):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.14.1", "torchvision==0.29.1"], check=True)
        # wsinfer 0.6.1 imports zarr.storage.KVStore, which zarr 3 removed, so zarr 2 and a tiffslide made for it;
        # OpenSlide as its slide reader, as HepatoQuant's
        subprocess.run([python, "-m", "pip", "install", "-q", f"wsinfer=={WSINFER_VERSION}", "zarr<3", "tiffslide<3",
                        "openslide-python==1.4.7", "openslide-bin==4.0.1.2"], check=True)
    return python


class _Exported(torch.nn.Module):
    """Encoder + head on normalised float tiles (what WSInfer feeds a model)."""

    def __init__(self, classifier) -> None:
        super().__init__()
        self.encoder, self.head = classifier.encoder, classifier.head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))


def export_for_wsinfer(pack, folder: Path) -> tuple[Path, Path]:
    from hepatoquant.classify import load_classifier

    model = _Exported(load_classifier(pack, torch.device("cpu"))).eval()
    traced = torch.jit.trace(model, torch.zeros(1, 3, pack.input_size_px, pack.input_size_px))
    model_path = folder / "model.pt"
    traced.save(str(model_path))
    config = {
        "spec_version": "1.0", "architecture": pack.encoder_name, "num_classes": len(pack.classes),
        "class_names": list(pack.classes), "patch_size_pixels": pack.tile_size_px, "spacing_um_px": pack.spacing_um_px,
        "transform": [{"name": "Resize", "arguments": {"size": pack.input_size_px}}, {"name": "ToTensor"},
                      {"name": "Normalize", "arguments": {"mean": list(pack.mean), "std": list(pack.std)}}],
    }
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    return model_path, config_path


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, from wait4) of a child process."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            output.seek(0)
            raise RuntimeError(f"{command[0]} failed:\n{output.read().decode(errors='replace')[-4000:]}")
    return seconds, usage.ru_maxrss / 1024


def wsinfer_tiles(results: Path) -> int:
    import csv

    [table] = (results / "model-outputs-csv").glob("*.csv")
    with table.open() as handle:
        return sum(1 for _ in csv.DictReader(handle))


def bare_rate(model, tiles: np.ndarray, precision: str, batch: int = 32) -> float:
    from hepatoquant.precision import autocast_for

    started = time.perf_counter()
    with torch.inference_mode(), autocast_for(torch.device("cpu"), precision):
        for start in range(0, len(tiles), batch):
            model(torch.from_numpy(tiles[start:start + batch]))
    return len(tiles) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", nargs="+", default=["CMU", "TCGA", "generated"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wsinfer-venv", type=Path, default=REPO / ".tools" / "wsinfer-venv")
    parser.add_argument("--generated-size", type=int, default=8192)
    parser.add_argument("--mosaic-repeat", type=int, nargs=2, default=(6, 6), metavar=("ACROSS", "DOWN"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                        help="HepatoQuant's classifier backend (its default: auto, OpenVINO on a CPU)")
    parser.add_argument("--encoder", default="demo_vit_tiny", choices=("demo_vit_tiny", "bench_vit_small"),
                        help="the encoder both tools run (random weights): ViT-Ti/16 or ViT-S/16")
    args = parser.parse_args()
    from hepatoquant.analysis import ModelCache
    from hepatoquant.inference_backend import resolve_backend
    from hepatoquant.model_pack import ensure_demo_pack
    from hepatoquant.precision import resolve_precision
    from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide

    python = ensure_wsinfer(args.wsinfer_venv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pack = ensure_demo_pack(base / "models", encoder=args.encoder)
        model_path, config_path = export_for_wsinfer(pack, base)
        (base / "registry.json").write_text('{"models": {}}')
        (base / "launch.py").write_text(_LAUNCHER)
        slides = {}
        for name in args.slides:
            if name == "CMU":
                slides[name] = TESTDATA / "CMU-1-Small-Region.svs"
            elif name == "TCGA":
                slides[name] = TESTDATA / "TCGA-CR-7395-01A-01-TS1.svs"
            elif name == "mosaic":
                sys.path.insert(0, str(Path(__file__).parent))
                from gpu_e2e import build_mosaic

                slides[name], _ = build_mosaic(TESTDATA / "CMU-1-Small-Region.svs", base / "mosaic.tiff",
                                               tuple(args.mosaic_repeat))
            else:
                size = args.generated_size
                slides[name] = write_synthetic_slide(base / "generated.tiff", SyntheticSlideSpec(
                    width_px=size, height_px=size, tumour=(Ellipse(size * 0.3, size * 0.4, size * 0.1, size * 0.12),)))
        env = {**os.environ, "HEPATOQUANT_MODELS_DIR": str(base / "models")}
        exported = torch.jit.load(str(model_path))
        precision = resolve_precision("auto", torch.device("cpu"))
        backend = resolve_backend(args.backend, torch.device("cpu"))  # HepatoQuant's bare model: what analyze runs
        classifier = ModelCache().classifier(pack, torch.device("cpu"), backend, precision)
        for name, slide in slides.items():
            folder = base / f"in-{name}"
            folder.mkdir()
            (folder / slide.name).symlink_to(slide)
            mpp = ["--mpp", "0.5"] if name == "TCGA" else []  # TCGA has no MPP in its metadata
            if mpp:
                print(f"{name}: no MPP in the file; WSInfer cannot be told one, so it is skipped for this slide")
            runs = {"wsinfer": [], "hepatoquant": []}
            for repeat in range(args.repeats):
                if not mpp:
                    out = base / f"ws-{name}-{repeat}"
                    runs["wsinfer"].append(timed([str(python), str(base / "launch.py"), str(base / "registry.json"), "--backend", "openslide",
                                                  "run", "-i", str(folder), "-o", str(out), "-p", str(model_path),
                                                  "-c", str(config_path), "-b", "32", "-n", "2"]) + (wsinfer_tiles(out),))
                out = base / f"hq-{name}-{repeat}"
                seconds, peak = timed([str(REPO / ".venv" / "bin" / "hepatoquant"), "analyze", str(slide), "--out",
                                       str(out), "--device", "cpu", "--backend", args.backend, "--seg-model", "none",
                                       "--no-progress", *mpp], env)
                [report] = out.glob("*.report.json")
                runs["hepatoquant"].append((seconds, peak, json.loads(report.read_text())["tiles"]["count"]))
            rates = {}
            for tool, measured in runs.items():
                if not measured:
                    continue
                tiles = measured[0][2]
                seconds = statistics.median(m[0] for m in measured)
                rates[tool] = tiles / seconds
                decoded = np.random.default_rng(0).integers(0, 256, (min(tiles, 256), 224, 224, 3), dtype=np.uint8)
                if tool == "wsinfer":
                    floats = torch.from_numpy(decoded).permute(0, 3, 1, 2).float().div(255).contiguous().numpy()
                    bare = bare_rate(exported, floats, "fp32")
                else:
                    bare = bare_rate(classifier, decoded, precision)
                print(f"{name} {slide.name}: {tool}: {tiles} tiles, median {seconds:.1f} s -> {rates[tool]:.1f} tiles/s "
                      f"end to end; bare model {bare:.1f} tiles/s; efficiency {rates[tool] / bare:.3f}; peak RSS "
                      f"{max(m[1] for m in measured):.0f} MiB")
            if len(rates) == 2:
                print(f"{name}: HepatoQuant / WSInfer = {rates['hepatoquant'] / rates['wsinfer']:.2f}")


if __name__ == "__main__":
    main()
