"""The server's engine: requests in, jobs, results and tile predictions out; gRPC and HTTP only translate.

It validates a request before queueing it (slide under a root, models exist, regions parse), so bad input is
answered at once with a precise error rather than as a failed job; computes the reuse key (request, slide
file identity, model manifests) so identical work is done once; and runs jobs through the analysis engine
with a progress callback that also carries cancellation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
from hepatoquant_client.classes import REGION_CLASSES, TISSUE_CLASSES
from hepatoquant_client.proto import pb
from hepatoquant_client.qupath_geojson import parse_qupath_geojson

from hepatoquant import RESEARCH_USE_NOTICE, __version__
from hepatoquant.analysis import analyze_slide
from hepatoquant.analysis_request import Runtime, resolve_options
from hepatoquant.atomic_write import staged_folder
from hepatoquant.classify import PatchClassifier, choose_device, load_classifier, predict_batches
from hepatoquant.encoders import encoder_config
from hepatoquant.errors import InvalidParameterError, JobNotReadyError, MissingMPPError, ModelPackError
from hepatoquant.precision import resolve_precision
from hepatoquant.model_pack import MANIFEST_NAME, ModelPack, default_models_dir, list_model_packs
from hepatoquant.pack_lookup import resolve_model_pack
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
from hepatoquant.service.jobs import FINAL_STATES, JobRecord, JobState, JobStore
from hepatoquant.service.security import resolve_slide_reference
from hepatoquant.slide import Slide, validate_mpp
from hepatoquant.tile_reader import TileBatch as ReaderBatch

__all__ = ["ServerConfig", "ServerEngine", "JobNotReadyError"]

MAX_TILES_PER_BATCH = 512
log = logging.getLogger("hepatoquant.server")


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
    workers: int = 1
    max_queued_jobs: int = 16
    max_message_bytes: int = 64 * 2**20
    max_results: int | None = None
    token: str | None = None
    batch_size: int = 32
    reader_workers: int = 2
    extra: dict = field(default_factory=dict)


class ServerEngine:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models_dir = config.models_dir or default_models_dir()
        self.store = JobStore(config.state_dir)
        self.results_dir = config.state_dir / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.executor = JobExecutor(
            self.store, self._run_job, workers=config.workers, max_queued=config.max_queued_jobs,
            on_success=self._apply_retention,
        )
        self.device = choose_device(config.device)
        self._classifiers: dict[str, PatchClassifier] = {}
        self._classifier_lock = threading.Lock()
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
            except QueueFullError:  # more leftovers than the queue holds: those are recorded as failed
                log.warning("job %s could not be re-queued: the queue is full", record.job_id)
        return requeued

    def stop(self) -> None:
        self.executor.shutdown(wait=True)

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
        classifier = resolve_model_pack(request.model or self.config.default_model, self.models_dir)
        if classifier.kind != "classifier":
            raise ModelPackError(f"model {request.model!r} is a {classifier.kind} pack; `model` needs a classifier pack")
        segmenter_name = request.segmenter_model or self.config.default_segmenter
        segmenter = None if segmenter_name == "none" else resolve_model_pack(segmenter_name, self.models_dir)
        if segmenter is not None and segmenter.kind != "segmenter":
            raise ModelPackError(f"segmenter_model {segmenter_name!r} is a {segmenter.kind} pack, not a segmenter")
        return classifier, segmenter

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
                       num_workers=self.config.reader_workers, precision=self.config.precision)

    def _request_key(self, request: pb.AnalysisRequest, slide: Path, packs: list[ModelPack | None]) -> str:
        """Same request, same slide file (path, size, modification time), same model manifests, same report
        schema → same key. The schema version changes when counting changes (2.0: QuPath's centre rule), so a
        result counted another way is never handed out again."""
        stat = slide.stat()
        identity = {
            "report_schema_version": REPORT_SCHEMA_VERSION,
            "request": request_to_json(request),
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
            if existing is not None:
                return existing
            record = self.store.create(request_to_json(request), key)
            self.executor.submit(record)  # a full queue records the job as failed and raises QueueFullError
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
            result = analyze_slide(slide, classifier, options, segmenter=segmenter, progress=progress)
        progress("outputs", 0, 1)
        with staged_folder(final) as outputs:
            write_outputs(result, outputs, include_tiles=not request.omit_tiles)
        progress("outputs", 1, 1)
        return str(final)

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        return self.executor.cancel(job_id)

    def list(self, limit: int) -> list[JobRecord]:
        return self.store.list(limit or 100)

    def watch(self, job_id: str, is_active=lambda: True, poll_seconds: float = 1.0) -> Iterator[JobRecord]:
        """The job now, then every change, until it reaches a final state (or the caller goes away)."""
        record = self.store.get(job_id)
        yield record
        while record.state not in FINAL_STATES and is_active():
            changed = self.executor.wait_for_change(job_id, record.updated_at, timeout=poll_seconds)
            if changed.updated_at != record.updated_at or changed.state != record.state:
                record = changed
                yield record

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
    def _classifier(self, name: str) -> tuple[ModelPack, PatchClassifier]:
        pack = resolve_model_pack(name or self.config.default_model, self.models_dir)
        with self._classifier_lock:
            model = self._classifiers.get(str(pack.path))
            if model is None:
                model = load_classifier(pack, self.device)
                self._classifiers[str(pack.path)] = model
        return pack, model

    def classify_tiles(self, batch: pb.TileBatch) -> pb.TilePredictions:
        """Predictions for tiles the caller holds; each tile must show about one tile of the pack's size."""
        count = len(batch.images)
        if count == 0:
            raise InvalidParameterError("the tile batch has no images; send 1 to 512 tiles per batch")
        if count > MAX_TILES_PER_BATCH:
            raise InvalidParameterError(
                f"the tile batch has {count} images; send at most {MAX_TILES_PER_BATCH} per batch message"
            )
        pack, model = self._classifier(batch.model)
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
        precision = resolve_precision(self.config.precision, self.device,
                                      encoder_config(pack.encoder_name).recommended_dtype)
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

    @staticmethod
    def _decode(index: int, data: bytes, raw_width: int, raw_height: int) -> np.ndarray:
        if raw_width or raw_height:
            if raw_width <= 0 or raw_height <= 0 or len(data) != raw_width * raw_height * 3:
                raise InvalidParameterError(
                    f"tile {index}: raw RGB needs width x height x 3 = {raw_width} x {raw_height} x 3 bytes, got {len(data)}"
                )
            return np.frombuffer(data, dtype=np.uint8).reshape(raw_height, raw_width, 3)
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise InvalidParameterError(
                f"tile {index}: the bytes are not a PNG or JPEG image ({len(data)} bytes); send encoded images or "
                "set raw_width_px / raw_height_px for raw RGB"
            )
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


