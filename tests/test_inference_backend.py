"""The models' backend: what ``auto`` chooses per device, refusals, the converted-graph cache (reused without
loading PyTorch weights, rebuilt when damaged or when the pack's files change, harmless when unwritable), the
segmenter's graph (LoRA adapter included), and that the choice reaches the report. Agreement with PyTorch on real
H&E: tests/test_precision.py (classifier) and tests/test_seg_train.py (a trained segmenter)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hepatoquant.classify import load_classifier, predict_batches
from hepatoquant.errors import InvalidParameterError, ModelPackError
from hepatoquant.inference_backend import load_openvino_classifier, load_openvino_segmenter, resolve_backend
from hepatoquant.model_pack import load_model_pack
from hepatoquant.segmentation.inference import WindowSegmenter
from hepatoquant.segmentation.pack import load_segmenter
from hepatoquant.tile_reader import TileBatch

CPU = torch.device("cpu")


def test_auto_is_openvino_on_a_cpu_and_pytorch_on_a_gpu() -> None:
    assert resolve_backend("auto", CPU) == "openvino"
    assert resolve_backend("auto", torch.device("cuda:0")) == "torch"
    assert resolve_backend("torch", CPU) == "torch" and resolve_backend("openvino", CPU) == "openvino"
    with pytest.raises(InvalidParameterError, match="runs on CPUs.*--backend torch"):
        resolve_backend("openvino", torch.device("cuda:0"))
    with pytest.raises(InvalidParameterError, match="not one of auto, torch, openvino"):
        resolve_backend("onnx", CPU)


def _never_loaded():
    raise AssertionError("the PyTorch model was loaded although its converted graph is cached")


def _tiles(pack, count: int = 6) -> np.ndarray:
    size = pack.input_size_px
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _probabilities(model, tiles: np.ndarray, precision: str = "fp32") -> np.ndarray:
    [prediction] = predict_batches(model, [TileBatch(0, tiles)], CPU, precision=precision)
    return prediction.probabilities


def test_the_converted_graph_is_cached_and_reused_without_loading_pytorch(tiny_classifier_pack, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = tiny_classifier_pack
    tiles = _tiles(pack)
    reference = _probabilities(load_classifier(pack, CPU), tiles)
    loads = []
    first = load_openvino_classifier(pack, "fp32", lambda: loads.append(1) or load_classifier(pack, CPU))
    assert loads == [1]
    [graph] = (tmp_path / "cache" / "openvino").glob("*/classifier.xml")
    assert graph.with_suffix(".bin").stat().st_size > 0
    again = load_openvino_classifier(pack, "bf16", _never_loaded)  # another precision, the same graph
    np.testing.assert_allclose(_probabilities(first, tiles), reference, atol=1e-5)
    assert (_probabilities(again, tiles, "bf16").argmax(1) == reference.argmax(1)).mean() >= 0.8


def test_a_changed_head_is_converted_again(tiny_classifier_pack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is keyed by what the graph computes: a pack whose head was retrained gets its own graph, which
    replaces the pack's earlier one (a graph is the size of the weights); another pack's graph stays."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "openvino"
    load_openvino_classifier(tiny_classifier_pack, "fp32", lambda: load_classifier(tiny_classifier_pack, CPU))
    [other] = cache.iterdir()
    copy = tmp_path / "pack"
    shutil.copytree(tiny_classifier_pack.path, copy)
    pack = load_model_pack(copy)
    head = load_file(str(pack.head_weights))
    save_file({name: tensor * 2 for name, tensor in head.items()}, str(pack.head_weights))
    load_openvino_classifier(pack, "fp32", lambda: load_classifier(pack, CPU))
    [earlier] = set(cache.iterdir()) - {other}
    save_file({name: -tensor for name, tensor in head.items()}, str(pack.head_weights))
    loads = []
    changed = load_openvino_classifier(pack, "fp32", lambda: loads.append(1) or load_classifier(pack, CPU))
    assert loads == [1] and other.is_dir() and not earlier.exists() and len(list(cache.iterdir())) == 2
    tiles = _tiles(pack)
    np.testing.assert_allclose(_probabilities(changed, tiles), _probabilities(load_classifier(pack, CPU), tiles),
                               atol=1e-5)


def test_a_damaged_cached_graph_is_converted_again_with_a_warning(tiny_classifier_pack, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = tiny_classifier_pack
    load_openvino_classifier(pack, "fp32", lambda: load_classifier(pack, CPU))
    [graph] = (tmp_path / "cache" / "openvino").glob("*/classifier.xml")
    graph.write_text("<net>not a graph")
    loads = []
    with caplog.at_level(logging.WARNING, logger="hepatoquant.inference_backend"):
        model = load_openvino_classifier(pack, "fp32", lambda: loads.append(1) or load_classifier(pack, CPU))
    assert loads == [1] and "cannot be read" in caplog.text and str(graph) in caplog.text
    tiles = _tiles(pack)
    np.testing.assert_allclose(_probabilities(model, tiles), _probabilities(load_classifier(pack, CPU), tiles), atol=1e-5)
    assert graph.read_text().startswith("<?xml")  # replaced by a good one


def test_an_unwritable_cache_costs_only_the_conversion(tiny_classifier_pack, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING):
        model = load_openvino_classifier(tiny_classifier_pack, "fp32",
                                         lambda: load_classifier(tiny_classifier_pack, CPU))
    assert "converts the model again" in caplog.text and "HEPATOQUANT_CACHE_DIR" in caplog.text
    assert _probabilities(model, _tiles(tiny_classifier_pack)).shape == (6, 7)


def test_an_encoder_pack_is_refused_as_pytorch_refuses_it(tiny_classifier_pack, tmp_path: Path) -> None:
    manifest = dict(tiny_classifier_pack.manifest)
    manifest.pop("head")
    pack = type(tiny_classifier_pack)(path=tiny_classifier_pack.path, manifest=manifest)
    with pytest.raises(ModelPackError, match="without a classifier head"):
        load_openvino_classifier(pack, "fp32", lambda: load_classifier(pack, CPU))
    with pytest.raises(InvalidParameterError, match="fp32 or bf16"):
        load_openvino_classifier(tiny_classifier_pack, "fp16", _never_loaded)


def test_analyze_records_the_backend_and_both_backends_agree(synthetic_slide: Path, tiny_classifier_pack,
                                                            tmp_path: Path) -> None:
    """`hepatoquant analyze` as a user runs it: OpenVINO by default on a CPU, --backend torch on request."""
    reports = {}
    for backend, flags in (("openvino", []), ("torch", ["--backend", "torch"])):
        out = tmp_path / backend
        subprocess.run([sys.executable, "-m", "hepatoquant.cli", "analyze", str(synthetic_slide), "--model",
                        str(tiny_classifier_pack.path), "--seg-model", "none", "--device", "cpu", "--precision",
                        "fp32", "--no-progress", "--out", str(out), *flags], check=True, capture_output=True)
        [report] = out.glob("*.report.json")
        reports[backend] = json.loads(report.read_text())
        assert reports[backend]["parameters"]["backend"] == backend
        assert ("openvino" in reports[backend]["versions"]) == (backend == "openvino")
    tiles = {name: report["tiles"]["count"] for name, report in reports.items()}
    assert tiles["openvino"] == tiles["torch"] > 0
    shares = {name: [region["class_tiles"] for region in report["composition"]["regions"]]
              for name, report in reports.items()}
    assert shares["openvino"] == shares["torch"]


def test_converting_a_model_sends_no_telemetry(tiny_classifier_pack, tmp_path: Path) -> None:
    """OpenVINO's conversion otherwise writes a client id and statistics under ~/intel and sends them to Google
    Analytics from a forked process (it did in this project's first runs; the fork broke a serving test)."""
    home = tmp_path / "home"
    home.mkdir()
    script = ("import sys, torch; from hepatoquant.classify import load_classifier; "
              "from hepatoquant.inference_backend import load_openvino_classifier; "
              "from hepatoquant.model_pack import load_model_pack; pack = load_model_pack(sys.argv[1]); "
              "load_openvino_classifier(pack, 'fp32', lambda: load_classifier(pack, torch.device('cpu'))); "
              "print(type(sys.modules['openvino.tools.ovc.convert_impl'].tm).__name__, "
              "sys.modules['openvino.tools.ovc.convert_impl'].tm.__name__)")
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "TF_BUILD", "JENKINS_URL")}
    completed = subprocess.run([sys.executable, "-c", script, str(tiny_classifier_pack.path)], capture_output=True,
                               text=True, check=True, env={**environment, "HOME": str(home),
                                                           "HEPATOQUANT_CACHE_DIR": str(tmp_path / "cache")})
    assert completed.stdout.split() == ["module", "openvino.tools.ovc.telemetry_stub"]
    assert list(home.iterdir()) == []  # no ~/intel/openvino_ga_cid, no ~/intel/stats


_MODELS_RELEASED_OUT_OF_ORDER = """
import gc, os, signal, sys, torch
from hepatoquant.classify import load_classifier
from hepatoquant.inference_backend import load_openvino_classifier
from hepatoquant.model_pack import load_model_pack
pack = load_model_pack(sys.argv[1])
first, second = (load_openvino_classifier(pack, precision, lambda: load_classifier(pack, torch.device("cpu")))
                 for precision in ("fp32", "bf16"))
del first; gc.collect()
del second; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive")
"""


def test_models_released_in_any_order_leave_signals_working(tiny_classifier_pack, tmp_path: Path) -> None:
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack per Core and puts the previous one back when
    the Core goes: released first-made-first, the thread was left on an unmapped stack and the next signal Python
    handled killed the process (SIGSEGV; a server whose child ended, or a SIGTERM). One Core per process."""
    completed = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _MODELS_RELEASED_OUT_OF_ORDER,
                                str(tiny_classifier_pack.path)], capture_output=True, text=True,
                               env={**os.environ, "HEPATOQUANT_CACHE_DIR": str(tmp_path / "cache")})
    assert (completed.returncode, completed.stdout.split()) == (0, ["handled", "alive"]), completed.stderr[-2000:]


@pytest.fixture()
def micro_segmenter_pack(tmp_path: Path):
    """A segmenter pack on the micro test encoder whose LoRA adapter matters: LayerScale gammas 1 (timm starts them
    near zero, which hides what the blocks compute) and LoRA B matrices drawn at random (peft starts them at zero;
    a trained adapter's are not)."""
    from hepatoquant.segmentation.model import LoRASettings, build_segmentation_model
    from hepatoquant.segmentation.pack import write_segmentation_pack

    lora = LoRASettings(rank=4, alpha=8.0, dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_segmentation_model("test_vit_micro", lora=lora, decoder_width=32)
        for name, parameter in model.encoder.backbone.named_parameters():
            if name.endswith(".gamma"):
                parameter.data.fill_(1.0)
            elif "lora_B" in name:
                parameter.data.normal_(0.0, 0.5)
    return write_segmentation_pack(tmp_path / "models" / "micro-seg", model, lora=lora, decoder_width=32)


def _windows(pack, count: int = 3) -> torch.Tensor:
    size = pack.input_size_px
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def _torch_segmenter(pack) -> WindowSegmenter:
    return WindowSegmenter(load_segmenter(pack, CPU), pack.mean, pack.std).eval()


def test_the_segmenter_with_its_lora_adapter_is_converted_cached_and_reused(micro_segmenter_pack, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = micro_segmenter_pack
    windows = _windows(pack)
    with torch.inference_mode():
        reference = _torch_segmenter(pack)(windows)
        without_adapter = WindowSegmenter(_base_only(pack), pack.mean, pack.std)(windows)
    assert (reference - without_adapter).abs().max() > 1e-2  # the adapter changes the logits: it must be converted
    loads = []
    first = load_openvino_segmenter(pack, "fp32", lambda: loads.append(1) or _torch_segmenter(pack))
    assert loads == [1]
    [graph] = (tmp_path / "cache" / "openvino").glob("segmenter-*/segmenter.xml")
    again = load_openvino_segmenter(pack, "bf16", _never_loaded)
    assert (first.input_size_px, first.patch_size_px, first.classes) == (pack.input_size_px, 8, pack.classes)
    logits = first(windows)
    assert logits.shape == reference.shape
    np.testing.assert_allclose(logits.numpy(), reference.numpy(), atol=1e-4)
    assert (again(windows).argmax(1) == reference.argmax(1)).float().mean() >= 0.95


def _base_only(pack):
    """The pack's segmenter with its LoRA layers switched off (peft's disable_adapter)."""
    model = load_segmenter(pack, CPU)
    model.peft_model.base_model.disable_adapter_layers()
    return model


def test_a_changed_adapter_is_converted_again(micro_segmenter_pack, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyed by every file of the pack: a retrained adapter (backbone and decoder unchanged) gets its own graph,
    which replaces the earlier one."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = micro_segmenter_pack
    load_openvino_segmenter(pack, "fp32", lambda: _torch_segmenter(pack))
    [earlier] = (tmp_path / "cache" / "openvino").iterdir()
    adapter = pack.path / "adapter" / "adapter_model.safetensors"
    save_file({name: -tensor for name, tensor in load_file(str(adapter)).items()}, str(adapter))
    loads = []
    changed = load_openvino_segmenter(pack, "fp32", lambda: loads.append(1) or _torch_segmenter(pack))
    [now] = (tmp_path / "cache" / "openvino").iterdir()
    assert loads == [1] and now != earlier and json.loads((now / "source.json").read_text())["graph"] == "segmenter"
    windows = _windows(pack)
    with torch.inference_mode():
        np.testing.assert_allclose(changed(windows).numpy(), _torch_segmenter(pack)(windows).numpy(), atol=1e-4)


def test_a_swapped_backbone_outside_the_pack_is_not_served_from_the_cache(micro_segmenter_pack, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest may name its backbone beside the pack (weights are relative to it): that file is part of the key
    too, so a backbone swapped there reaches PyTorch's check (the adapter was trained on other weights) instead of
    a graph converted from the old one."""
    from safetensors.torch import load_file, save_file

    from hepatoquant.errors import WeightsMismatchError
    from hepatoquant.model_pack import MANIFEST_NAME

    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = micro_segmenter_pack
    beside = pack.path.parent / "shared-backbone.safetensors"
    pack.encoder_weights.rename(beside)
    manifest = json.loads((pack.path / MANIFEST_NAME).read_text())
    manifest["encoder"]["weights"] = "../shared-backbone.safetensors"
    (pack.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    pack = load_model_pack(pack.path)
    load_openvino_segmenter(pack, "fp32", lambda: _torch_segmenter(pack))
    save_file({name: tensor * 1.5 for name, tensor in load_file(str(beside)).items()}, str(beside))
    with pytest.raises(WeightsMismatchError, match="trained on backbone weights"):
        load_openvino_segmenter(pack, "fp32", lambda: _torch_segmenter(pack))


def test_a_classifier_pack_is_refused_as_a_segmenter(tiny_classifier_pack) -> None:
    with pytest.raises(ModelPackError, match="not a segmenter pack"):
        load_openvino_segmenter(tiny_classifier_pack, "fp32", lambda: _torch_segmenter(tiny_classifier_pack))
