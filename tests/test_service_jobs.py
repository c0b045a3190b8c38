"""The job store (SQLite, persistence, reuse, restart recovery, retention), the job executor (order, progress,
bounded queue, cancel, failures, watchers, shutdown, concurrency) and the error → status-name mapping."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hepatoquant.errors import (
    CorruptSlideError,
    HepatoQuantError,
    InvalidGeoJSONError,
    InvalidParameterError,
    MissingMPPError,
    ModelPackError,
    ModelPackNotFoundError,
    NoTissueError,
    OutputWriteError,
    RegionsError,
    SlideNotFoundError,
    UnsupportedSlideError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from hepatoquant.service.executor import (
    ExecutorStoppedError,
    JobCancelledError,
    JobExecutor,
    ProgressReporter,
    QueueFullError,
    RunFunction,
)
from hepatoquant.service.jobs import (
    DATABASE_NAME,
    FINAL_STATES,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
    JobStoreSchemaError,
)
from hepatoquant.service.status import status_name_for

WAIT_S = 20  # generous ceiling for events that take milliseconds; only reached when something is broken


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nested"


@pytest.fixture
def store(state_dir: Path) -> Iterator[JobStore]:
    job_store = JobStore(state_dir)
    yield job_store
    job_store.close()


@pytest.fixture
def make_executor(store: JobStore) -> Iterator[Callable[..., JobExecutor]]:
    """Executors over ``store``, each shut down after the test so no worker thread outlives it."""
    executors: list[JobExecutor] = []

    def make(run: RunFunction, **kwargs: int) -> JobExecutor:
        executor = JobExecutor(store, run, **kwargs)
        executors.append(executor)
        return executor

    yield make
    for executor in executors:
        executor.shutdown(wait=True, timeout=WAIT_S)


def _result_dir(root: Path, name: str) -> str:
    path = root / "results" / name
    path.mkdir(parents=True)
    (path / "report.json").write_text("{}")
    return str(path)


def _wait_until(executor: JobExecutor, job_id: str, done: Callable[[JobRecord], bool]) -> JobRecord:
    """The job's record once ``done`` holds, woken by the store's change announcements (what WatchJob uses)."""
    store = executor._store
    changed = threading.Event()

    def listener(record: JobRecord) -> None:
        if record.job_id == job_id:
            changed.set()

    store.subscribe(listener)
    try:
        deadline = time.monotonic() + WAIT_S
        while not done(record := store.get(job_id)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"job {job_id} stayed {record.state.value} (stage {record.stage!r})")
            changed.wait(min(remaining, 0.5))  # a change made before subscribing is seen on the next look
            changed.clear()
    finally:
        store.unsubscribe(listener)
    return record


def _wait_final(executor: JobExecutor, job_id: str) -> JobRecord:
    return _wait_until(executor, job_id, lambda record: record.is_final)


class LoopingRun:
    """A run function that reports progress until its callback raises (the cancelled / shutdown path)."""

    def __init__(self, result_root: Path) -> None:
        self.result_root = result_root
        self.started = threading.Event()
        self.stopped_by: list[type[BaseException]] = []

    def __call__(self, job: JobRecord, report: ProgressReporter) -> str:
        self.started.set()
        pause = threading.Event()
        for done in range(1_000_000):
            try:
                report("classify", done, 1_000_000)
            except JobCancelledError as error:
                self.stopped_by.append(type(error))
                raise
            pause.wait(0.001)
        return _result_dir(self.result_root, job.job_id)  # never stopped: the test's state checks fail


# --- store -------------------------------------------------------------------------------------------------


def test_create_and_get(store: JobStore, state_dir: Path) -> None:
    before = time.time()
    job = store.create('{"slide": "a.svs"}', "key-a")
    assert (state_dir / DATABASE_NAME).is_file()
    assert len(job.job_id) == 32 and int(job.job_id, 16) >= 0
    assert job.state is JobState.QUEUED and not job.is_final
    assert (job.request_json, job.request_key) == ('{"slide": "a.svs"}', "key-a")
    assert before <= job.created_at == job.updated_at <= time.time()
    assert (job.stage, job.done, job.total, job.error_code) == ("", 0, 0, "")
    assert job.result_dir is None and job.reused_from is None
    assert store.get(job.job_id) == job


UNKNOWN_ID = "0123abcd" * 4


def test_get_unknown_job_names_the_id(store: JobStore) -> None:
    with pytest.raises(JobNotFoundError, match=UNKNOWN_ID) as caught:
        store.get(UNKNOWN_ID)
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, HepatoQuantError)
    assert str(caught.value).startswith(f"no job with id '{UNKNOWN_ID}'")  # a sentence, not KeyError's quoted repr
    with pytest.raises(JobNotFoundError):
        store.set_state(UNKNOWN_ID, JobState.RUNNING)
    with pytest.raises(JobNotFoundError):
        store.set_progress(UNKNOWN_ID, "tiles", 1, 2, 0.0)


@pytest.mark.parametrize("job_id", ["", "no-such-job", "0123abcd", "x" * 100_000, "0" * 31 + "\x00", "../" * 20])
def test_what_cannot_be_a_job_id_is_refused_before_the_lookup_in_a_short_message(store: JobStore, job_id: str) -> None:
    """Issue 19: a 100 kB job id came back inside its error, which then exceeded the message limit."""
    with pytest.raises(InvalidParameterError, match="job") as caught:
        store.get(job_id)
    assert len(str(caught.value)) < 200


def test_a_job_id_in_capitals_or_with_dashes_is_the_same_job(store: JobStore) -> None:
    job = store.create("{}", "k")
    dashed = str(uuid.UUID(hex=job.job_id)).upper()
    assert store.get(dashed) == job


def test_list_is_newest_first_with_a_limit(store: JobStore) -> None:
    ids = [store.create("{}", f"key-{i}").job_id for i in range(5)]
    assert [job.job_id for job in store.list()] == ids[::-1]
    assert [job.job_id for job in store.list(limit=2)] == ids[::-1][:2]
    assert store.list(limit=0) == []
    with pytest.raises(InvalidParameterError):
        store.list(limit=-1)


def test_updated_at_grows_with_every_change_even_within_one_clock_tick(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.create("{}", "key")
    monkeypatch.setattr(time, "time", lambda: job.created_at)  # a clock that does not move
    stamps = [job.updated_at]
    for done in range(50):
        store.set_progress(job.job_id, "classify", done, 50, 1.0)
        stamps.append(store.get(job.job_id).updated_at)
    assert all(later > earlier for earlier, later in zip(stamps, stamps[1:]))


def test_records_persist_in_a_new_store_on_the_same_folder(store: JobStore, state_dir: Path, tmp_path: Path) -> None:
    done_job = store.create('{"n": 1}', "key-1")
    result = _result_dir(tmp_path, "r1")
    store.set_progress(done_job.job_id, "classify", 7, 9, 12.5)
    store.set_state(done_job.job_id, JobState.SUCCEEDED, result_dir=result)
    failed = store.set_state(
        store.create('{"n": 2}', "key-2").job_id, JobState.FAILED, error_code="NOT_FOUND", error_message="no slide"
    )
    store.close()

    reopened = JobStore(state_dir)
    try:
        again = reopened.get(done_job.job_id)
        assert (again.state, again.result_dir, again.stage, again.done, again.total, again.items_per_second) == (
            JobState.SUCCEEDED,
            result,
            "classify",
            7,
            9,
            12.5,
        )
        assert reopened.get(failed.job_id) == failed
        assert [job.job_id for job in reopened.list()] == [failed.job_id, done_job.job_id]
    finally:
        reopened.close()


def test_a_database_from_a_newer_version_is_refused(state_dir: Path) -> None:
    JobStore(state_dir).close()
    with sqlite3.connect(state_dir / DATABASE_NAME) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JobStoreSchemaError, match="99"):
        JobStore(state_dir)


def test_reuse_prefers_a_result_on_disk_then_a_job_in_flight(store: JobStore, tmp_path: Path) -> None:
    assert store.find_reusable("key") is None
    older = store.create("{}", "key")
    store.set_state(older.job_id, JobState.SUCCEEDED, result_dir=_result_dir(tmp_path, "older"))
    newer = store.create("{}", "key")
    newer_result = _result_dir(tmp_path, "newer")
    store.set_state(newer.job_id, JobState.SUCCEEDED, result_dir=newer_result)
    running = store.set_state(store.create("{}", "key").job_id, JobState.RUNNING)
    store.set_state(store.create("{}", "key").job_id, JobState.FAILED, error_code="INTERNAL")
    store.create("{}", "other-key")

    found = store.find_reusable("key")
    assert found is not None and found.job_id == newer.job_id  # newest succeeded, although one is running

    shutil.rmtree(newer_result)
    found = store.find_reusable("key")
    assert found is not None and found.job_id == older.job_id  # a deleted result answers nothing

    shutil.rmtree(tmp_path / "results" / "older")
    found = store.find_reusable("key")
    assert found is not None and found.job_id == running.job_id

    store.set_state(running.job_id, JobState.CANCELLED)
    assert store.find_reusable("key") is None


def test_a_reused_job_is_born_succeeded_with_the_same_result(store: JobStore, tmp_path: Path) -> None:
    source = store.create("{}", "key")
    result = _result_dir(tmp_path, "r")
    source = store.set_state(source.job_id, JobState.SUCCEEDED, result_dir=result)
    reused = store.create('{"again": true}', "key", reused_from=source)
    assert reused.job_id != source.job_id
    assert (reused.state, reused.result_dir, reused.reused_from) == (JobState.SUCCEEDED, result, source.job_id)
    with pytest.raises(ValueError, match="no result to reuse"):
        store.create("{}", "key", reused_from=store.create("{}", "key"))


def test_recover_after_restart_interrupts_running_jobs_and_returns_queued_ones(
    store: JobStore, state_dir: Path
) -> None:
    first_queued = store.create("{}", "a")
    running = store.set_state(store.create("{}", "b").job_id, JobState.RUNNING)
    second_queued = store.create("{}", "c")
    finished = store.set_state(store.create("{}", "d").job_id, JobState.SUCCEEDED, result_dir="/somewhere")
    store.close()  # the server "dies" here

    restarted = JobStore(state_dir)
    try:
        requeue = restarted.recover_after_restart()
        assert [job.job_id for job in requeue] == [first_queued.job_id, second_queued.job_id]
        assert all(job.state is JobState.QUEUED for job in requeue)
        interrupted = restarted.get(running.job_id)
        assert interrupted.state is JobState.INTERRUPTED and interrupted.is_final
        assert interrupted.error_code == "UNAVAILABLE"
        assert "server stopped" in interrupted.error_message and "submit" in interrupted.error_message
        assert restarted.get(finished.job_id) == finished
        assert [job.job_id for job in restarted.recover_after_restart()] == [job.job_id for job in requeue]
    finally:
        restarted.close()


def test_retention_deletes_only_the_older_results(store: JobStore, tmp_path: Path) -> None:
    jobs, results = [], []
    for name in ("oldest", "middle", "newest"):
        job = store.create("{}", name)
        results.append(_result_dir(tmp_path, name))
        jobs.append(store.set_state(job.job_id, JobState.SUCCEEDED, result_dir=results[-1]))
    # The oldest result was reused recently: it counts once, as new as that reuse.
    reuse_of_oldest = store.create("{}", "oldest", reused_from=jobs[0])
    running = store.set_state(store.create("{}", "x").job_id, JobState.RUNNING)
    unrelated = tmp_path / "results" / "not-a-job"
    unrelated.mkdir()

    assert store.apply_retention(None) == []
    assert store.apply_retention(2) == [jobs[1].job_id]
    assert not Path(results[1]).exists()
    assert Path(results[0]).is_dir() and Path(results[2]).is_dir() and unrelated.is_dir()
    assert store.get(jobs[1].job_id).result_dir is None
    assert store.get(jobs[1].job_id).state is JobState.SUCCEEDED
    assert store.get(jobs[0].job_id).result_dir == results[0]
    assert store.get(running.job_id).state is JobState.RUNNING
    assert store.apply_retention(2) == []

    assert set(store.apply_retention(1)) == {jobs[2].job_id}
    assert sorted(store.apply_retention(0)) == sorted([jobs[0].job_id, reuse_of_oldest.job_id])
    assert not Path(results[0]).exists() and not Path(results[2]).exists() and unrelated.is_dir()
    with pytest.raises(InvalidParameterError):
        store.apply_retention(-1)


def test_retention_clears_results_that_are_already_gone(store: JobStore, tmp_path: Path) -> None:
    kept = store.set_state(store.create("{}", "a").job_id, JobState.SUCCEEDED, result_dir=_result_dir(tmp_path, "a"))
    gone_dir = _result_dir(tmp_path, "b")
    gone = store.set_state(store.create("{}", "b").job_id, JobState.SUCCEEDED, result_dir=gone_dir)
    shutil.rmtree(gone_dir)
    assert store.apply_retention(5) == [gone.job_id]
    assert store.get(kept.job_id).result_dir is not None


# --- executor ----------------------------------------------------------------------------------------------


def test_one_worker_runs_jobs_in_submission_order(store: JobStore, make_executor, tmp_path: Path) -> None:
    ran: list[str] = []

    def run(job: JobRecord, report: ProgressReporter) -> str:
        ran.append(job.job_id)
        assert store.get(job.job_id).state is JobState.RUNNING
        return _result_dir(tmp_path, job.job_id)

    executor = make_executor(run, workers=1)
    jobs = [store.create("{}", f"k{i}") for i in range(4)]
    for job in jobs:
        executor.submit(job)
    executor.start()
    finals = [_wait_final(executor, job.job_id) for job in jobs]
    assert ran == [job.job_id for job in jobs]
    assert all(final.state is JobState.SUCCEEDED for final in finals)
    assert [final.result_dir for final in finals] == [str(tmp_path / "results" / job.job_id) for job in jobs]


def test_progress_is_persisted_with_a_rate(store: JobStore, state_dir: Path, make_executor, tmp_path: Path) -> None:
    def run(job: JobRecord, report: ProgressReporter) -> str:
        report("tissue", 1, 1)
        report("classify", 96, 128)
        return _result_dir(tmp_path, job.job_id)

    executor = make_executor(run)
    job = store.create("{}", "k")
    executor.submit(job)
    executor.start()
    assert _wait_final(executor, job.job_id).state is JobState.SUCCEEDED
    reopened = JobStore(state_dir)
    try:
        record = reopened.get(job.job_id)
    finally:
        reopened.close()
    assert (record.stage, record.done, record.total) == ("classify", 96, 128)
    assert record.items_per_second > 0


def test_a_full_queue_refuses_the_job_and_leaves_it_to_the_caller(store: JobStore, make_executor) -> None:
    executor = make_executor(lambda job, report: "unused", max_queued=2)  # not started: jobs wait
    waiting = [store.create("{}", f"k{i}") for i in range(2)]
    for job in waiting:
        executor.submit(job)
    refused = store.create("{}", "k-late")
    with pytest.raises(QueueFullError, match="queue of 2 jobs is full.*try again later") as caught:
        executor.submit(refused)
    assert status_name_for(caught.value) == "RESOURCE_EXHAUSTED"
    assert store.get(refused.job_id) == refused  # not written: the engine forgets a refusal (issue 19)
    assert all(store.get(job.job_id).state is JobState.QUEUED for job in waiting)


def test_submit_refuses_a_job_that_is_not_queued(store: JobStore, make_executor) -> None:
    executor = make_executor(lambda job, report: "unused")
    job = store.set_state(store.create("{}", "k").job_id, JobState.SUCCEEDED, result_dir="/r")
    with pytest.raises(ValueError, match="succeeded"):
        executor.submit(job)


def test_cancel_a_queued_job_before_it_runs(store: JobStore, make_executor, tmp_path: Path) -> None:
    ran: list[str] = []

    def run(job: JobRecord, report: ProgressReporter) -> str:
        ran.append(job.job_id)
        return _result_dir(tmp_path, job.job_id)

    executor = make_executor(run, max_queued=1)
    cancelled, kept = store.create("{}", "a"), store.create("{}", "b")
    executor.submit(cancelled)
    record = executor.cancel(cancelled.job_id)
    assert (record.state, record.error_code) == (JobState.CANCELLED, "CANCELLED")
    executor.submit(kept)  # the cancelled job no longer takes the queue's one place
    executor.start()
    assert _wait_final(executor, kept.job_id).state is JobState.SUCCEEDED
    assert ran == [kept.job_id]
    assert store.get(cancelled.job_id).state is JobState.CANCELLED


def test_cancel_a_running_job_stops_it_between_batches(store: JobStore, make_executor, tmp_path: Path) -> None:
    run = LoopingRun(tmp_path)
    executor = make_executor(run)
    job = store.create("{}", "k")
    executor.submit(job)
    executor.start()
    assert run.started.wait(WAIT_S)
    _wait_until(executor, job.job_id, lambda record: record.done > 0)
    assert executor.cancel(job.job_id).state is JobState.RUNNING  # told to stop; stops at the next batch
    final = _wait_final(executor, job.job_id)
    assert (final.state, final.error_code) == (JobState.CANCELLED, "CANCELLED")
    assert "cancelled" in final.error_message and final.result_dir is None
    assert run.stopped_by == [JobCancelledError]


def test_cancel_leaves_a_finished_job_alone(store: JobStore, make_executor) -> None:
    executor = make_executor(lambda job, report: "unused")
    finished = store.set_state(store.create("{}", "k").job_id, JobState.SUCCEEDED, result_dir="/r")
    assert executor.cancel(finished.job_id) == finished
    with pytest.raises(JobNotFoundError):
        executor.cancel(UNKNOWN_ID)


def test_our_errors_fail_the_job_with_their_status_and_message(store: JobStore, make_executor) -> None:
    def run(job: JobRecord, report: ProgressReporter) -> str:
        raise InvalidParameterError("tile size 0 px is below 1 px; give a positive tile size")

    executor = make_executor(run)
    job = store.create("{}", "k")
    executor.submit(job)
    executor.start()
    final = _wait_final(executor, job.job_id)
    assert (final.state, final.error_code) == (JobState.FAILED, "INVALID_ARGUMENT")
    assert final.error_message == "tile size 0 px is below 1 px; give a positive tile size"


def test_other_errors_fail_as_internal_without_leaking_details(store: JobStore, make_executor) -> None:
    def run(job: JobRecord, report: ProgressReporter) -> str:
        raise ZeroDivisionError("secret detail in /srv/private/slides/patient-42.svs")

    executor = make_executor(run)
    job = store.create("{}", "k")
    executor.submit(job)
    executor.start()
    final = _wait_final(executor, job.job_id)
    assert (final.state, final.error_code) == (JobState.FAILED, "INTERNAL")
    assert "internal error" in final.error_message and "ZeroDivisionError" in final.error_message
    for leak in ("secret", "/srv", "patient-42", "Traceback", "line "):
        assert leak not in final.error_message


def test_a_worker_keeps_going_after_a_failed_job(store: JobStore, make_executor, tmp_path: Path) -> None:
    def run(job: JobRecord, report: ProgressReporter) -> str:
        if job.request_key == "bad":
            raise RuntimeError("boom")
        return _result_dir(tmp_path, job.job_id)

    executor = make_executor(run, workers=1)
    bad, good = store.create("{}", "bad"), store.create("{}", "good")
    executor.submit(bad)
    executor.submit(good)
    executor.start()
    assert _wait_final(executor, bad.job_id).state is JobState.FAILED
    assert _wait_final(executor, good.job_id).state is JobState.SUCCEEDED


def test_the_store_announces_each_change_to_its_subscribers_at_once(store: JobStore, make_executor,
                                                                    tmp_path: Path) -> None:
    """What the server's WatchJob streams follow: every state and progress change, as it is written."""
    go, finish = threading.Event(), threading.Event()

    def run(job: JobRecord, report: ProgressReporter) -> str:
        assert go.wait(WAIT_S)
        report("classify", 3, 10)
        assert finish.wait(WAIT_S)
        return _result_dir(tmp_path, job.job_id)

    executor = make_executor(run)
    job = store.create("{}", "k")
    heard: list[tuple[JobRecord, float]] = []
    store.subscribe(lambda record: heard.append((record, time.monotonic())))
    executor.submit(job)
    executor.start()
    _wait_until(executor, job.job_id, lambda record: record.state is JobState.RUNNING)
    reported_at = time.monotonic()
    go.set()
    _wait_until(executor, job.job_id, lambda record: record.stage == "classify")
    finish.set()
    _wait_final(executor, job.job_id)
    states = [(record.state, record.stage, record.done) for record, _ in heard]
    assert states == [(JobState.RUNNING, "", 0), (JobState.RUNNING, "classify", 3), (JobState.SUCCEEDED, "classify", 3)]
    progress_heard_at = heard[1][1]
    assert progress_heard_at - reported_at < WAIT_S / 2  # as it was written, not on some later poll
    assert [record.updated_at for record, _ in heard] == sorted(record.updated_at for record, _ in heard)


def test_shutdown_interrupts_the_running_job_and_keeps_queued_ones(
    store: JobStore, state_dir: Path, make_executor, tmp_path: Path
) -> None:
    run = LoopingRun(tmp_path)
    executor = make_executor(run, workers=1)
    running, queued = store.create("{}", "a"), store.create("{}", "b")
    executor.submit(running)
    executor.submit(queued)
    executor.start()
    assert run.started.wait(WAIT_S)

    executor.shutdown(wait=True, timeout=WAIT_S)
    interrupted = store.get(running.job_id)
    assert (interrupted.state, interrupted.error_code) == (JobState.INTERRUPTED, "UNAVAILABLE")
    assert "shut down" in interrupted.error_message and "submit" in interrupted.error_message
    assert store.get(queued.job_id).state is JobState.QUEUED
    with pytest.raises(ExecutorStoppedError):
        executor.submit(store.create("{}", "c"))
    with pytest.raises(ExecutorStoppedError):
        executor.start()

    restarted = JobStore(state_dir)
    try:
        assert queued.job_id in [job.job_id for job in restarted.recover_after_restart()]
        assert restarted.get(running.job_id).state is JobState.INTERRUPTED
    finally:
        restarted.close()


def test_sixteen_threads_submitting_and_reading_lose_nothing(store: JobStore, make_executor, tmp_path: Path) -> None:
    runs: Counter[str] = Counter()
    runs_lock = threading.Lock()

    def run(job: JobRecord, report: ProgressReporter) -> str:
        with runs_lock:
            runs[job.job_id] += 1
        report("classify", 1, 1)
        return f"/results/{job.job_id}"

    executor = make_executor(run, workers=4, max_queued=1000)
    executor.start()
    start = threading.Barrier(16)
    submitted: list[list[str]] = [[] for _ in range(16)]
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            start.wait(WAIT_S)
            for n in range(10):
                job = store.create(f'{{"client": {index}, "n": {n}}}', f"key-{index}-{n}")
                executor.submit(job)
                submitted[index].append(job.job_id)
                assert store.get(job.job_id).request_key == f"key-{index}-{n}"
                store.list(limit=5)
        except BaseException as error:  # reported by the main thread below
            errors.append(error)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(WAIT_S)
    assert errors == []
    all_ids = [job_id for ids in submitted for job_id in ids]
    assert len(all_ids) == len(set(all_ids)) == 160
    finals = [_wait_final(executor, job_id) for job_id in all_ids]
    assert all(final.state is JobState.SUCCEEDED for final in finals)
    assert all(final.result_dir == f"/results/{final.job_id}" for final in finals)
    assert runs == Counter({job_id: 1 for job_id in all_ids})  # each job ran exactly once
    assert {job.job_id for job in store.list(limit=1000)} == set(all_ids)


def test_executor_settings_are_checked(store: JobStore) -> None:
    with pytest.raises(InvalidParameterError, match="workers 0"):
        JobExecutor(store, lambda job, report: "", workers=0)
    with pytest.raises(InvalidParameterError, match="queue size 0"):
        JobExecutor(store, lambda job, report: "", max_queued=0)


# --- status names ------------------------------------------------------------------------------------------


class _OurPermissionError(HepatoQuantError, PermissionError):
    """Stands in for a future 'slide outside the allowed roots' error."""


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (SlideNotFoundError("x"), "NOT_FOUND"),
        (ModelPackNotFoundError("x"), "NOT_FOUND"),  # more specific than ModelPackError
        (JobNotFoundError("x"), "NOT_FOUND"),
        (InvalidGeoJSONError("x"), "INVALID_ARGUMENT"),
        (RegionsError("x"), "INVALID_ARGUMENT"),
        (InvalidParameterError("x"), "INVALID_ARGUMENT"),
        (UnsupportedSlideError("x"), "INVALID_ARGUMENT"),
        (CorruptSlideError("x"), "INVALID_ARGUMENT"),
        (MissingMPPError("x"), "FAILED_PRECONDITION"),
        (NoTissueError("x"), "FAILED_PRECONDITION"),
        (ModelPackError("x"), "FAILED_PRECONDITION"),
        (WeightsMismatchError("x"), "FAILED_PRECONDITION"),
        (WeightsNotFoundError("x"), "FAILED_PRECONDITION"),  # inherits its parent's code
        (QueueFullError("x"), "RESOURCE_EXHAUSTED"),
        (JobCancelledError("x"), "CANCELLED"),
        (ExecutorStoppedError("x"), "UNAVAILABLE"),
        (_OurPermissionError("x"), "PERMISSION_DENIED"),
        (OutputWriteError("x"), "INTERNAL"),  # the server's disk, not the client's request
        (HepatoQuantError("x"), "INTERNAL"),
        (PermissionError("x"), "INTERNAL"),  # not ours: a bug, whatever its builtin class
        (ZeroDivisionError("x"), "INTERNAL"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value,
)
def test_status_name_for(error: BaseException, status: str) -> None:
    assert status_name_for(error) == status


def test_final_states() -> None:
    assert FINAL_STATES == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    assert JobState("running") is JobState.RUNNING and JobState.RUNNING == "running"


def test_an_end_the_store_will_not_take_is_retried_then_recorded_failed_and_its_result_removed(
        store: JobStore, make_executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: a job whose end could not be written stayed RUNNING for ever. The end is retried; after three
    failures the job is recorded FAILED saying why, and the result it cannot vouch for is removed."""
    import hepatoquant.service.executor as executor_module
    from hepatoquant.errors import StorageFullError

    monkeypatch.setattr(executor_module, "END_RETRY_FIRST_WAIT_S", 0.01)
    real_set_state = store.set_state
    refused: list[JobState] = []

    def full_disk_for_the_end(job_id, state, **kwargs):
        if state is JobState.SUCCEEDED:  # the succeeded end never fits; a (smaller) failed end does
            refused.append(state)
            raise StorageFullError("the server's disk is full: the job could not be recorded")
        return real_set_state(job_id, state, **kwargs)

    monkeypatch.setattr(store, "set_state", full_disk_for_the_end)
    executor = make_executor(lambda job, report: _result_dir(tmp_path, job.job_id))
    job = store.create("{}", "k")
    executor.submit(job)
    executor.start()
    final = _wait_until(executor, job.job_id, lambda record: record.is_final)
    assert refused == [JobState.SUCCEEDED] * 3
    assert final.state is JobState.FAILED and final.error_code == "RESOURCE_EXHAUSTED"
    assert "could not record it" in final.error_message and final.result_dir is None
    assert not (tmp_path / "results" / job.job_id).exists() and executor.unrecorded_ends() == 0
