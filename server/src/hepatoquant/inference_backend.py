"""Which backend executes the classifier: PyTorch, or OpenVINO on CPUs; one machine's choice, always recorded.

OpenVINO compiles the whole classifier (normalisation, encoder, head) for the CPU it runs on, where PyTorch runs
eager kernels one by one. Measured side by side on this project's 2-core CPU (AVX512-BF16, no AMX) with PyTorch,
ONNX Runtime and INT8 (``benchmarks/cpu_runtimes.py``, README "Backend and precision"): a ViT-S/16 ran at 34.9
tiles/s in OpenVINO f32 against 15.4 in PyTorch fp32 (identical top-1), and 66.7 in OpenVINO bf16 against 39.1
under PyTorch's bf16 autocast (top-1 agreement with fp32 0.997 and 0.994 on 351 real tiles); the INT8 options
were faster than fp32 but agreed on only 96-97 %. So ``auto`` is OpenVINO on a CPU and PyTorch on a GPU;
``torch`` forces PyTorch (the reference: training and the segmenter run there); ``openvino`` refuses a GPU.

Converting a model (``openvino.convert_model`` traces the PyTorch module) takes seconds (3.7 s for a ViT-S/16,
more for the foundation models), so the converted graph is kept in the cache folder (``$HEPATOQUANT_CACHE_DIR``),
keyed by what it computes: the weights' and head's SHA-256 (themselves cached while the files are unchanged),
the encoder's registered configuration, the pack's classes and normalisation and the library versions. A later
run reads it (0.02 s) and compiles it (0.3 s) without loading the PyTorch model at all. A cache entry that cannot
be read is converted again, with a warning; one that cannot be written costs the conversion next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from hepatoquant.errors import InvalidParameterError

__all__ = ["BACKENDS", "CompiledClassifier", "import_openvino", "load_openvino_classifier", "resolve_backend"]

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "openvino")
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Bump when what PatchClassifier computes changes without its weights or the encoder's configuration changing.
_GRAPH_VERSION = 1


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


class CompiledClassifier:
    """A pack's classifier compiled by OpenVINO for this CPU at one precision.

    Called like :class:`hepatoquant.classify.PatchClassifier` (uint8 NHWC tiles -> logits, embeddings as
    tensors). One inference request is shared under a lock: a server's jobs and ClassifyTiles calls take turns,
    as they would for the CPU's cores anyway.
    """

    def __init__(self, compiled, *, classes: tuple[str, ...], precision: str) -> None:
        self.classes = classes
        self.precision = precision
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, tiles_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            outputs = self._request.infer({0: tiles_uint8_nhwc.numpy()})
            logits, embeddings = outputs[0].copy(), outputs[1].copy()  # the request reuses its buffers
        return torch.from_numpy(logits), torch.from_numpy(embeddings)


def load_openvino_classifier(pack, precision: str, load_torch: Callable[[], torch.nn.Module]) -> CompiledClassifier:
    """``pack``'s classifier compiled for this CPU at ``precision`` (``fp32`` or ``bf16``): from the converted
    graph in the cache when there is one, else converted from ``load_torch()`` and cached."""
    openvino = import_openvino()

    if precision not in _PRECISION_HINTS:
        raise InvalidParameterError(f"--backend openvino runs fp32 or bf16, not {precision}; use --backend torch")
    if pack.kind != "classifier" or pack.head_weights is None:
        load_torch()  # refuses the pack, saying why (an encoder or segmenter pack)
    core = openvino.Core()
    graph_file = _cache_folder(pack) / "classifier.xml"
    graph = None
    if graph_file.is_file():
        try:
            graph = core.read_model(str(graph_file))
        except RuntimeError as error:
            log.warning("the cached OpenVINO graph %s cannot be read (%s): converting the model again", graph_file, error)
    if graph is None:
        graph = _convert(load_torch(), pack.input_size_px)
        _store(graph, graph_file)
    compiled = core.compile_model(graph, "CPU", {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request uses every core (THROUGHPUT splits them into streams)
    })
    return CompiledClassifier(compiled, classes=pack.classes, precision=precision)


def _convert(model: torch.nn.Module, size: int):
    openvino = import_openvino()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and constant-folding notes: not the user's business
        return openvino.convert_model(model, example_input=torch.zeros(1, size, size, 3, dtype=torch.uint8),
                                      input=[(openvino.PartialShape([-1, size, size, 3]), openvino.Type.u8)])


def _cache_folder(pack) -> Path:
    from hepatoquant.encoders import encoder_config
    from hepatoquant.weights_digest import default_cache_dir, weights_sha256

    identity = {
        "graph": _GRAPH_VERSION,
        "versions": {name: metadata.version(name) for name in ("openvino", "torch", "timm")},
        "encoder": repr(encoder_config(pack.encoder_name)),
        "encoder_weights": weights_sha256(pack.encoder_weights),
        "head": weights_sha256(pack.head_weights),
        "classes": list(pack.classes), "mean": list(pack.mean), "std": list(pack.std),
        "input_size_px": pack.input_size_px,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return default_cache_dir() / "openvino" / f"{pack.encoder_name}-{key}"


def _store(graph, graph_file: Path) -> None:
    openvino = import_openvino()

    from hepatoquant.atomic_write import staged_folder

    try:
        with staged_folder(graph_file.parent, replace=True) as staging:
            openvino.save_model(graph, str(staging / graph_file.name), compress_to_fp16=False)  # the weights as they are
    except OSError as error:
        log.warning("the converted OpenVINO graph cannot be kept in %s (%s): the next run converts the model again; "
                    "set $HEPATOQUANT_CACHE_DIR to a writable folder", graph_file.parent, error)
