"""The server's engine: requests in, jobs, results and tile predictions out; gRPC and HTTP only translate.

It validates a request before queueing it (slide under a root, models exist, regions parse), so bad input is
answered at once with a precise error rather than as a failed job; computes the reuse key (request, slide
file identity, model manifests) so identical work is done once; and runs jobs through the analysis engine
with a progress callback that also carries cancellation.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
from hepatoquant_client.classes import REGION_CLASSES, TISSUE_CLASSES
from hepatoquant_client.proto import pb
from hepatoquant_client.qupath_geojson import parse_qupath_geojson

from hepatoquant import RESEARCH_USE_NOTICE, __version__
from hepatoquant.analysis import ModelCache, analyze_slide
from hepatoquant.analysis_request import Runtime, resolve_options
from hepatoquant.atomic_write import staged_folder
from hepatoquant.classify import PatchClassifier, choose_device, predict_batches
from hepatoquant.encoders import encoder_config
from hepatoquant.errors import (
    HepatoQuantError,
    InvalidParameterError,
    JobNotReadyError,
    MissingMPPError,
    ModelPackError,
    StorageFullError,
    StorageUnavailableError,
)
from hepatoquant.inference_backend import CompiledClassifier, resolve_backend
from hepatoquant.precision import resolve_precision
from hepatoquant.model_pack import MANIFEST_NAME, ModelPack, default_models_dir, list_model_packs
from hepatoquant.pack_lookup import pack_by_name, resolve_model_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.outputs.report import REPORT_SCHEMA_VERSION
from hepatoquant.service.convert import (
    class_to_proto,
    job_to_proto,
    pack_to_proto,
    request_from_json,
    request_to_json,
    result_to_proto,
)
from hepatoquant.service.executor import JobExecutor, QueueFullError
from hepatoquant.service.jobs import RESULTS_DIR, JobRecord, JobState, JobStore, write_job_file
from hepatoquant.service.security import resolve_slide_reference
from hepatoquant.service.status import status_name_for
from hepatoquant.slide import Slide, validate_mpp
from hepatoquant.tile_reader import TileBatch as ReaderBatch

__all__ = ["ServerConfig", "ServerEngine", "JobNotReadyError"]

MAX_TILES_PER_BATCH = 512
log = logging.getLogger("hepatoquant.server")


# Settings of ServerConfig that must be 1 or more, with the `hepatoquant serve` option that sets each.
_AT_LEAST_ONE = {
    "workers": "--workers", "max_queued_jobs": "--max-queued", "max_concurrent_rpcs": "--max-concurrent-rpcs",
    "max_streams_per_client": "--max-streams-per-client", "max_message_bytes": "--max-message-mb",
    "rpc_threads": "--rpc-threads", "http_max_connections": "--http-max-connections",
}


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``hepatoquant serve`` is started with."""

    slide_roots: tuple[Path, ...]
    state_dir: Path
    models_dir: Path | None = None
    default_model: str = "demo"
    default_segmenter: str = "none"
    device: str = "auto"
    precision: str = "auto"  # see hepatoquant.precision
    backend: str = "auto"  # the models': torch, or openvino on CPUs (hepatoquant.inference_backend)
    readers: str = "auto"  # tile readers: threads or processes (hepatoquant.tile_reader.resolve_readers)
    workers: int = 1
    max_queued_jobs: int = 16
    max_message_bytes: int = 64 * 2**20
    max_results: int | None = None
    token: str | None = None
    batch_size: int = 32
    reader_workers: int = 2
    # Largest tile ClassifyTiles decodes, in pixels a side, read from the image header before decoding (a
    # 441 kB PNG of 12,000 x 12,000 px once cost 930 MiB); well above a tile at 40x (300-450 px).
    max_tile_px: int = 2048
    rebuild_job_store: bool = False
    # Health is NOT_SERVING below this much free space on the state disk: jobs could not be recorded.
    min_free_bytes: int = 64 * 2**20
    # Serving limits (see hepatoquant.service.server): calls at once (beyond: RESOURCE_EXHAUSTED), open streams
    # per client connection, threads for the engine's blocking work, HTTP connections (beyond: 503) and how long
    # an idle HTTP connection stays open.
    max_concurrent_rpcs: int = 2048
    max_streams_per_client: int = 100
    rpc_threads: int = 16
    http_max_connections: int = 1024
    http_idle_seconds: float = 5.0
    # How long a new connection has for its handshake (TLS on the HTTPS port; TLS and HTTP/2 on the gRPC port).
    handshake_seconds: float = 5.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or self.token != self.token.strip() or
                                       any(c.isspace() or not c.isprintable() for c in self.token)):
            raise InvalidParameterError(
                "the server token is empty or holds spaces or control characters: authentication would be off or "
                "unusable; put one line of printable characters (e.g. `openssl rand -hex 32`) in the token file"
            )
        if not 16 <= self.max_tile_px <= 65_536:
            raise InvalidParameterError(f"maximum tile size {self.max_tile_px} px is outside 16..65536")
        for name, flag in _AT_LEAST_ONE.items():
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"the server's {name} is {getattr(self, name)} (`serve {flag}`): "
                                            "give 1 or more")
        for name in ("http_idle_seconds", "handshake_seconds"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(f"the server's {name} is {getattr(self, name)} "
                                            f"(`serve --{name.replace('_', '-')}`): give more than 0")
        if self.min_free_bytes < 0:
            raise InvalidParameterError("the free-space floor is below 0 (`serve --min-free-mb`): give 0 or more")


def _results_not_written(job_id: str, error: OSError) -> StorageFullError | StorageUnavailableError:
    """The client's error for results that could not be written; the log keeps the server's paths."""
    log.warning("job=%s event=results-not-written error=%s", job_id, error)
    errors = {getattr(e, "errno", None) for e in (error, error.__cause__, error.__context__) if e is not None}
    if errno.ENOSPC in errors or errno.EDQUOT in errors:
        return StorageFullError(f"the server's disk is full: the results of job {job_id} could not be written; "
                                "ask the server's operator to free space, then submit again")
    return StorageUnavailableError(f"the server could not write the results of job {job_id} "
                                   f"({error.strerror or type(error).__name__}); the server log has the details")


class ServerEngine:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models_dir = config.models_dir or default_models_dir()
        if config.rebuild_job_store:
            self.store, recovered = JobStore.rebuild(config.state_dir)
            log.warning("job database rebuilt: %d finished job(s) recovered from their result folders", recovered)
        else:
            self.store = JobStore(config.state_dir)
        self.results_dir = config.state_dir / RESULTS_DIR
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.executor = JobExecutor(
            self.store, self._run_job, workers=config.workers, max_queued=config.max_queued_jobs,
            on_success=self._apply_retention,
        )
        self.device = choose_device(config.device)
        resolve_backend(config.backend, self.device)  # --backend openvino with a GPU fails at start, not per job
        # The jobs' models, loaded once (a foundation model takes seconds to load), then frozen (hepatoquant.heap).
        self._models = ModelCache(freeze_after_load=True)
        self._submit_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> list[JobRecord]:
        """Mark jobs interrupted by a previous stop, start the workers, re-queue jobs that never started."""
        for leftover in self.results_dir.glob(".*"):  # work folders of jobs killed mid-way: never results
            shutil.rmtree(leftover, ignore_errors=True)
        queued = self.store.recover_after_restart()
        self._apply_retention()  # a restart with a lower --max-results prunes at once
        self.executor.start()
        requeued = []
        for record in queued:
            try:
                self.executor.submit(record)
                requeued.append(record)
            except QueueFullError as error:  # more leftovers than the queue holds: those are recorded as failed
                self.store.set_state(record.job_id, JobState.FAILED, error_code=status_name_for(error),
                                     error_message=f"{error} (the server restarted with more jobs waiting than "
                                                   "its queue holds)")
                log.warning("job %s could not be re-queued: the queue is full", record.job_id)
        return requeued

    def stop(self) -> None:
        self.executor.shutdown(wait=True)

    def serving_problem(self) -> str | None:
        """Why this server cannot take work now, for health checks on both ports (None: it can)."""
        if self.executor.unrecorded_ends():
            return f"{self.executor.unrecorded_ends()} job end(s) not yet recorded: the job store is failing"
        if not self.executor.workers_alive():
            return "a job worker thread has stopped: jobs would wait for ever"
        try:
            self.store.ping()
        except HepatoQuantError as error:
            return str(error)
        free = shutil.disk_usage(self.config.state_dir).free
        if free < self.config.min_free_bytes:
            return f"the state disk has {free / 2**20:.0f} MiB free (needs {self.config.min_free_bytes / 2**20:.0f})"
        return None

    def _apply_retention(self, succeeded: JobRecord | None = None) -> None:
        """Keep only the newest ``max_results`` results (all when None); runs after each job that succeeds."""
        removed = self.store.apply_retention(self.config.max_results)
        if removed:
            log.info("result retention (%d kept): removed the results of job(s) %s", self.config.max_results,
                     ", ".join(removed))

    # -- info --------------------------------------------------------------------------------------------
    def info(self) -> pb.ServerInfo:
        packs = [p for p in list_model_packs(self.models_dir) if isinstance(p, ModelPack)]
        versions = {}
        for dist in ("torch", "timm", "peft", "openslide-python", "openslide-bin", "grpcio", "protobuf"):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = "not installed"
        return pb.ServerInfo(
            version=__version__,
            library_versions=versions,
            models=[pack_to_proto(p) for p in packs],
            tissue_classes=[class_to_proto(c) for c in TISSUE_CLASSES],
            region_classes=[class_to_proto(c) for c in REGION_CLASSES],
            slide_roots=[str(r) for r in self.config.slide_roots],
            max_queued_jobs=self.config.max_queued_jobs,
            max_message_bytes=self.config.max_message_bytes,
            device=str(self.device),
            notice=RESEARCH_USE_NOTICE,
        )

    # -- jobs --------------------------------------------------------------------------------------------
    def _packs(self, request: pb.AnalysisRequest) -> tuple[ModelPack, ModelPack | None]:
        classifier = self._pack(request.model, self.config.default_model)
        if classifier.kind != "classifier":
            raise ModelPackError(f"model {request.model!r} is a {classifier.kind} pack; `model` needs a classifier pack")
        segmenter_name = request.segmenter_model or self.config.default_segmenter
        segmenter = None if segmenter_name == "none" else self._pack(request.segmenter_model, segmenter_name)
        if segmenter is not None and segmenter.kind != "segmenter":
            raise ModelPackError(f"segmenter_model {segmenter_name!r} is a {segmenter.kind} pack, not a segmenter")
        return classifier, segmenter

    def _pack(self, requested: str, default: str) -> ModelPack:
        """A client names packs by name only (:func:`pack_by_name`); the operator's defaults may be folders."""
        return pack_by_name(requested, self.models_dir) if requested else resolve_model_pack(default, self.models_dir)

    def _validate(self, request: pb.AnalysisRequest) -> tuple[Path, ModelPack, ModelPack | None]:
        slide = resolve_slide_reference(request.slide, self.config.slide_roots)
        mpp = request.mpp_um_px if request.HasField("mpp_um_px") else None
        if mpp is not None:
            validate_mpp(mpp, what="mpp_um_px")
        with Slide(slide, mpp_override_um_px=mpp) as opened:
            try:
                opened.mpp_um_px  # unsupported, corrupt or MPP-less slides are refused now, not as a failed job
            except MissingMPPError as exc:
                raise exc.with_fix("send it as mpp_um_px in the request (hepatoquant-client --mpp; in QuPath, set "
                                   "the pixel size in the Image tab)") from None
        if request.regions_geojson:
            parse_qupath_geojson(request.regions_geojson, source="regions_geojson")
        if request.tile_object_type not in ("", "detection", "tile"):
            raise InvalidParameterError(f"tile_object_type {request.tile_object_type!r} must be 'detection' or 'tile'")
        classifier, segmenter = self._packs(request)
        resolve_options(request, classifier, self._runtime())  # every field's range, before a job exists
        return slide, classifier, segmenter

    def _runtime(self) -> Runtime:
        return Runtime(device=str(self.device), batch_size=self.config.batch_size,
                       num_workers=self.config.reader_workers, precision=self.config.precision,
                       backend=self.config.backend, readers=self.config.readers)

    def _request_key(self, request: pb.AnalysisRequest, slide: Path, packs: list[ModelPack | None]) -> str:
        """Same request, same slide file (path, size, modification time), same model manifests, same report
        schema → same key. The schema version changes when counting changes (2.0: QuPath's centre rule), so a
        result counted another way is never handed out again."""
        stat = slide.stat()
        canonical = pb.AnalysisRequest()
        canonical.CopyFrom(request)
        canonical.slide = str(slide)  # one file named three ways (relative, absolute, file: URI) is one request
        identity = {
            "report_schema_version": REPORT_SCHEMA_VERSION,
            "request": request_to_json(canonical),
            "slide": [str(slide), stat.st_size, stat.st_mtime_ns],
            "models": [
                None if p is None else hashlib.sha256((p.path / MANIFEST_NAME).read_bytes()).hexdigest() for p in packs
            ],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def submit(self, request: pb.AnalysisRequest) -> JobRecord:
        slide, classifier, segmenter = self._validate(request)
        key = self._request_key(request, slide, [classifier, segmenter])
        with self._submit_lock:  # two identical submissions at once still make one job
            existing = self.store.find_reusable(key)
            if existing is not None and existing.state == JobState.SUCCEEDED:
                return self.store.create(request_to_json(request), key, reused_from=existing)
            if existing is not None and self.executor.is_live(existing.job_id):  # not a job whose end is unrecorded
                return existing
            record = self.store.create(request_to_json(request), key)
            try:
                self.executor.submit(record)
            except QueueFullError:
                self.store.delete(record.job_id)  # refused, not a job: nothing to list or re-queue
                raise
            return record

    def _run_job(self, record: JobRecord, progress) -> str:
        request = request_from_json(record.request_json)
        slide, classifier, segmenter = self._validate(request)
        final = self.results_dir / record.job_id
        with tempfile.TemporaryDirectory(prefix=f".{record.job_id}.", dir=self.results_dir) as inputs:
            regions_path = None
            if request.regions_geojson:
                regions_path = Path(inputs) / "regions.geojson"
                regions_path.write_text(request.regions_geojson)
            options = resolve_options(request, classifier, self._runtime(), regions_path=regions_path)
            result = analyze_slide(slide, classifier, options, segmenter=segmenter, progress=progress,
                                   models=self._models)
        progress("outputs", 0, 1)
        try:
            with staged_folder(final) as outputs:
                write_outputs(result, outputs, include_tiles=not request.omit_tiles)
                write_job_file(outputs, record)  # lets --rebuild-job-store give this job back
        except OSError as error:  # OutputWriteError too: its message names server folders, the client's must not
            raise _results_not_written(record.job_id, error) from None
        progress("outputs", 1, 1)
        return str(final)

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        return self.executor.cancel(job_id)

    def list(self, limit: int) -> list[JobRecord]:
        return self.store.list(limit or 100)

    def result(self, job_id: str) -> pb.AnalysisResult:
        record = self.store.get(job_id)
        if record.state != JobState.SUCCEEDED:
            detail = f": {record.error_message}" if record.error_message else ""
            raise JobNotReadyError(f"job {job_id} is {record.state.value}, not succeeded{detail}; watch it and ask again")
        removed = JobNotReadyError(f"the result of job {job_id} was removed by the retention limit; submit it again")
        if record.result_dir is None:  # retention clears the folder from the record when it deletes it
            raise removed
        result_dir = Path(record.result_dir)
        if not result_dir.is_dir():
            raise removed
        try:
            return result_to_proto(job_id, result_dir)
        except FileNotFoundError:  # retention removed it while it was being read
            raise removed from None

    def job_proto(self, record: JobRecord) -> pb.Job:
        return job_to_proto(record)

    # -- tiles -------------------------------------------------------------------------------------------
    def _classifier(self, name: str) -> tuple[ModelPack, PatchClassifier | CompiledClassifier, str]:
        """The pack, its model (the jobs' copy: one per pack, device, backend and precision) and the precision."""
        pack = self._pack(name, self.config.default_model)
        precision = resolve_precision(self.config.precision, self.device,
                                      encoder_config(pack.encoder_name).recommended_dtype)
        backend = resolve_backend(self.config.backend, self.device)
        return pack, self._models.classifier(pack, self.device, backend, precision), precision

    def classify_tiles(self, batch: pb.TileBatch) -> pb.TilePredictions:
        """Predictions for tiles the caller holds; each tile must show about one tile of the pack's size."""
        count = len(batch.images)
        if count == 0:
            raise InvalidParameterError("the tile batch has no images; send 1 to 512 tiles per batch")
        if count > MAX_TILES_PER_BATCH:
            raise InvalidParameterError(
                f"the tile batch has {count} images; send at most {MAX_TILES_PER_BATCH} per batch message"
            )
        pack, model, precision = self._classifier(batch.model)
        size = pack.input_size_px
        pixels = np.empty((count, size, size, 3), dtype=np.uint8)
        for index, data in enumerate(batch.images):
            tile = self._decode(index, data, batch.raw_width_px, batch.raw_height_px)
            if batch.mpp_um_px:
                validate_mpp(batch.mpp_um_px, what="mpp_um_px")
                field_um = max(tile.shape[:2]) * batch.mpp_um_px
                expected_um = pack.tile_size_px * pack.spacing_um_px
                if not 0.75 * expected_um <= field_um <= 1.25 * expected_um:
                    raise InvalidParameterError(
                        f"tile {index} shows {field_um:.0f} um but model {pack.path.name!r} classifies "
                        f"{expected_um:.0f} um tiles ({pack.tile_size_px} px at {pack.spacing_um_px} um/px); "
                        "send tiles of that physical size"
                    )
            pixels[index] = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA if tile.shape[0] > size else cv2.INTER_LINEAR)
        [prediction] = predict_batches(model, [ReaderBatch(0, pixels)], self.device,
                                       keep_embeddings=batch.include_embeddings, precision=precision)
        classes = list(pack.classes)
        return pb.TilePredictions(
            classes=classes,
            model_status=pack.model_status,
            predictions=[
                pb.TilePrediction(
                    code=classes[int(np.argmax(p))],
                    probabilities=p.tolist(),
                    embedding=[] if prediction.embeddings is None else prediction.embeddings[i].tolist(),
                )
                for i, p in enumerate(prediction.probabilities)
            ],
        )

    def _decode(self, index: int, data: bytes, raw_width: int, raw_height: int) -> np.ndarray:
        """One tile as RGB pixels. Its size is checked before anything is decoded (from the header of an
        encoded image), so a small file that would decode into gigabytes costs nothing."""
        limit = self.config.max_tile_px
        if not data:
            raise InvalidParameterError(f"tile {index} is empty (0 bytes); send a PNG or JPEG image, or raw RGB")
        if raw_width or raw_height:
            if not (0 < raw_width <= limit and 0 < raw_height <= limit) or len(data) != raw_width * raw_height * 3:
                raise InvalidParameterError(
                    f"tile {index}: raw RGB needs width x height x 3 = {raw_width} x {raw_height} x 3 bytes, got "
                    f"{len(data)}, with each side 1..{limit} px"
                )
            return np.frombuffer(data, dtype=np.uint8).reshape(raw_height, raw_width, 3)
        width = height = limit + 1  # Pillow refuses headers of over ~180 megapixels outright: too large
        try:
            with PIL.Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height, kind = header.width, header.height, header.format
        except PIL.Image.DecompressionBombError:
            kind = "PNG or JPEG"
        except (PIL.UnidentifiedImageError, OSError, ValueError):  # Pillow's refusals of what is not an image
            kind = None
        if kind not in ("PNG", "JPEG", "PNG or JPEG"):
            raise InvalidParameterError(
                f"tile {index}: the bytes are not a PNG or JPEG image ({len(data)} bytes); send encoded images or "
                "set raw_width_px / raw_height_px for raw RGB"
            )
        if width > limit or height > limit:
            raise InvalidParameterError(
                f"tile {index} is {width} x {height} px; this server takes tiles of at most {limit} px a side "
                "(a tile is a few hundred pixels): send tiles, not regions"
            )
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise InvalidParameterError(
                f"tile {index}: the {kind} image is damaged and cannot be decoded ({len(data)} bytes); send it again"
            )
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


