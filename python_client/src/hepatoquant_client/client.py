"""The Python client of the HepatoQuant gRPC API: typed values in, typed values out, one error type.

``Client(target)`` talks to ``hepatoquant serve``; ``analyze(slide)`` submits a slide, watches its job and fetches
the result as an :class:`AnalysisOutcome` (composition per region, QuPath GeoJSON, report, cohort row, overlay).
Every failed call raises a :class:`HepatoQuantClientError` carrying the gRPC status name (``code``) and the
server's message; no ``grpc.RpcError`` escapes. Coordinates in the GeoJSON are level-0 pixels of the slide
(x right, y down); areas are mm^2; percentages are of a region's classified tiles.

This module imports only the standard library, grpcio, protobuf and this package (never the server, torch or
numpy; shapely only when :meth:`AnalysisOutcome.qupath_objects` parses objects), so it runs on any machine that
can reach a server.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from .atomic_files import replace_atomically
from .classes import HepatoClass
from .errors import HepatoQuantError
from .proto import pb, pb_grpc

if TYPE_CHECKING:  # shapely (and so numpy) is imported only when objects are parsed
    from .qupath_geojson import QuPathObject

__all__ = [
    "AnalysisOutcome",
    "ClassShare",
    "Client",
    "HepatoQuantClientError",
    "InvalidArgumentError",
    "JobProgress",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RegionShare",
    "ServerInfo",
    "ServerUnavailableError",
    "TilePrediction",
    "UnauthenticatedError",
]

#: ``AnalysisRequest`` fields that ``Client.submit`` / ``Client.analyze`` take as keyword options: all of them
#: but the slide, read from the proto so that a field added there is an option here at once.
ANALYSIS_OPTIONS: tuple[str, ...] = tuple(f.name for f in pb.AnalysisRequest.DESCRIPTOR.fields if f.name != "slide")
#: The most tiles one ``TileBatch`` message may hold (the server refuses more).
MAX_TILES_PER_BATCH = 512

_STATE_NAMES = {
    pb.JOB_STATE_UNSPECIFIED: "unspecified",
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
    pb.JOB_STATE_INTERRUPTED: "interrupted",
}
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
# Codes of a job that did not succeed but carries no error code (older servers): the closest status name.
_FALLBACK_JOB_CODES = {"failed": "UNKNOWN", "cancelled": "CANCELLED", "interrupted": "UNAVAILABLE"}


# --- errors -----------------------------------------------------------------------------------------------


class HepatoQuantClientError(HepatoQuantError):
    """A call to the server failed, or the job it ran did not succeed.

    ``code`` is the gRPC status name (``"NOT_FOUND"``, ``"PERMISSION_DENIED"``, ...); ``message`` is the server's
    message (what is wrong and what to do). Subclasses for the common codes are also the matching builtin, so
    ``except FileNotFoundError`` style handling is not needed: catch this class, or the subclass, or the builtin.
    """

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable despite the two-argument constructor
        return (type(self), (self.code, self.message))

    @classmethod
    def for_code(cls, code: str, message: str) -> HepatoQuantClientError:
        """The most specific error class for a status name."""
        return _ERROR_BY_CODE.get(code, HepatoQuantClientError)(code, message)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> HepatoQuantClientError:
        code_fn = getattr(error, "code", None)
        details_fn = getattr(error, "details", None)
        status = code_fn() if callable(code_fn) else None
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        message = (details_fn() if callable(details_fn) else None) or str(error) or code
        return cls.for_code(code, message)


class InvalidArgumentError(HepatoQuantClientError, ValueError):
    """INVALID_ARGUMENT: a bad option, an unreadable slide or regions file."""


class NotFoundError(HepatoQuantClientError, LookupError):
    """NOT_FOUND: the slide, model pack or job named does not exist."""


class PermissionDeniedError(HepatoQuantClientError, PermissionError):
    """PERMISSION_DENIED: the slide lies outside the server's slide roots."""


class UnauthenticatedError(HepatoQuantClientError, PermissionError):
    """UNAUTHENTICATED: no token, or the wrong one."""


class ServerUnavailableError(HepatoQuantClientError, ConnectionError):
    """UNAVAILABLE: the server cannot be reached (or stopped while a job ran)."""


_ERROR_BY_CODE: dict[str, type[HepatoQuantClientError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "UNAVAILABLE": ServerUnavailableError,
}


# --- typed results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassShare:
    """One tissue class within a region: tile count, tile area (mm^2) and percent of the region's tiles.

    ``percent`` is ``None`` when the region has no tiles: no data, which is not 0 %."""

    code: str
    tiles: int
    area_mm2: float
    percent: float | None

    @classmethod
    def from_proto(cls, message: pb.ClassComposition) -> ClassShare:
        percent = message.percent if message.HasField("percent") else None
        return cls(message.code, int(message.tiles), message.area_mm2, percent)


@dataclass(frozen=True)
class RegionShare:
    """The composition of one region (or of all regions of one region class).

    ``region_class`` is tumour, non_tumour, tissue or unassigned; ``source`` is user, segmenter, tissue or
    aggregate; ``region_area_mm2`` is the polygon area (0 for unassigned); ``tile_area_mm2`` the area of the
    classified tiles in it.
    """

    name: str
    region_class: str
    source: str
    region_area_mm2: float
    tile_count: int
    tile_area_mm2: float
    classes: tuple[ClassShare, ...]

    @classmethod
    def from_proto(cls, message: pb.RegionComposition) -> RegionShare:
        return cls(
            name=message.name,
            region_class=message.region_class,
            source=message.source,
            region_area_mm2=message.region_area_mm2,
            tile_count=int(message.tile_count),
            tile_area_mm2=message.tile_area_mm2,
            classes=tuple(ClassShare.from_proto(c) for c in message.classes),
        )

    def _region_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region_class": self.region_class,
            "source": self.source,
            "region_area_mm2": self.region_area_mm2,
            "tile_count": self.tile_count,
            "tile_area_mm2": self.tile_area_mm2,
        }

    def records(self) -> list[dict[str, Any]]:
        """Long form, one flat dict per tissue class (``pandas.DataFrame(region.records())``)."""
        base = self._region_fields()
        return [
            {**base, "code": c.code, "tiles": c.tiles, "area_mm2": c.area_mm2, "percent": c.percent}
            for c in self.classes
        ]

    def as_dict(self) -> dict[str, Any]:
        """Wide form, one flat dict: the region's fields, then ``<CODE>_tiles``, ``<CODE>_area_mm2`` and
        ``<CODE>_percent`` for each class (one row of a cohort-style table)."""
        row = self._region_fields()
        for c in self.classes:
            row[f"{c.code}_tiles"] = c.tiles
            row[f"{c.code}_area_mm2"] = c.area_mm2
            row[f"{c.code}_percent"] = c.percent
        return row

    def percent(self, code: str) -> float | None:
        """Percent of this region's tiles in class ``code`` (``None``: the region has no tiles); KeyError names
        the codes present."""
        for c in self.classes:
            if c.code == code:
                return c.percent
        raise KeyError(f"no class {code!r} in region {self.name!r}; it has {', '.join(c.code for c in self.classes)}")


# Output files of an analysis, in the order written: suffix after the slide stem, and the outcome's attribute.
_OUTPUT_FILES: tuple[tuple[str, str], ...] = (
    (".geojson", "qupath_geojson"),
    (".report.json", "report_json"),
    (".csv", "cohort_csv"),
    (".overlay.png", "overlay_png"),
)


@dataclass(frozen=True)
class AnalysisOutcome:
    """The result of a succeeded analysis job.

    ``regions`` has one entry per region (and unassigned tiles), ``region_classes`` one per region class;
    ``headline_indicators`` maps ``"<region_class>/<code>"`` to a percent. ``model_status`` ``untrained-demo``
    means the class labels are meaningless. ``qupath_geojson`` is a FeatureCollection in level-0 pixel
    coordinates for QuPath's "Import objects"; ``report`` is the full versioned report.
    """

    job_id: str
    model_status: str
    regions: tuple[RegionShare, ...]
    region_classes: tuple[RegionShare, ...]
    headline_indicators: dict[str, float]
    report: dict[str, Any] = field(repr=False)
    qupath_geojson: bytes = field(repr=False)
    cohort_csv: bytes = field(repr=False)
    overlay_png: bytes = field(repr=False)
    slide_stem: str
    warnings: tuple[str, ...]
    report_json: str = field(default="", repr=False, compare=False)  # the report as the server wrote it

    @classmethod
    def from_proto(cls, message: pb.AnalysisResult) -> AnalysisOutcome:
        report_text = message.report_json
        try:
            report = json.loads(report_text) if report_text else {}
        except json.JSONDecodeError as exc:
            raise HepatoQuantClientError.for_code(
                "DATA_LOSS", f"the report of job {message.job_id} is not JSON ({exc}); ask the server's operator"
            ) from None
        return cls(
            job_id=message.job_id,
            model_status=message.model_status,
            regions=tuple(RegionShare.from_proto(r) for r in message.regions),
            region_classes=tuple(RegionShare.from_proto(r) for r in message.region_classes),
            headline_indicators=dict(message.headline_indicators_percent),
            report=report,
            qupath_geojson=bytes(message.qupath_geojson),
            cohort_csv=bytes(message.cohort_csv),
            overlay_png=bytes(message.overlay_png),
            slide_stem=message.slide_stem,
            warnings=tuple(message.warnings),
            report_json=report_text or json.dumps(report, indent=2),
        )

    @property
    def stem(self) -> str:
        """A safe file-name stem: the server's slide stem without any folder part (the job id if empty)."""
        stem = Path(self.slide_stem.replace("\\", "/")).name
        return stem if stem not in ("", ".", "..") else self.job_id

    def output_names(self) -> list[str]:
        """The file names :meth:`write` writes: ``<stem>.geojson``, ``.report.json``, ``.csv``, ``.overlay.png``."""
        return [f"{self.stem}{suffix}" for suffix, _ in _OUTPUT_FILES]

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write the four outputs into ``out_dir`` (created if needed), each atomically (temporary file in the
        same folder, then ``os.replace``): a reader never sees half a file. Returns the paths written."""
        folder = Path(out_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HepatoQuantClientError.for_code(
                "FAILED_PRECONDITION", f"cannot create the output folder {folder}: {exc.strerror or exc}; "
                "choose a folder you can write to"
            ) from None
        written = []
        for suffix, attribute in _OUTPUT_FILES:
            value = getattr(self, attribute)
            data = value.encode() if isinstance(value, str) else value
            target = folder / f"{self.stem}{suffix}"
            _write_atomically(target, data)
            written.append(target)
        return written

    def qupath_objects(self) -> list[QuPathObject]:
        """The result's QuPath objects (regions as annotations, tiles as detections or tiles) as Python values."""
        from .qupath_geojson import parse_qupath_geojson

        return parse_qupath_geojson(self.qupath_geojson, source=f"job {self.job_id} GeoJSON")

    def records(self, *, by: str = "region_classes") -> list[dict[str, Any]]:
        """Long-form composition, one dict per (region, class): ``by="region_classes"`` or ``by="regions"``."""
        if by not in ("region_classes", "regions"):
            raise ValueError(f"by={by!r}: expected 'region_classes' or 'regions'")
        return [row for entry in getattr(self, by) for row in entry.records()]


def _write_atomically(target: Path, data: bytes) -> None:
    try:
        replace_atomically(target, lambda temporary: temporary.write_bytes(data))
    except OSError as exc:
        raise HepatoQuantClientError.for_code(
            "FAILED_PRECONDITION", f"cannot write {target}: {exc.strerror or exc}; check the folder and free space"
        ) from None


@dataclass(frozen=True)
class JobProgress:
    """A job's state and progress as last seen.

    ``state`` is queued, running, succeeded, failed, cancelled or interrupted; ``stage`` is tissue, windows,
    tiles or outputs; ``done`` / ``total`` count the stage's items. ``error_code`` (a gRPC status name) and
    ``error_message`` say why a job did not succeed; ``reused_result`` is true when an identical earlier
    request's result answers this job.
    """

    job_id: str
    state: str
    stage: str
    done: int
    total: int
    items_per_second: float
    eta_seconds: float
    error_code: str = ""
    error_message: str = ""
    reused_result: bool = False

    @classmethod
    def from_proto(cls, job: pb.Job) -> JobProgress:
        return cls(
            job_id=job.job_id,
            state=_STATE_NAMES.get(job.state, "unspecified"),
            stage=job.progress.stage,
            done=int(job.progress.done),
            total=int(job.progress.total),
            items_per_second=job.progress.items_per_second,
            eta_seconds=job.progress.eta_seconds,
            error_code=job.error_code,
            error_message=job.error_message,
            reused_result=job.reused_result,
        )

    @property
    def finished(self) -> bool:
        """True once the job is in a final state (succeeded, failed, cancelled, interrupted)."""
        return self.state in FINAL_STATES

    def raise_for_state(self) -> None:
        """Raise :class:`HepatoQuantClientError` with the job's code and message unless it succeeded."""
        if self.state == "succeeded":
            return
        if not self.finished:
            raise HepatoQuantClientError.for_code(
                "FAILED_PRECONDITION", f"job {self.job_id} is {self.state}, not finished; watch it and ask again"
            )
        code = self.error_code or _FALLBACK_JOB_CODES.get(self.state, "UNKNOWN")
        message = self.error_message or f"job {self.job_id} ended {self.state}"
        raise HepatoQuantClientError.for_code(code, message)


@dataclass(frozen=True)
class TilePrediction:
    """One tile's most probable class, the probability of each class (summing to 1), and its embedding
    (empty unless asked for)."""

    code: str
    probabilities: dict[str, float]
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model pack the server holds (``name`` is what ``model`` / ``segmenter_model`` take)."""

    name: str
    kind: str
    encoder: str
    model_status: str
    classes: tuple[str, ...]
    spacing_um_px: float
    input_size_px: int
    licence_note: str


@dataclass(frozen=True)
class ServerInfo:
    """Versions, model packs, classes, limits and slide roots of a server."""

    version: str
    library_versions: dict[str, str]
    models: tuple[ModelInfo, ...]
    tissue_classes: tuple[HepatoClass, ...]
    region_classes: tuple[HepatoClass, ...]
    slide_roots: tuple[str, ...]
    max_queued_jobs: int
    max_message_bytes: int
    device: str
    notice: str

    @classmethod
    def from_proto(cls, message: pb.ServerInfo) -> ServerInfo:
        def hepato_class(c: pb.TissueClassInfo) -> HepatoClass:
            rgb = tuple(c.color_rgb) if len(c.color_rgb) == 3 else (0, 0, 0)
            return HepatoClass(c.code, c.qupath_name, c.display_name, rgb)  # type: ignore[arg-type]

        return cls(
            version=message.version,
            library_versions=dict(message.library_versions),
            models=tuple(
                ModelInfo(m.name, m.kind, m.encoder, m.model_status, tuple(m.classes), m.spacing_um_px,
                          m.input_size_px, m.licence_note)
                for m in message.models
            ),
            tissue_classes=tuple(hepato_class(c) for c in message.tissue_classes),
            region_classes=tuple(hepato_class(c) for c in message.region_classes),
            slide_roots=tuple(message.slide_roots),
            max_queued_jobs=message.max_queued_jobs,
            max_message_bytes=message.max_message_bytes,
            device=message.device,
            notice=message.notice,
        )


# --- the client -------------------------------------------------------------------------------------------


def replica_addresses(target: str) -> list[tuple[str, str]]:
    """The servers a target names, as (channel target, host name): one for ``host:port``; each of a comma list
    (``h1:50051,h2:50051``, also after ``ipv4:`` / ``ipv6:``); each address ``dns:///name:port`` resolves to."""
    text = target.strip()
    if "," in text:
        for scheme in ("ipv4:", "ipv6:"):
            text = text.removeprefix(scheme)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [(p, p.rsplit(":", 1)[0].strip("[]")) for p in parts]
    if text.startswith("dns:///"):
        host, _, port = text.removeprefix("dns:///").rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            return [(target, host)]  # let gRPC report the unresolvable name on the first call
        addresses = sorted({info[4][0] for info in infos})
        if len(addresses) > 1:
            return [(f"[{a}]:{port}" if ":" in a else f"{a}:{port}", host) for a in addresses]
    return [(target, text.rsplit(":", 1)[0].removeprefix("dns:///"))]


class Client:
    """A connection to a HepatoQuant server (``target`` is ``host:port``), or to several replicas of one.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call; ``tls_root_certificates`` (PEM bytes)
    switches to TLS and trusts those roots. ``timeout_s`` bounds each unary call; streams (watching a job,
    classifying tiles) run as long as the work does. Use it as a context manager, or call :meth:`close`.
    ``watch_reconnects`` is how many times :meth:`watch` reconnects after the stream breaks (UNAVAILABLE),
    waiting ``reconnect_backoff_s`` (doubling) before each attempt.

    Replicas: ``"host1:50051,host2:50051"`` (or ``ipv4:``/``ipv6:`` lists, or ``dns:///name:50051``, whose
    addresses are resolved once here) spreads submissions round-robin over the replicas, one channel each. A job
    lives on the replica that accepted it, so every later call about it (watch, result, cancel) goes there: to the
    replica this client submitted it to, or, for a job id from elsewhere, the replica that knows it.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_root_certificates: bytes | None = None,
        timeout_s: float = 30.0,
        watch_reconnects: int = 5,
        reconnect_backoff_s: float = 0.5,
    ) -> None:
        if not target or not isinstance(target, str):
            raise ValueError(f"target {target!r} must be 'host:port' of a HepatoQuant server")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.watch_reconnects = int(watch_reconnects)
        self.reconnect_backoff_s = float(reconnect_backoff_s)
        # The server enforces its own message limit (ServerInfo.max_message_bytes); results with overlays can
        # exceed grpc's 4 MiB default, so the client does not add a lower one.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channels = []
        for address, host in replica_addresses(target):
            if tls_root_certificates is not None:
                credentials = grpc.ssl_channel_credentials(root_certificates=tls_root_certificates)
                name = [("grpc.ssl_target_name_override", host)] if host and address != target else []
                self._channels.append(grpc.secure_channel(address, credentials, options=options + name))
            else:
                self._channels.append(grpc.insecure_channel(address, options=options))
        self._stubs = [pb_grpc.HepatoQuantStub(channel) for channel in self._channels]
        self._stub = self._stubs[0]
        self._next = itertools.count()
        self._replica_of_job: dict[str, int] = {}
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channels (calls in flight are cancelled)."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # -- plumbing ----------------------------------------------------------------------------------------
    def _unary(self, method: str, request: Any, replica: int = 0) -> Any:
        try:
            return getattr(self._stubs[replica], method)(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise HepatoQuantClientError.from_rpc_error(exc) from None

    def _replica_for(self, job_id: str) -> int:
        """The replica holding ``job_id``: the one it was submitted to, else the first that knows it."""
        if job_id in self._replica_of_job or len(self._stubs) == 1:
            return self._replica_of_job.get(job_id, 0)
        not_found = None
        for replica in range(len(self._stubs)):
            try:
                self._unary("GetJob", pb.GetJobRequest(job_id=job_id), replica)
            except NotFoundError as exc:
                not_found = exc
                continue
            self._replica_of_job[job_id] = replica
            return replica
        raise NotFoundError("NOT_FOUND", f"none of the {len(self._stubs)} replicas of {self.target!r} knows job "
                                         f"{job_id!r} ({not_found.message if not_found else 'no answer'})")

    # -- RPCs --------------------------------------------------------------------------------------------
    def info(self) -> ServerInfo:
        """Versions, model packs (with their status), classes, limits and slide roots of the server."""
        return ServerInfo.from_proto(self._unary("GetServerInfo", pb.GetServerInfoRequest()))

    def analysis_request(self, slide: str | os.PathLike[str], **options: Any) -> pb.AnalysisRequest:
        """The ``AnalysisRequest`` that :meth:`submit` sends (TypeError names an unknown option)."""
        unknown = sorted(set(options) - set(ANALYSIS_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown analysis option(s) {', '.join(map(repr, unknown))}; expected {', '.join(ANALYSIS_OPTIONS)}"
            )
        if not isinstance(slide, (str, os.PathLike)):
            raise TypeError(f"slide must be a path or a str, not {type(slide).__name__}")
        fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        if "regions_geojson" in fields:
            fields["regions_geojson"] = _regions_text(fields["regions_geojson"])
        if "tumour_class_names" in fields:
            names = fields["tumour_class_names"]
            fields["tumour_class_names"] = [names] if isinstance(names, str) else list(names)
        return pb.AnalysisRequest(slide=os.fspath(slide), **fields)

    def submit(self, slide: str | os.PathLike[str], **options: Any) -> str:
        """Queue an analysis of ``slide`` (a path on the server: absolute, or relative to its first slide root)
        and return the job id. Options are the ``AnalysisRequest`` fields (:data:`ANALYSIS_OPTIONS`; None = not
        given), ``regions_geojson`` as GeoJSON text or a path to a ``.geojson`` file (read here and sent as text).
        An identical earlier request is reused."""
        return self._submit(slide, **options).job_id

    def _submit(self, slide: str | os.PathLike[str], **options: Any) -> pb.Job:
        replica = next(self._next) % len(self._stubs)
        job = self._unary("SubmitAnalysis", self.analysis_request(slide, **options), replica)
        self._replica_of_job[job.job_id] = replica
        return job

    def job(self, job_id: str) -> JobProgress:
        """The job as it is now."""
        return JobProgress.from_proto(self._unary("GetJob", pb.GetJobRequest(job_id=job_id), self._replica_for(job_id)))

    def watch(self, job_id: str, on_progress: Callable[[JobProgress], object] | None = None) -> JobProgress:
        """Follow a job until it ends and return its final state (which may be failed or cancelled: see
        :meth:`JobProgress.raise_for_state`). ``on_progress`` is called with every event.

        If the stream breaks (UNAVAILABLE, or it ends before the job does) the client reconnects and watches
        the same job again, up to ``watch_reconnects`` times; it never resubmits."""
        last: JobProgress | None = None
        attempt = 0
        while True:
            try:
                stream = self._stubs[self._replica_for(job_id)].WatchJob(pb.WatchJobRequest(job_id=job_id),
                                                                         metadata=self._metadata)
                try:
                    for event in stream:
                        last = JobProgress.from_proto(event.job)
                        if on_progress is not None:
                            on_progress(last)
                finally:
                    cancel = getattr(stream, "cancel", None)
                    if callable(cancel):  # ends the call when on_progress raised; a no-op on a finished one
                        cancel()
                if last is not None and last.finished:
                    return last
                broken = HepatoQuantClientError.for_code(
                    "UNAVAILABLE", f"the server closed the watch of job {job_id} before the job ended"
                )
            except grpc.RpcError as exc:
                broken = HepatoQuantClientError.from_rpc_error(exc)
                if broken.code != "UNAVAILABLE":
                    raise broken from None
            if attempt >= self.watch_reconnects:
                raise HepatoQuantClientError.for_code(
                    broken.code,
                    f"{broken.message} (gave up watching job {job_id} after {attempt + 1} attempt(s); the job may "
                    f"still run: watch it again later)",
                ) from None
            time.sleep(self.reconnect_backoff_s * 2**attempt)
            attempt += 1

    def result(self, job_id: str) -> AnalysisOutcome:
        """The outcome of a succeeded job (FAILED_PRECONDITION while it is not done)."""
        return AnalysisOutcome.from_proto(
            self._unary("GetResult", pb.GetResultRequest(job_id=job_id), self._replica_for(job_id)))

    def analyze(
        self,
        slide: str | os.PathLike[str],
        *,
        on_progress: Callable[[JobProgress], object] | None = None,
        **options: Any,
    ) -> AnalysisOutcome:
        """Submit, watch and fetch: the outcome of analysing ``slide`` (options as :meth:`submit`). A job that
        fails, is cancelled or is interrupted raises :class:`HepatoQuantClientError` with its code and message."""
        job_id = self.submit(slide, **options)
        final = self.watch(job_id, on_progress=on_progress)
        final.raise_for_state()
        return self.result(job_id)

    def cancel(self, job_id: str) -> JobProgress:
        """Cancel a queued or running job (a running one stops between batches; the state returned may still
        say running). A finished job is left as is."""
        return JobProgress.from_proto(
            self._unary("CancelJob", pb.CancelJobRequest(job_id=job_id), self._replica_for(job_id)))

    def jobs(self, limit: int = 100) -> list[JobProgress]:
        """The server's jobs (every replica's, when given several), newest first."""
        jobs = []
        for replica in range(len(self._stubs)):
            jobs += self._unary("ListJobs", pb.ListJobsRequest(limit=limit), replica).jobs
        jobs.sort(key=lambda j: (j.created_at.seconds, j.created_at.nanos), reverse=True)
        return [JobProgress.from_proto(j) for j in jobs[:limit]]

    def classify_tiles(
        self,
        images: Iterable[bytes],
        *,
        mpp_um_px: float,
        model: str = "",
        batch_size: int = 64,
        include_embeddings: bool = False,
    ) -> list[TilePrediction]:
        """Classify tiles the caller holds (encoded PNG or JPEG bytes), streamed in batches of ``batch_size``.

        ``mpp_um_px`` is the pixel size of the given tiles (the server resizes them to the model's spacing and
        refuses tiles whose field of view differs from the model's tile by more than 25 %; 0 skips that check).
        Returns one prediction per image, in order."""
        if not 1 <= batch_size <= MAX_TILES_PER_BATCH:
            raise ValueError(f"batch_size={batch_size} must be between 1 and {MAX_TILES_PER_BATCH}")
        source_error: list[BaseException] = []

        def batches() -> Iterator[pb.TileBatch]:
            iterator = iter(images)
            try:
                while chunk := list(itertools.islice(iterator, batch_size)):
                    yield pb.TileBatch(images=chunk, mpp_um_px=mpp_um_px, model=model,
                                       include_embeddings=include_embeddings)
            except Exception as exc:  # surfaced to the caller below instead of grpc's "Exception iterating requests"
                source_error.append(exc)
                raise

        predictions: list[TilePrediction] = []
        try:
            for reply in self._stub.ClassifyTiles(batches(), metadata=self._metadata):
                classes = list(reply.classes)
                for p in reply.predictions:
                    predictions.append(TilePrediction(
                        code=p.code,
                        probabilities={c: float(v) for c, v in zip(classes, p.probabilities, strict=True)},
                        embedding=tuple(float(v) for v in p.embedding),
                    ))
        except grpc.RpcError as exc:
            if source_error:
                raise source_error[0] from None
            raise HepatoQuantClientError.from_rpc_error(exc) from None
        if source_error:
            raise source_error[0]
        return predictions


def _regions_text(value: Any) -> str:
    """GeoJSON text as given, or the text of a GeoJSON file named by a path (str or PathLike)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"regions_geojson must be GeoJSON text or a path to a .geojson file, not {type(value).__name__}")
    path = Path(value)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HepatoQuantClientError.for_code(
            "NOT_FOUND", f"regions file {path} does not exist; give a QuPath GeoJSON export (.geojson) or GeoJSON text"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HepatoQuantClientError.for_code(
            "INVALID_ARGUMENT", f"cannot read regions file {path}: {reason}; give a UTF-8 QuPath GeoJSON export"
        ) from None

