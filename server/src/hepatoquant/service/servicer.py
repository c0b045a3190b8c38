"""The gRPC servicer: each method converts, calls the engine, converts back. Errors are mapped in one place."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator

import grpc
from hepatoquant_client.proto import pb, pb_grpc

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service.engine import ServerEngine
from hepatoquant.service.status import status_name_for

__all__ = ["HepatoQuantServicer", "abort_with"]


def abort_with(context, exc: HepatoQuantError):
    """Abort the call with the status our error maps to and the error's own message."""
    context.abort(getattr(grpc.StatusCode, status_name_for(exc)), str(exc))


def _mapped(method: Callable) -> Callable:
    """Turn our errors into status codes, for unary and streaming methods alike."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context) -> Iterator:
            try:
                yield from method(self, request, context)
            except HepatoQuantError as exc:
                abort_with(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except HepatoQuantError as exc:
            abort_with(context, exc)

    return unary


class HepatoQuantServicer(pb_grpc.HepatoQuantServicer):
    def __init__(self, engine: ServerEngine) -> None:
        self.engine = engine

    @_mapped
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        return self.engine.info()

    @_mapped
    def SubmitAnalysis(self, request: pb.AnalysisRequest, context) -> pb.Job:
        return self.engine.job_proto(self.engine.submit(request))

    @_mapped
    def WatchJob(self, request: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        for record in self.engine.watch(request.job_id, is_active=context.is_active):
            yield pb.JobEvent(job=self.engine.job_proto(record))

    @_mapped
    def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return self.engine.job_proto(self.engine.get(request.job_id))

    @_mapped
    def GetResult(self, request: pb.GetResultRequest, context) -> pb.AnalysisResult:
        return self.engine.result(request.job_id)

    @_mapped
    def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return self.engine.job_proto(self.engine.cancel(request.job_id))

    @_mapped
    def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[self.engine.job_proto(r) for r in self.engine.list(request.limit)])

    @_mapped
    def ClassifyTiles(self, request_iterator: Iterator[pb.TileBatch], context) -> Iterator[pb.TilePredictions]:
        for batch in request_iterator:
            yield self.engine.classify_tiles(batch)
