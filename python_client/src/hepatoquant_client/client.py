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
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc

from .errors import (
    HepatoQuantClientError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from .proto import pb, pb_grpc
from .results import (
    AnalysisOutcome,
    ClassShare,
    JobProgress,
    ModelInfo,
    RegionShare,
    ServerInfo,
    TilePrediction,
)

log = logging.getLogger("hepatoquant_client")

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
    :meth:`watch` keeps reconnecting after the stream breaks (UNAVAILABLE: a restart, a dropped connection) for
    ``reconnect_for_s`` seconds in all (default 3 minutes: a server restart with its models takes 20 s or more),
    waiting ``reconnect_backoff_s`` before the first attempt and doubling up to 10 s, and logs each wait
    (logger ``hepatoquant_client``).

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
        reconnect_for_s: float = 180.0,
        reconnect_backoff_s: float = 0.5,
    ) -> None:
        if not target or not isinstance(target, str):
            raise ValueError(f"target {target!r} must be 'host:port' of a HepatoQuant server")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        self.target = target
        self.timeout_s = float(timeout_s)
        if reconnect_for_s < 0 or reconnect_backoff_s <= 0:
            raise ValueError(f"reconnect_for_s={reconnect_for_s} must be >= 0 and reconnect_backoff_s="
                             f"{reconnect_backoff_s} positive")
        self.reconnect_for_s = float(reconnect_for_s)
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

    @staticmethod
    def analysis_request(slide: str | os.PathLike[str], **options: Any) -> pb.AnalysisRequest:
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
        the same job again for up to ``reconnect_for_s`` seconds in all, saying so in the log while it waits; it
        never resubmits."""
        last: JobProgress | None = None
        attempt = 0
        give_up_at = time.monotonic() + self.reconnect_for_s
        while True:
            try:
                stream = self._stubs[self._replica_for(job_id)].WatchJob(pb.WatchJobRequest(job_id=job_id),
                                                                         metadata=self._metadata)
                try:
                    for event in stream:
                        last = JobProgress.from_proto(event.job)
                        attempt = 0  # the server is back: a later break gets the short waits again
                        give_up_at = time.monotonic() + self.reconnect_for_s
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
            left = give_up_at - time.monotonic()
            if left <= 0:
                raise HepatoQuantClientError.for_code(
                    broken.code,
                    f"{broken.message} (gave up watching job {job_id} after {self.reconnect_for_s:g} s of "
                    "reconnecting; the job may still run: watch it again later)",
                ) from None
            wait = min(self.reconnect_backoff_s * 2**attempt, 10.0, left)
            log.warning("lost the watch of job %s (%s); reconnecting in %.1f s (giving up in %.0f s)",
                        job_id, broken.message, wait, left)
            time.sleep(wait)
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

