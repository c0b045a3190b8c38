"""Runs analysis jobs from a bounded queue on a fixed number of worker threads.

The number of workers is how many analyses share the device(s) at once, so that concurrent jobs never
oversubscribe GPU memory; the queue is bounded so that a flood of requests is answered RESOURCE_EXHAUSTED
instead of exhausting the server. Every state change goes to the JobStore first, then wakes the threads that
watch jobs (WatchJob streams), so what a watcher sees is always what a restarted server would see.

Cancelling is cooperative: the progress callback handed to the run function raises JobCancelledError once the
job is cancelled, which stops an analysis between batches without killing a thread mid-write.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hepatoquant.errors import (  # the executor's errors live with the others
    ExecutorStoppedError,
    HepatoQuantError,
    InvalidParameterError,
    JobCancelledError,
    QueueFullError,
)
from hepatoquant.service import logs
from hepatoquant.service.jobs import INTERRUPTED_CODE, JobRecord, JobState, JobStore
from hepatoquant.service.status import INTERNAL, status_name_for

__all__ = [
    "ExecutorStoppedError",
    "JobCancelledError",
    "JobExecutor",
    "ProgressReporter",
    "QueueFullError",
    "RunFunction",
]

log = logging.getLogger(__name__)

# stage name, done, total (as analysis.ProgressCallback); raises JobCancelledError once the job is cancelled.
ProgressReporter = Callable[[str, int, int], None]
# Runs one job to the end and returns its result folder; raises our errors for bad input.
RunFunction = Callable[[JobRecord, ProgressReporter], str]

_BY_REQUEST = "cancel"  # why a running job was told to stop: a client asked ...
_BY_SHUTDOWN = "shutdown"  # ... or the server is stopping (the job ends INTERRUPTED, to be submitted again)
CANCELLED_MESSAGE = "the job was cancelled at a client's request"
SHUTDOWN_MESSAGE = "the server shut down while this job was running; submit the same request again to rerun it"


@dataclass(frozen=True)
class _Outcome:
    """How a run ended, as the store will record it."""

    state: JobState
    error_code: str = ""
    error_message: str = ""
    result_dir: str | None = None


class _ProgressMeter:
    """Items per second within the current stage, timed from the end of the previous one; and which reports are
    worth recording."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._last_report = time.monotonic()
        self._stage_started = self._last_report
        self._recorded_stage: str | None = None
        self._recorded_at = 0.0

    def due(self, stage: str, done: int, total: int) -> bool:
        """A stage's first and last report, and at most one every PROGRESS_INTERVAL_S in between: a job's
        batches can come faster than anyone reads them, and each recorded one goes to every watcher."""
        now = time.monotonic()
        if stage != self._recorded_stage or done >= total or now - self._recorded_at >= PROGRESS_INTERVAL_S:
            self._recorded_stage, self._recorded_at = stage, now
            return True
        return False

    def rate(self, stage: str, done: int) -> float:
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_started = stage, self._last_report
        self._last_report = now
        elapsed = now - self._stage_started
        return done / elapsed if done > 0 and elapsed > 0 else 0.0


END_RETRY_FIRST_WAIT_S = 1.0  # the first wait before writing a job's end again (then doubled, up to 30 s)
PROGRESS_INTERVAL_S = 0.2  # progress is recorded at most this often within a stage (its first and last always)

# Nice value of the job workers' threads (and of the reader and PyTorch threads they start, which inherit it):
# on a machine whose cores a job fills, the serving thread still gets the CPU at once, so health checks and
# watchers are answered in milliseconds (measured: benchmarks/server_load.py, README).
WORKER_NICENESS = 10


def _yield_to_serving() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (OSError, AttributeError):  # not Linux, or not allowed: jobs run at normal priority
        log.info("job worker threads run at normal priority (could not lower it)")


class JobExecutor:
    """A bounded FIFO of queued jobs and ``workers`` threads that run them with ``run``.

    ``submit`` and ``cancel`` answer at once (streams follow jobs through ``JobStore.subscribe``). ``shutdown`` stops running jobs between batches (they end INTERRUPTED) and leaves waiting jobs
    QUEUED in the store, where ``JobStore.recover_after_restart`` finds them again. ``on_success`` (if given)
    is called with each job's SUCCEEDED record before watchers are woken, e.g. to apply result retention.
    """

    def __init__(
        self,
        store: JobStore,
        run: RunFunction,
        *,
        workers: int = 1,
        max_queued: int = 16,
        on_success: Callable[[JobRecord], None] | None = None,
    ) -> None:
        if workers < 1:
            raise InvalidParameterError(f"job workers {workers} is below 1; give 1 or more")
        if max_queued < 1:
            raise InvalidParameterError(f"job queue size {max_queued} is below 1; give 1 or more")
        self._store = store
        self._run = run
        self._workers = workers
        self._max_queued = max_queued
        self._on_success = on_success
        # One condition guards the queue and the running set, and wakes both idle workers and watchers.
        self._changed = threading.Condition()
        self._queue: deque[str] = deque()
        self._stop_reasons: dict[str, str | None] = {}  # running job id -> None, or why it must stop
        self._unrecorded: set[str] = set()  # jobs whose end the store has not taken yet (retried)
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        """Start the worker threads (once; later calls do nothing)."""
        with self._changed:
            if self._stopping:
                raise ExecutorStoppedError("the job executor was shut down; create a new one to run jobs")
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._work, name=f"hepatoquant-job-worker-{i}", daemon=True)
                for i in range(self._workers)
            ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: JobRecord) -> None:
        """Queue a QUEUED job. If ``max_queued`` jobs already wait, QueueFullError is raised and the job is left
        as it is: the caller removes a job it just made (a refusal is not a job) or records an old one failed."""
        with self._changed:
            if self._stopping:
                raise ExecutorStoppedError(
                    f"the server is shutting down and did not take job {job.job_id}; submit it again once it is back"
                )
            current = self._store.get(job.job_id)
            if current.state is not JobState.QUEUED:
                raise ValueError(f"job {job.job_id} is {current.state.value}; only queued jobs can be submitted")
            if job.job_id in self._queue:
                return
            if len(self._queue) >= self._max_queued:
                raise self._refused(job.job_id)
            self._queue.append(job.job_id)
            self._changed.notify_all()

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one is CANCELLED at once; a running one is told to stop and becomes
        CANCELLED when its run does (the record returned still says RUNNING); a finished one is left as is."""
        with self._changed:
            record = self._store.get(job_id)
            if record.state is JobState.QUEUED:
                if job_id in self._queue:
                    self._queue.remove(job_id)
                outcome = self._stopped_outcome(_BY_REQUEST)
                record = self._store.set_state(
                    job_id, outcome.state, error_code=outcome.error_code, error_message=outcome.error_message
                )
                self._changed.notify_all()
            elif job_id in self._stop_reasons and self._stop_reasons[job_id] is None:
                self._stop_reasons[job_id] = _BY_REQUEST
            return record

    def shutdown(self, *, wait: bool = True, timeout: float = 30) -> None:
        """Take no more jobs; tell running jobs to stop (they end INTERRUPTED, unless a client had already
        cancelled them); leave waiting jobs QUEUED in the store for the next server. With ``wait``, join the
        workers for at most ``timeout`` seconds; a run that never reports progress may outlast that, and its
        job is then settled by ``recover_after_restart``."""
        with self._changed:
            self._stopping = True
            self._queue.clear()
            for job_id, reason in self._stop_reasons.items():
                if reason is None:
                    self._stop_reasons[job_id] = _BY_SHUTDOWN
            self._changed.notify_all()
            threads = list(self._threads)
        if wait:
            deadline = time.monotonic() + timeout
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _refused(self, job_id: str) -> QueueFullError:
        return QueueFullError(f"the queue of {self._max_queued} jobs is full; the request was not taken, try again later")

    def _work(self) -> None:
        """One worker thread: take the oldest queued job, run it, record how it ended; until shutdown."""
        _yield_to_serving()
        while (job := self._next_job()) is not None:
            logs.job_event(job.job_id, "started")
            started = time.monotonic()
            outcome = self._outcome_of_run(job)
            logs.job_event(job.job_id, "finished", state=outcome.state.value, code=outcome.error_code or "OK",
                           seconds=round(time.monotonic() - started, 2))
            self._record_end(job.job_id, outcome)

    def _record_end(self, job_id: str, outcome: _Outcome) -> None:
        """Record how the job ended, however long the store needs: a job must never stay RUNNING on disk after
        its run (it once did when the disk filled). Retried with backoff (END_RETRY_FIRST_WAIT_S doubling to
        30 s); after three failures the job is recorded FAILED with the reason instead (a smaller write, and the
        truth: its outcome could not be kept; its result folder is removed). At shutdown the retries stop and
        the next start reports the job INTERRUPTED."""
        attempt = 0
        while True:
            try:
                self._finish(job_id, outcome)
            except Exception as error:  # noqa: BLE001 - the store's failure; retried, and the worker goes on
                attempt += 1
                logs.job_event(job_id, "end-not-recorded", level=logging.WARNING, attempt=attempt, error=str(error))
                with self._changed:
                    self._unrecorded.add(job_id)
                    if not self._stopping:
                        self._changed.wait(min(30.0, END_RETRY_FIRST_WAIT_S * 2 ** (attempt - 1)))
                    if self._stopping:
                        return
                if attempt == 3 and outcome.state is not JobState.FAILED:
                    if outcome.result_dir is not None:
                        shutil.rmtree(outcome.result_dir, ignore_errors=True)
                    code = status_name_for(error) if isinstance(error, HepatoQuantError) else INTERNAL
                    outcome = _Outcome(JobState.FAILED, code, f"the job ran to its end ({outcome.state.value}) but the "
                                       "server could not record it, so its result is not kept; submit it again")
                continue
            if attempt:
                logs.job_event(job_id, "end-recorded", level=logging.WARNING, attempts=attempt + 1,
                               state=outcome.state.value)
            return

    def is_live(self, job_id: str) -> bool:
        """True while this executor has the job queued or running (its end recorded or not yet due): a QUEUED
        or RUNNING record it does not hold is stale, and must not answer a new request."""
        with self._changed:
            return job_id in self._queue or job_id in self._stop_reasons

    def workers_alive(self) -> bool:
        """True while every started worker thread runs (before start and after shutdown: True)."""
        with self._changed:
            return self._stopping or all(thread.is_alive() for thread in self._threads)

    def unrecorded_ends(self) -> int:
        """Jobs whose end could not be recorded yet (the store is failing): health is NOT_SERVING meanwhile."""
        with self._changed:
            return len(self._unrecorded)

    def _next_job(self) -> JobRecord | None:
        """The next job, now RUNNING; None at shutdown. Popping and marking RUNNING happen under one lock, so a
        cancel sees the job either still queued or already running, never in between."""
        with self._changed:
            while True:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return None
                job_id = self._queue.popleft()
                try:
                    if self._store.get(job_id).state is not JobState.QUEUED:
                        continue  # settled by someone else since it was queued
                    running = self._store.set_state(job_id, JobState.RUNNING)
                except HepatoQuantError as error:  # the store is failing: the job waits, the worker stays
                    logs.job_event(job_id, "not-started", level=logging.WARNING, error=str(error))
                    self._queue.appendleft(job_id)
                    self._changed.wait(1.0)
                    continue
                self._stop_reasons[job_id] = None
                self._changed.notify_all()
                return running

    def _outcome_of_run(self, job: JobRecord) -> _Outcome:
        """Run the job and turn its return or exception into a final state; tracebacks go to the log only."""
        try:
            result_dir = self._run(job, self._progress_reporter(job.job_id))
        except JobCancelledError:
            with self._changed:
                return self._stopped_outcome(self._stop_reasons.get(job.job_id) or _BY_REQUEST)
        except HepatoQuantError as error:
            return _Outcome(JobState.FAILED, status_name_for(error), str(error))
        except Exception as error:
            log.exception("job %s failed with an internal error", job.job_id)
            message = f"an internal error ({type(error).__name__}) stopped the job; the server log has the details"
            return _Outcome(JobState.FAILED, INTERNAL, message)
        return _Outcome(JobState.SUCCEEDED, result_dir=str(result_dir))

    def _progress_reporter(self, job_id: str) -> ProgressReporter:
        """The callback a run gets: stop the job if asked to, else record its progress and wake watchers."""
        meter = _ProgressMeter()

        def report(stage: str, done: int, total: int) -> None:
            with self._changed:
                reason = self._stop_reasons.get(job_id)
                if reason is not None:
                    raise JobCancelledError(f"job {job_id} was stopped ({reason})")
                rate = meter.rate(stage, done)
                if meter.due(stage, done, total):
                    self._store.set_progress(job_id, stage, done, total, rate)

        return report

    def _finish(self, job_id: str, outcome: _Outcome) -> None:
        with self._changed:
            self._stop_reasons.pop(job_id, None)
            record = self._store.set_state(
                job_id,
                outcome.state,
                error_code=outcome.error_code,
                error_message=outcome.error_message,
                result_dir=outcome.result_dir,
            )
            self._unrecorded.discard(job_id)
            if record.state is JobState.SUCCEEDED and self._on_success is not None:
                try:  # the result just recorded is the newest, so retention keeps it
                    self._on_success(record)
                except Exception:
                    log.exception("after job %s succeeded, its follow-up (result retention) failed", job_id)
            self._changed.notify_all()

    @staticmethod
    def _stopped_outcome(reason: str) -> _Outcome:
        """CANCELLED for a client's request; INTERRUPTED (submit again) for a server shutdown."""
        if reason == _BY_SHUTDOWN:
            return _Outcome(JobState.INTERRUPTED, INTERRUPTED_CODE, SHUTDOWN_MESSAGE)
        return _Outcome(JobState.CANCELLED, status_name_for(JobCancelledError(CANCELLED_MESSAGE)), CANCELLED_MESSAGE)
