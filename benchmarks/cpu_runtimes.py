"""Issue 20's CPU options side by side: one classifier, every way this CPU can run it, speed and agreement in one run.

The classifier: ``--encoder`` (default ``bench_vit_small``, the ViT-S/16 of the WSInfer comparison; random weights)
with a 8-class head fitted on the fp32 embeddings of the 32 real labelled patches (as tests/test_precision.py
does, so that top-1 is decided by a trained head, not by near-uniform random logits). Every runtime gets the same
normalised float tiles, so only the model's execution differs:

- PyTorch: fp32; bf16 autocast (HepatoQuant's ``--precision bf16``, its default where the CPU computes bf16);
  bf16 weights; dynamic INT8 of the Linear layers (``torch.ao.quantization.quantize_dynamic``, deprecated upstream);
- ONNX Runtime: the model exported with ``torch.onnx.export``, fp32, and dynamic INT8
  (``onnxruntime.quantization.quantize_dynamic``, QInt8 weights);
- OpenVINO: ``openvino.convert_model`` of the same module, compiled with ``INFERENCE_PRECISION_HINT`` f32 and bf16
  (``PERFORMANCE_HINT`` LATENCY: one request uses every core).

Speed: tiles/s on ``--tiles`` tiles in batches of ``--batch-size``, runtimes alternating, medians of ``--repeats``
rounds after a warm-up batch. Agreement against PyTorch fp32 on real H&E: the 32 patches, 224 px tiles of
CMU-1-Small-Region and tissue tiles of TCGA-CR-7395: top-1 agreement, the largest probability difference and the
mean cosine similarity of the embeddings.

Needs (benchmark only): pip install onnxruntime==1.32.0 openvino==2026.4.1 onnx==1.23.2 onnxscript==0.7.2

Usage: python benchmarks/cpu_runtimes.py [--encoder bench_vit_small] [--tiles 64] [--repeats 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import torch

from hepatoquant.bench.dataset import load_dataset, read_rgb
from hepatoquant.bench.probe import ProbeConfig, train_probe
from hepatoquant.classify import normalisation_buffers, normalise_uint8_nhwc
from hepatoquant.encoders import create_encoder

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
CRC_CLASSES = ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # normalised NCHW float32 -> (logits, embeddings)


class EncoderAndHead(torch.nn.Module):
    """Encoder + head on normalised float tiles, returning logits and the embedding (what every runtime runs)."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(pixels)
        return self.head(embedding), embedding


def real_tiles(size: int, tcga_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 32 labelled patches, their labels, and unlabelled real tiles of the two test slides (uint8 NHWC)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "crc"
        shutil.copytree(TESTDATA / "patches" / "crc-val-he-7k", root)
        (root / "dataset_meta.json").write_text(json.dumps({"classes": CRC_CLASSES}))
        dataset = load_dataset(root)
        patches = np.stack([read_rgb(dataset.path(p)) for p in dataset.patches])
        labels = np.array([CRC_CLASSES.index(p.label) for p in dataset.patches])
    slide_tiles = []
    with openslide.OpenSlide(TESTDATA / "slides" / "CMU-1-Small-Region.svs") as slide:
        width, height = slide.dimensions
        slide_tiles += [np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
                        for y in range(0, height - size, size) for x in range(0, width - size, size)]
    with openslide.OpenSlide(TESTDATA / "slides" / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        width, height = slide.dimensions
        kept = 0
        for y in range(0, height - size, size):
            for x in range(0, width - size, size):
                tile = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
                if tile.mean() < 215 and kept < tcga_tiles:  # tissue, not glass
                    slide_tiles.append(tile)
                    kept += 1
    return patches, labels, np.stack(slide_tiles)


def torch_runner(model: torch.nn.Module, autocast_bf16: bool = False) -> Runner:
    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            logits, embedding = model(torch.from_numpy(pixels).to(next(model.parameters()).dtype))
        return logits.float().numpy(), embedding.float().numpy()
    return run


def torch_int8_runner(model: torch.nn.Module) -> Runner:
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return torch_runner(quantized)


def onnx_runners(model: torch.nn.Module, size: int, folder: Path) -> dict[str, Runner]:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_file, int8_file = folder / "model.onnx", folder / "model-int8.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(fp32_file), input_names=["pixels"],
                      output_names=["logits", "embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}})
    quantize_dynamic(str(fp32_file), str(int8_file), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    runners = {}
    for name, file in (("ONNX Runtime fp32", fp32_file), ("ONNX Runtime INT8 dynamic", int8_file)):
        session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda pixels, session=session: tuple(session.run(None, {"pixels": pixels}))
    return runners


def openvino_runners(model: torch.nn.Module, size: int) -> dict[str, Runner]:
    from hepatoquant.inference_backend import import_openvino

    openvino = import_openvino()  # its usage telemetry off, as HepatoQuant runs it
    core = openvino.Core()
    converted = openvino.convert_model(model, example_input=torch.zeros(1, 3, size, size))
    runners = {}
    for hint in ("f32", "bf16"):
        compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def run(pixels: np.ndarray, request=request) -> tuple[np.ndarray, np.ndarray]:
            outputs = request.infer({0: pixels})
            return outputs[0].copy(), outputs[1].copy()
        runners[f"OpenVINO {hint}"] = run
    return runners


def in_batches(runner: Runner, pixels: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [runner(pixels[start:start + batch]) for start in range(0, len(pixels), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="bench_vit_small")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tcga-tiles", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = create_encoder(args.encoder).eval()
    size = encoder.config.input_size_px
    mean, std = normalisation_buffers(encoder.config.mean, encoder.config.std)
    patches, labels, slide_tiles = real_tiles(size, args.tcga_tiles)
    normalise = lambda tiles: normalise_uint8_nhwc(torch.from_numpy(tiles), mean, std).contiguous().numpy()  # noqa: E731
    with torch.inference_mode():
        patch_embeddings = encoder(torch.from_numpy(normalise(patches))).numpy()
    probe = train_probe(patch_embeddings, labels, patch_embeddings, labels, len(CRC_CLASSES), ProbeConfig(method="lbfgs"))
    head = torch.nn.Linear(encoder.config.embedding_dim, len(CRC_CLASSES))
    head.load_state_dict(probe.head_state())
    model = EncoderAndHead(encoder, head).eval()

    runners: dict[str, Runner] = {"PyTorch fp32": torch_runner(model),
                                  "PyTorch bf16 autocast": torch_runner(model, autocast_bf16=True)}
    bf16_model = EncoderAndHead(create_encoder(args.encoder), torch.nn.Linear(head.in_features, head.out_features))
    bf16_model.load_state_dict(model.state_dict())
    runners["PyTorch bf16 weights"] = torch_runner(bf16_model.eval().to(torch.bfloat16))
    runners["PyTorch INT8 dynamic"] = torch_int8_runner(EncoderAndHead(encoder, head).eval())
    with tempfile.TemporaryDirectory() as tmp:
        runners.update(onnx_runners(model, size, Path(tmp)))
        runners.update(openvino_runners(model, size))

        evaluation = normalise(np.concatenate([patches, slide_tiles]))
        reference_logits, reference_embeddings = in_batches(runners["PyTorch fp32"], evaluation, args.batch_size)
        reference = softmax(reference_logits)
        assert (reference[:len(patches)].argmax(axis=1) == labels).mean() == 1.0, "the head is not fitted"

        speed_tiles = normalise(np.resize(slide_tiles, (args.tiles, size, size, 3)))
        for runner in runners.values():
            runner(speed_tiles[:4])  # warm-up (first-call compilation, allocation)
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, runner in runners.items():
                started = time.perf_counter()
                in_batches(runner, speed_tiles, args.batch_size)
                seconds[name].append(time.perf_counter() - started)

        rows = []
        for name, runner in runners.items():
            logits, embeddings = in_batches(runner, evaluation, args.batch_size)
            probabilities = softmax(logits.astype(np.float32))
            cosine = np.sum(embeddings * reference_embeddings, axis=1) / (
                np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference_embeddings, axis=1))
            rows.append({"runtime": name, "tiles_per_s": round(args.tiles / statistics.median(seconds[name]), 1),
                         "top1_agreement": round(float((probabilities.argmax(1) == reference.argmax(1)).mean()), 4),
                         "max_probability_difference": round(float(np.abs(probabilities - reference).max()), 4),
                         "mean_cosine": round(float(cosine.mean()), 5)})
    fp32_rate = rows[0]["tiles_per_s"]
    print(f"{args.encoder} at {size} px, batches of {args.batch_size}, {torch.get_num_threads()} threads; agreement on "
          f"{len(evaluation)} real tiles ({len(patches)} labelled patches + {len(slide_tiles)} slide tiles)")
    print("| runtime | tiles/s | vs PyTorch fp32 | top-1 agreement | max prob. diff | mean cosine |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['runtime']} | {row['tiles_per_s']} | {row['tiles_per_s'] / fp32_rate:.2f} | "
              f"{row['top1_agreement']:.4f} | {row['max_probability_difference']:.3f} | {row['mean_cosine']:.5f} |")
    if args.out:
        args.out.write_text(json.dumps({"encoder": args.encoder, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
