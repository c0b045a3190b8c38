"""The servicer: each method converts, calls the engine, converts back; one implementation for both ports.

It runs on the server's event loop (``grpc.aio``; the HTTP gateway calls the same methods), so a call waiting
for something (a job's next change, a slow client) holds no thread. The engine's blocking work (SQLite, opening
slides, classifying tiles) runs in a bounded thread pool. Our errors become status codes in one place
(:mod:`hepatoquant.service.status`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from hepatoquant_client.proto import pb, pb_grpc

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service.engine import ServerEngine
from hepatoquant.service.jobs import FINAL_STATES, JobRecord, checked_job_id
from hepatoquant.service.status import status_name_for

__all__ = ["HepatoQuantServicer", "JobEvents"]


async def _abort(context, exc: HepatoQuantError):
    await context.abort(getattr(grpc.StatusCode, status_name_for(exc)), str(exc))


def _mapped(method: Callable) -> Callable:
    """Turn our errors into status codes, for unary and streaming methods alike."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context) -> AsyncIterator:
            try:
                async for message in method(self, request, context):
                    yield message
            except HepatoQuantError as exc:
                await _abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except HepatoQuantError as exc:
            await _abort(context, exc)

    return unary


class JobEvents:
    """Every change of every job, handed to the streams that follow it: the job store announces each new record
    (on the thread that wrote it); this moves it onto the event loop and into the queue of each watcher of that
    job. A thousand watchers cost no thread and no database read, and none misses a change."""

    #: How many jobs' latest records are kept on the loop: a watcher of one of them needs no thread and no
    #: database read (when a job ends, all its watchers reopen on other jobs at once; through the thread pool
    #: that burst delayed health checks by up to a quarter of a second).
    REMEMBERED_JOBS = 4096
    #: How many watchers are woken per turn of the event loop. A job's end wakes all its watchers, and each
    #: then closes its stream; woken all at once, a health check arriving meanwhile waited behind every one of
    #: them at each of its own steps (up to 0.25 s with 500 watchers). In slices, other calls take turns.
    WAKES_PER_TURN = 32

    def __init__(self, engine: ServerEngine) -> None:
        self._store = engine.store
        self._job_proto = engine.job_proto
        self._queues: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)
        self._latest: collections.OrderedDict[str, tuple[JobRecord, pb.JobEvent]] = collections.OrderedDict()
        self._listener: Callable | None = None
        self._wakes: collections.deque[tuple[asyncio.Queue, tuple[JobRecord, pb.JobEvent]]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._listener = lambda record: loop.call_soon_threadsafe(self._publish, record)
        self._store.subscribe(self._listener)

    async def stop(self) -> None:
        if self._listener is not None:
            self._store.unsubscribe(self._listener)

    def _publish(self, record: JobRecord) -> None:
        event = pb.JobEvent(job=self._job_proto(record))  # built once, sent to every watcher
        known = self._latest.get(record.job_id)
        if known is None or record.updated_at >= known[0].updated_at:  # writers' announcements may cross
            self._latest[record.job_id] = (record, event)
            self._latest.move_to_end(record.job_id)
            if len(self._latest) > self.REMEMBERED_JOBS:
                self._latest.popitem(last=False)
        queues = self._queues.get(record.job_id)
        if queues:
            waking = bool(self._wakes)
            self._wakes.extend((queue, (record, event)) for queue in queues)  # in order: FIFO per watcher
            if not waking:
                self._loop.call_soon(self._wake_some)

    def _wake_some(self) -> None:
        for _ in range(min(self.WAKES_PER_TURN, len(self._wakes))):
            queue, item = self._wakes.popleft()
            queue.put_nowait(item)
        if self._wakes:
            self._loop.call_soon(self._wake_some)  # runs on the loop's next turn, after what is ready now

    def latest(self, job_id: str) -> tuple[JobRecord, pb.JobEvent] | None:
        """The job's newest announced record and its event, or None when this server has not announced one
        since it started (or has forgotten it): then read the store. Jobs are only announced once taken by
        the executor, so a refused submission (deleted from the store) is never remembered here."""
        return self._latest.get(job_id)

    @contextlib.contextmanager
    def following(self, job_id: str) -> Iterator[asyncio.Queue]:
        """A queue that receives the job's records from now on (enter it before reading the current record)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[job_id].add(queue)
        try:
            yield queue
        finally:
            self._queues[job_id].discard(queue)
            if not self._queues[job_id]:
                del self._queues[job_id]


class HepatoQuantServicer(pb_grpc.HepatoQuantServicer):
    def __init__(self, engine: ServerEngine, pool: ThreadPoolExecutor, events: JobEvents) -> None:
        self.engine = engine
        self._pool = pool
        self._events = events

    async def _blocking(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    @_mapped
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        return await self._blocking(self.engine.info)

    @_mapped
    async def SubmitAnalysis(self, request: pb.AnalysisRequest, context) -> pb.Job:
        return self.engine.job_proto(await self._blocking(self.engine.submit, request))

    @_mapped
    async def WatchJob(self, request: pb.WatchJobRequest, context) -> AsyncIterator[pb.JobEvent]:
        """The job now, then every change, until it ends (or the caller goes away: the task is cancelled)."""
        job_id = checked_job_id(request.job_id)  # pure: no thread needed
        with self._events.following(job_id) as changes:
            known = self._events.latest(job_id)  # read after following: no change falls between the two
            if known is None:
                record = await self._blocking(self.engine.get, job_id)
                known = record, pb.JobEvent(job=self.engine.job_proto(record))
            record, event = known
            yield event
            while record.state not in FINAL_STATES:
                try:
                    latest, event = await asyncio.wait_for(changes.get(), timeout=30.0)
                except asyncio.TimeoutError:  # a change made outside this process's store (none expected)
                    latest = await self._blocking(self.engine.get, job_id)
                    event = pb.JobEvent(job=self.engine.job_proto(latest))
                if latest.updated_at > record.updated_at:  # records from two threads may arrive out of order
                    record = latest
                    yield event

    @_mapped
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return self.engine.job_proto(await self._blocking(self.engine.get, request.job_id))

    @_mapped
    async def GetResult(self, request: pb.GetResultRequest, context) -> pb.AnalysisResult:
        return await self._blocking(self.engine.result, request.job_id)

    @_mapped
    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return self.engine.job_proto(await self._blocking(self.engine.cancel, request.job_id))

    @_mapped
    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        records = await self._blocking(self.engine.list, request.limit)
        return pb.ListJobsResponse(jobs=[self.engine.job_proto(r) for r in records])

    @_mapped
    async def ClassifyTiles(self, request_iterator, context) -> AsyncIterator[pb.TilePredictions]:
        async for batch in request_iterator:
            yield await self._blocking(self.engine.classify_tiles, batch)
