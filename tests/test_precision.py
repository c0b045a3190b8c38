"""The precision policy: what `auto` chooses per device, refusals, that the choice reaches the report, and that
bf16 and fp32 agree on real H&E (the 32 real patches and 117 tiles of the real CMU slide) with a head fitted on
real patches, not near-uniform random logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch

import hepatoquant.precision as precision
from hepatoquant.bench.dataset import load_dataset, read_rgb
from hepatoquant.bench.probe import ProbeConfig, train_probe
from hepatoquant.classify import PatchClassifier, predict_batches
from hepatoquant.encoders import create_encoder
from hepatoquant.errors import InvalidParameterError
from hepatoquant.precision import resolve_precision
from hepatoquant.tile_reader import TileBatch

CPU = torch.device("cpu")
CRC_CLASSES = ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


def test_auto_is_bf16_only_on_cpus_that_compute_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"  # emulated bf16 would be slower than fp32
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(InvalidParameterError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(InvalidParameterError, match="not one of"):
        resolve_precision("int8", CPU)


def test_the_report_records_the_precision(synthetic_slide: Path, tiny_classifier_pack, tmp_path: Path) -> None:
    from hepatoquant.analysis import AnalysisOptions, analyze_slide
    from hepatoquant.outputs import write_outputs

    for chosen in ("fp32", "bf16"):
        result = analyze_slide(synthetic_slide, tiny_classifier_pack, AnalysisOptions(device="cpu", precision=chosen))
        paths = write_outputs(result, tmp_path / chosen)
        assert json.loads(paths.report.read_text())["parameters"]["precision"] == chosen


@pytest.fixture(scope="module")
def real_tiles(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """The 32 real patches with their labels, and 117 real 224 px tiles of the CMU slide (unlabelled)."""
    root = tmp_path_factory.mktemp("crc") / "crc"
    shutil.copytree(testdata / "patches" / "crc-val-he-7k", root)
    (root / "dataset_meta.json").write_text(json.dumps({"classes": CRC_CLASSES}))
    dataset = load_dataset(root)
    patches = np.stack([read_rgb(dataset.path(p)) for p in dataset.patches])
    labels = np.array([CRC_CLASSES.index(p.label) for p in dataset.patches])
    with openslide.OpenSlide(testdata / "slides" / "CMU-1-Small-Region.svs") as slide:
        width, height = slide.dimensions
        tiles = [np.asarray(slide.read_region((x, y), 0, (224, 224)).convert("RGB"))
                 for y in range(0, height - 224, 224) for x in range(0, width - 224, 224)]
    return patches, labels, np.stack(tiles)


def test_bf16_agrees_with_fp32_on_real_he_with_a_trained_head(real_tiles) -> None:
    patches, labels, slide_tiles = real_tiles
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = create_encoder("demo_vit_tiny").eval()  # ViT-Ti/16 at 224 px
    model = PatchClassifier(encoder, torch.nn.Linear(encoder.config.embedding_dim, len(CRC_CLASSES)),
                            tuple(CRC_CLASSES), encoder.config.mean, encoder.config.std).eval()
    with torch.inference_mode():
        _, embeddings = model(torch.from_numpy(patches))
    head = train_probe(embeddings.numpy(), labels, embeddings.numpy(), labels, len(CRC_CLASSES),
                       ProbeConfig(method="lbfgs"))
    model.head.load_state_dict(head.head_state())
    tiles = np.concatenate([patches, slide_tiles])
    [fp32] = predict_batches(model, [TileBatch(0, tiles)], CPU, precision="fp32")
    [bf16] = predict_batches(model, [TileBatch(0, tiles)], CPU, precision="bf16")
    assert (fp32.probabilities[:32].argmax(axis=1) == labels).mean() == 1.0  # the head is trained, not random
    assert np.sort(fp32.probabilities, axis=1)[:, -1].mean() > 0.5  # confident, not near-uniform (1/8)
    agreement = (fp32.probabilities.argmax(axis=1) == bf16.probabilities.argmax(axis=1)).mean()
    assert agreement >= 0.99
    assert np.abs(fp32.probabilities - bf16.probabilities).max() < 0.1  # measured: 0.043 on these 149 tiles


def test_openvino_agrees_with_pytorch_fp32_on_real_he_with_a_trained_head(real_tiles, tmp_path: Path) -> None:
    """The OpenVINO backend (the CPU default) against PyTorch fp32, the reference, on the same real tiles: its
    f32 graph gives the same probabilities; its bf16 graph agrees on top-1 at least as the bf16 autocast must."""
    from safetensors.torch import save_file

    from hepatoquant.analysis import ModelCache
    from hepatoquant.classify import load_classifier
    from hepatoquant.pack_import import add_model_pack

    patches, labels, slide_tiles = real_tiles
    kept = labels != CRC_CLASSES.index("MUC")  # seven of the eight classes: a pack names HepatoQuant's seven codes
    patches, labels = patches[kept], np.unique(labels[kept], return_inverse=True)[1]
    codes = ("TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE")  # names only: the pack needs codes, the test none
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = create_encoder("demo_vit_tiny").eval()
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    model = PatchClassifier(encoder, torch.nn.Linear(encoder.config.embedding_dim, len(codes)),
                            codes, encoder.config.mean, encoder.config.std).eval()
    with torch.inference_mode():
        _, embeddings = model(torch.from_numpy(patches))
    head = train_probe(embeddings.numpy(), labels, embeddings.numpy(), labels, len(codes),
                       ProbeConfig(method="lbfgs"))
    save_file({k: v.contiguous() for k, v in head.head_state().items()}, str(tmp_path / "head.safetensors"))
    pack = add_model_pack(tmp_path / "encoder.safetensors", encoder="demo_vit_tiny", name="crc", head=tmp_path /
                          "head.safetensors", classes=codes, models_dir=tmp_path / "models")
    tiles = np.concatenate([patches, slide_tiles])
    [reference] = predict_batches(load_classifier(pack, CPU), [TileBatch(0, tiles)], CPU, precision="fp32",
                                  keep_embeddings=True)
    assert (reference.probabilities[:len(labels)].argmax(axis=1) == labels).mean() == 1.0  # the head is trained
    models = ModelCache()
    for chosen, largest_difference in (("fp32", 1e-4), ("bf16", 0.1)):
        compiled = models.classifier(pack, CPU, "openvino", chosen)
        assert type(compiled).__name__ == "CompiledClassifier" and compiled.precision == chosen
        [measured] = predict_batches(compiled, [TileBatch(0, tiles)], CPU, precision=chosen, keep_embeddings=True)
        agreement = (measured.probabilities.argmax(axis=1) == reference.probabilities.argmax(axis=1)).mean()
        assert agreement == 1.0 if chosen == "fp32" else agreement >= 0.99
        assert np.abs(measured.probabilities - reference.probabilities).max() < largest_difference
        assert measured.embeddings.shape == reference.embeddings.shape
