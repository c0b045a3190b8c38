"""What runs the classifier and the segmenter: PyTorch, or OpenVINO on CPUs; one machine's choice, recorded.

OpenVINO compiles the whole classifier (normalisation, encoder, head) for the CPU it runs on, where PyTorch runs
eager kernels one by one. Measured side by side on this project's 2-core CPU (AVX512-BF16, no AMX) with PyTorch,
ONNX Runtime and INT8 (``benchmarks/cpu_runtimes.py``, README "Backend and precision"): a ViT-S/16 ran at 34.9
tiles/s in OpenVINO f32 against 15.4 in PyTorch fp32 (identical top-1), and 66.7 in OpenVINO bf16 against 39.1
under PyTorch's bf16 autocast (top-1 agreement with fp32 0.997 and 0.994 on 351 real tiles); the INT8 options
were faster than fp32 but agreed on only 96-97 %. So ``auto`` is OpenVINO on a CPU and PyTorch on a GPU;
``torch`` forces PyTorch (the reference: training runs there); ``openvino`` refuses a GPU.

Converting a model (``openvino.convert_model`` traces the PyTorch module) takes seconds (3.7 s for a ViT-S/16,
more for the foundation models), so the converted graph is kept in the cache folder (``$HEPATOQUANT_CACHE_DIR``),
keyed by what it computes: the weights' and head's SHA-256 (themselves cached while the files are unchanged),
the encoder's registered configuration, the pack's classes and normalisation and the library versions. A later
run reads it (0.02 s) and compiles it (0.3 s) without loading the PyTorch model at all. A cache entry that cannot
be read is converted again, with a warning; one that cannot be written costs the conversion next time. A
pack's new graph replaces those of its earlier content (a graph is the size of the weights).

The region segmenter (LoRA-adapted encoder and decoder, normalisation included) is converted and cached the same
way, keyed by every file of its pack: the demo segmenter's windows ran at 130.8 windows/s in OpenVINO bf16 against
76.8 under PyTorch's bf16 autocast on the same CPU (f32: 54.7 against 36.3; benchmarks/segmenter_backends.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from hepatoquant.errors import InvalidParameterError

__all__ = [
    "BACKENDS",
    "CompiledClassifier",
    "CompiledSegmenter",
    "import_openvino",
    "load_openvino_classifier",
    "load_openvino_segmenter",
    "resolve_backend",
]

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "openvino")
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Bump when what PatchClassifier computes changes without its weights or the encoder's configuration changing.
_GRAPH_VERSION = 1
_SOURCE_FILE = "source.json"  # in each cache entry: what it was converted from (see _store)


def import_openvino():
    """``openvino``, with its usage telemetry off.

    OpenVINO's model conversion sends usage data to Google Analytics unless the user has opted out (a consent file
    under ``~/intel``): it writes a client id and statistics there and sends them from a forked process. HepatoQuant
    runs on hospital machines and beside gRPC's threads (which a fork disturbs), so OpenVINO is imported with its
    telemetry package hidden, and its conversion modules then use their own stub (each imports
    ``openvino.tools.ovc.telemetry_stub`` when ``openvino_telemetry`` cannot be imported). Only OpenVINO's optional
    telemetry is affected; tests/test_inference_backend.py checks the stub is the one used.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # an import of it raises ImportError: OpenVINO's stub
    import openvino

    return openvino


_core = None
_core_lock = threading.Lock()


def _openvino_core():
    """The process's one ``openvino.Core``, made on first use and never released.

    OpenVINO's CPU plugin, loaded once per Core, replaces the loading thread's alternate signal stack with one it
    maps and puts the previous one back when the Core is released (``SigAltStackSetup`` in its plugin.cpp, for
    AMX's larger signal frames). Cores released in any other order than last made, first released leave the thread
    pointing at a stack already unmapped, and the next signal handled there (Python handles signals on the
    alternate stack) kills the process with SIGSEGV: a test run died that way when a server's child was killed.
    One Core for the process makes one plugin, one stack swap, and no release before exit.
    """
    global _core
    with _core_lock:
        if _core is None:
            _core = import_openvino().Core()
        return _core


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend to run with (``torch`` or ``openvino``) for ``requested`` on ``device``."""
    if requested not in BACKENDS:
        raise InvalidParameterError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "openvino" if device.type == "cpu" else "torch"
    if requested == "openvino" and device.type != "cpu":
        raise InvalidParameterError(f"--backend openvino runs on CPUs, not on {device}; use --backend torch (or "
                                    "auto) on a GPU")
    return requested


class _CompiledModel:
    """A model compiled by OpenVINO for this CPU at one precision, with one inference request shared under a lock:
    a server's jobs and ClassifyTiles calls take turns, as they would for the CPU's cores anyway."""

    def __init__(self, compiled, *, classes: tuple[str, ...], precision: str) -> None:
        self.classes = classes
        self.precision = precision
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def _infer(self, pixels_uint8_nhwc: torch.Tensor) -> list[torch.Tensor]:
        with self._lock:
            outputs = self._request.infer({0: pixels_uint8_nhwc.numpy()})
            return [torch.from_numpy(outputs[i].copy()) for i in range(len(outputs))]  # the request reuses its buffers


class CompiledClassifier(_CompiledModel):
    """A pack's classifier compiled by OpenVINO, called like :class:`hepatoquant.classify.PatchClassifier`
    (uint8 NHWC tiles -> logits, embeddings)."""

    def __call__(self, tiles_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embeddings = self._infer(tiles_uint8_nhwc)
        return logits, embeddings


class CompiledSegmenter(_CompiledModel):
    """A segmenter pack compiled by OpenVINO, called like
    :class:`hepatoquant.segmentation.inference.WindowSegmenter` (uint8 NHWC windows -> per-pixel logits)."""

    def __init__(self, compiled, *, classes: tuple[str, ...], precision: str, input_size_px: int,
                 patch_size_px: int) -> None:
        super().__init__(compiled, classes=classes, precision=precision)
        self.input_size_px = input_size_px
        self.patch_size_px = patch_size_px

    def __call__(self, windows_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        [logits] = self._infer(windows_uint8_nhwc)
        return logits


def load_openvino_classifier(pack, precision: str, load_torch: Callable[[], torch.nn.Module]) -> CompiledClassifier:
    """``pack``'s classifier compiled for this CPU at ``precision`` (``fp32`` or ``bf16``): from the converted
    graph in the cache when there is one, else converted from ``load_torch()`` and cached."""
    _check_precision(precision)
    if pack.kind != "classifier" or pack.head_weights is None:
        load_torch()  # refuses the pack, saying why (an encoder or segmenter pack)
    from hepatoquant.weights_digest import weights_sha256

    identity = {
        "encoder_weights": weights_sha256(pack.encoder_weights),
        "head": weights_sha256(pack.head_weights),
        "classes": list(pack.classes), "mean": list(pack.mean), "std": list(pack.std),
    }
    graph_file = _cache_folder(pack, pack.encoder_name, identity, ("openvino", "torch", "timm")) / "classifier.xml"
    compiled = _compiled(graph_file, load_torch, pack.input_size_px, precision, _source(pack, "classifier", identity))
    return CompiledClassifier(compiled, classes=pack.classes, precision=precision)


def load_openvino_segmenter(pack, precision: str, load_torch: Callable[[], torch.nn.Module]) -> CompiledSegmenter:
    """``pack``'s segmenter (a :class:`~hepatoquant.segmentation.inference.WindowSegmenter` from ``load_torch()``)
    compiled for this CPU at ``precision``, from the cache when it holds the graph; keyed by every file of the
    pack (backbone, LoRA adapter, decoder, manifest) and the backbone its manifest names, wherever it lies."""
    _check_precision(precision)
    if pack.kind != "segmenter":
        load_torch()  # refuses the pack, saying why
    from hepatoquant.weights_digest import weights_sha256

    files = {path for path in pack.path.rglob("*") if path.is_file()} | {pack.encoder_weights}
    identity = {"files": {os.path.relpath(path, pack.path): weights_sha256(path) for path in files}}
    versions = ("openvino", "torch", "timm", "peft")
    graph_file = _cache_folder(pack, f"segmenter-{pack.encoder_name}", identity, versions) / "segmenter.xml"
    compiled = _compiled(graph_file, load_torch, pack.input_size_px, precision, _source(pack, "segmenter", identity))
    config = _encoder_config(pack.encoder_name)
    return CompiledSegmenter(compiled, classes=pack.classes, precision=precision, input_size_px=pack.input_size_px,
                             patch_size_px=config.patch_size_px)


def _check_precision(precision: str) -> None:
    if precision not in _PRECISION_HINTS:
        raise InvalidParameterError(f"--backend openvino runs fp32 or bf16, not {precision}; use --backend torch")


def _encoder_config(name: str):
    from hepatoquant.encoders import encoder_config

    return encoder_config(name)


def _compiled(graph_file: Path, load_torch: Callable[[], torch.nn.Module], size: int, precision: str,
              source: dict[str, str]):
    """The graph in ``graph_file`` (else converted from ``load_torch()`` and stored there with ``source``, which
    replaces the pack's earlier graphs) compiled for the CPU."""
    core = _openvino_core()
    graph = None
    if graph_file.is_file():
        try:
            graph = core.read_model(str(graph_file))
        except RuntimeError as error:
            log.warning("the cached OpenVINO graph %s cannot be read (%s): converting the model again", graph_file, error)
    if graph is None:
        graph = _convert(load_torch(), size)
        _store(graph, graph_file, source)
    return core.compile_model(graph, "CPU", {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request uses every core (THROUGHPUT splits them into streams)
    })


def _convert(model: torch.nn.Module, size: int):
    openvino = import_openvino()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and constant-folding notes: not the user's business
        return openvino.convert_model(model, example_input=torch.zeros(1, size, size, 3, dtype=torch.uint8),
                                      input=[(openvino.PartialShape([-1, size, size, 3]), openvino.Type.u8)])


def _cache_folder(pack, stem: str, identity: dict, libraries: tuple[str, ...]) -> Path:
    """The cache folder of the graph computed by ``pack`` as ``identity`` (digests, settings) says, under these
    library versions."""
    identity = identity | {
        "graph": _GRAPH_VERSION,
        "versions": {name: metadata.version(name) for name in libraries},
        "encoder": repr(_encoder_config(pack.encoder_name)),
        "input_size_px": pack.input_size_px,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    from hepatoquant.weights_digest import default_cache_dir

    return default_cache_dir() / "openvino" / f"{stem}-{key}"


def _source(pack, graph: str, identity: dict) -> dict[str, str]:
    """What a cache entry was converted from: the pack's folder, which graph, and a digest of the pack's content
    (``identity``: weights, head, classes...), library versions left out."""
    content = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"pack": str(pack.path.resolve()), "graph": graph, "content": content}


def _store(graph, graph_file: Path, source: dict[str, str]) -> None:
    """Keep ``graph`` in its cache folder with ``source.json``, then remove the same pack's graphs of earlier
    content: a retrained adapter or head would otherwise leave a copy the size of the weights per version (1.2 GB
    for UNI). Graphs of the same content under other library versions stay (another environment may use them)."""
    openvino = import_openvino()

    from hepatoquant.atomic_write import staged_folder

    try:
        with staged_folder(graph_file.parent, replace=True) as staging:
            openvino.save_model(graph, str(staging / graph_file.name), compress_to_fp16=False)  # the weights as they are
            (staging / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
    except OSError as error:
        log.warning("the converted OpenVINO graph cannot be kept in %s (%s): the next run converts the model again; "
                    "set $HEPATOQUANT_CACHE_DIR to a writable folder", graph_file.parent, error)
        return
    _remove_earlier_content(graph_file.parent, source)


def _remove_earlier_content(kept: Path, source: dict[str, str]) -> None:
    for folder in kept.parent.iterdir():
        try:
            other = json.loads((folder / _SOURCE_FILE).read_text())
        except (OSError, ValueError):
            continue  # not an entry, one being written, or one from before source.json: left as it is
        if folder != kept and (other.get("pack"), other.get("graph")) == (source["pack"], source["graph"]) and (
                other.get("content") != source["content"]):
            shutil.rmtree(folder, ignore_errors=True)  # a process that compiled it holds its graph in memory
            log.info("removed the converted graph of %s's earlier content: %s", source["pack"], folder)
