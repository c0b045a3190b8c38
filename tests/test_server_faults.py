"""The server when things go wrong: killed or stopped mid-job, cancelled jobs, a full queue, oversized messages,
impatient watchers, result retention. Loopback only (127.0.0.1); `hepatoquant serve` runs as a real
subprocess where a process has to die, in-process elsewhere.

A "slow" job is the 2048 px synthetic slide cut into 16 px tiles: ~5,700 tiles in ~180 batches (about 2 s on two
CPU cores), with progress, and so a cancellation point, every batch; tests act on it right after its first batch.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hepatoquant_client.proto import pb, pb_grpc
from slow_jobs import cli_command, throttle

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import RunningServer, start_server

SLIDE = "synthetic.tiff"
SLOW = {"tile_size_px": 16, "omit_tiles": True}  # 183 batches of 32 tiles on the 2048 px slide, each slowed (slow_jobs)
BOOT_SECONDS = 60  # `hepatoquant serve` prints its ports within this (imports torch: ~4 s here)
JOB_SECONDS = 120  # any job here ends well within this
STOP_GRACE_SECONDS = 40  # executor join (30 s) + gRPC grace (10 s): the most a graceful stop may take
FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_INTERRUPTED)
SERVING_LINE = re.compile(r"hepatoquant serving: gRPC port (\d+), HTTP/JSON port (\d+)")


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path) -> Path:
    root = tmp_path_factory.mktemp("fault_slides")
    shutil.copy(synthetic_slide, root / SLIDE)
    return root.resolve()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("fault_models")
    ensure_demo_pack(models, encoder="test_vit_micro")  # "demo" is the tiny test encoder: fast
    return models


@dataclass
class Served:
    """One `hepatoquant serve` subprocess and a channel to it."""

    process: subprocess.Popen
    grpc_port: int
    http_port: int
    channel: grpc.Channel
    stub: pb_grpc.HepatoQuantStub
    log: Path


@pytest.fixture()
def serve(slide_root: Path, models: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: ``serve(state_dir, *extra_args)`` starts `hepatoquant serve` (batches slowed) on free loopback ports
    and waits for its "serving" line. Whatever is still running at teardown is killed (only the processes started
    here)."""
    started: list[Served] = []

    def start(state_dir: Path, *extra: str) -> Served:
        log = tmp_path / f"serve-{len(started)}.log"
        env = dict(os.environ, HEPATOQUANT_MODELS_DIR=str(models), PYTHONUNBUFFERED="1")
        env.pop("HEPATOQUANT_TOKEN", None)
        command = [
            *cli_command(), "--models-dir", str(models), "serve",
            "--slide-root", str(slide_root), "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", "0",
            "--http-host", "127.0.0.1", "--http-port", "0", "--device", "cpu", "--seg-model", "none", *extra,
        ]
        with log.open("wb") as log_file:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env)
        lines: queue.Queue[bytes | None] = queue.Queue()

        def read() -> None:
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + BOOT_SECONDS
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                process.kill()
                pytest.fail(f"`hepatoquant serve` printed no ports within {BOOT_SECONDS} s:\n{log.read_text()}")
            if line is None:
                process.wait(10)
                pytest.fail(f"`hepatoquant serve` exited with {process.returncode} before serving:\n{log.read_text()}")
            if match := SERVING_LINE.search(line.decode()):
                break
        grpc_port, http_port = int(match[1]), int(match[2])
        assert grpc_port > 0 and http_port > 0 and grpc_port != http_port
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        served = Served(process, grpc_port, http_port, channel, pb_grpc.HepatoQuantStub(channel), log)
        started.append(served)
        return served

    yield start
    for served in started:
        served.channel.close()
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(10)


def _config(state_dir: Path, slide_root: Path, models: Path, **overrides) -> ServerConfig:
    settings = {"workers": 1, "max_queued_jobs": 8, "device": "cpu", "batch_size": 32, "reader_workers": 2} | overrides
    return ServerConfig(slide_roots=(slide_root,), state_dir=state_dir, models_dir=models, **settings)


@pytest.fixture()
def start_local(slide_root: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[RunningServer, pb_grpc.HepatoQuantStub]]]:
    """Factory: an in-process server (one job worker unless told otherwise, batches slowed) and a stub for it;
    stopped at teardown."""
    throttle(monkeypatch)
    running: list[tuple[RunningServer, grpc.Channel]] = []

    def start(state_dir: Path | None = None, **overrides) -> tuple[RunningServer, pb_grpc.HepatoQuantStub]:
        config = _config(state_dir or tmp_path / f"state-{len(running)}", slide_root, models, **overrides)
        server = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        options = [("grpc.max_receive_message_length", 64 * 2**20)]
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options)
        running.append((server, channel))
        return server, pb_grpc.HepatoQuantStub(channel)

    yield start
    for server, channel in running:
        channel.close()
        server.stop(grace_seconds=1)


# --- helpers ----------------------------------------------------------------------------------------------


def _wait_final(stub, job_id: str, timeout: float = JOB_SECONDS) -> pb.Job:
    last = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout):
        last = event.job
    assert last is not None and last.state in FINAL, f"job {job_id} did not end: {last}"
    return last


def _watch_until_mid_tiles(stub, job_id: str):
    """Watch the job until it is RUNNING part-way through its tiles; returns the live stream and that event's job.
    Fails if the job ends first (then it is too fast to interrupt: raise slow_jobs.SECONDS_PER_BATCH)."""
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=JOB_SECONDS)
    for event in stream:
        job = event.job
        assert job.state not in FINAL, f"job ended ({pb.JobState.Name(job.state)}) before it could be interrupted"
        if job.state == pb.JOB_STATE_RUNNING and job.progress.stage == "tiles" and 0 < job.progress.done:
            assert job.progress.done < job.progress.total / 2, "the job is too fast to interrupt part-way"
            return stream, job
    pytest.fail(f"the stream of job {job_id} ended without a final state")


def _code(call: Callable, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- a killed or stopped server ---------------------------------------------------------------------------


def test_sigkill_mid_job_keeps_finished_results_and_reports_the_killed_job_interrupted(
    serve, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = serve(state)
    finished = first.stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE), timeout=30)
    assert _wait_final(first.stub, finished.job_id).state == pb.JOB_STATE_SUCCEEDED
    result_before = first.stub.GetResult(pb.GetResultRequest(job_id=finished.job_id), timeout=30)
    assert result_before.qupath_geojson and result_before.report_json

    slow = first.stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    stream, running = _watch_until_mid_tiles(first.stub, slow.job_id)
    first.process.send_signal(signal.SIGKILL)
    assert first.process.wait(10) == -signal.SIGKILL
    stream.cancel()

    second = serve(state)  # same state directory
    result_after = second.stub.GetResult(pb.GetResultRequest(job_id=finished.job_id), timeout=30)
    assert result_after.SerializeToString(deterministic=True) == result_before.SerializeToString(deterministic=True)
    assert second.stub.GetJob(pb.GetJobRequest(job_id=finished.job_id), timeout=10).state == pb.JOB_STATE_SUCCEEDED

    killed = second.stub.GetJob(pb.GetJobRequest(job_id=slow.job_id), timeout=10)
    assert killed.state == pb.JOB_STATE_INTERRUPTED
    assert killed.error_code == "UNAVAILABLE" and "submit the same request again" in killed.error_message
    assert running.progress.done <= killed.progress.done < killed.progress.total
    # A watcher is told at once; the job is not re-run behind anyone's back: it stays as it was.
    events = list(second.stub.WatchJob(pb.WatchJobRequest(job_id=slow.job_id), timeout=10))
    assert [e.job.state for e in events] == [pb.JOB_STATE_INTERRUPTED]
    time.sleep(1.5)
    later = second.stub.GetJob(pb.GetJobRequest(job_id=slow.job_id), timeout=10)
    assert later == killed
    listed = second.stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert sorted(j.job_id for j in listed.jobs) == sorted([finished.job_id, slow.job_id])
    error = _code(second.stub.GetResult, pb.GetResultRequest(job_id=slow.job_id), timeout=10)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "interrupted" in error.details()
    # Submitting the same request again makes a new job that runs (it is not the interrupted one).
    again = second.stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    assert again.job_id != slow.job_id and again.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    second.stub.CancelJob(pb.CancelJobRequest(job_id=again.job_id), timeout=10)
    assert _wait_final(second.stub, again.job_id, timeout=30).state == pb.JOB_STATE_CANCELLED


def test_sigterm_mid_job_exits_cleanly_and_the_job_ends_interrupted(
    serve, start_local, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    served = serve(state)
    slow = served.stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    stream, _ = _watch_until_mid_tiles(served.stub, slow.job_id)
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    try:
        returncode = served.process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIGTERM: still running after {STOP_GRACE_SECONDS} s:\n{served.log.read_text()}")
    stopped_in = time.monotonic() - started
    assert returncode == 0, served.log.read_text()
    assert stopped_in < 15, f"stopping took {stopped_in:.1f} s; a running job should stop at its next batch"
    # The client watching the job was told how it ended before the server went.
    assert [e.job.state for e in stream][-1:] == [pb.JOB_STATE_INTERRUPTED]

    # The database is whole and says the stop itself settled the job (not a later recovery).
    connection = sqlite3.connect(f"file:{state / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        state_name, code, message = connection.execute(
            "SELECT state, error_code, error_message FROM jobs WHERE job_id = ?", (slow.job_id,)
        ).fetchone()
    finally:
        connection.close()
    assert (state_name, code) == ("interrupted", "UNAVAILABLE")
    assert "shut down while this job was running" in message

    _, stub = start_local(state)  # a new server opens the same state directory
    job = stub.GetJob(pb.GetJobRequest(job_id=slow.job_id), timeout=10)
    assert job.state == pb.JOB_STATE_INTERRUPTED and "submit the same request again" in job.error_message
    assert [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs] == [slow.job_id]


# --- cancelling ---------------------------------------------------------------------------------------------


def test_cancel_a_running_job_stops_it_between_batches(start_local) -> None:
    _, stub = start_local()
    slow = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    stream, running = _watch_until_mid_tiles(stub, slow.job_id)
    started = time.monotonic()
    reply = stub.CancelJob(pb.CancelJobRequest(job_id=slow.job_id), timeout=10)
    assert reply.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLED)
    final = [e.job for e in stream][-1]
    stopped_in = time.monotonic() - started
    assert final.state == pb.JOB_STATE_CANCELLED and final.error_code == "CANCELLED"
    assert "cancelled at a client's request" in final.error_message
    assert stopped_in < 3, f"the job took {stopped_in:.1f} s to stop after CancelJob"
    assert final.progress.done < final.progress.total / 2  # stopped well before it would have finished
    error = _code(stub.GetResult, pb.GetResultRequest(job_id=slow.job_id), timeout=10)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in error.details()
    time.sleep(0.5)
    assert stub.GetJob(pb.GetJobRequest(job_id=slow.job_id), timeout=10) == final  # and it stays stopped


def test_cancel_a_queued_job_at_once_and_a_finished_job_not_at_all(start_local) -> None:
    _, stub = start_local()
    done = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, omit_tiles=True), timeout=30)
    finished = _wait_final(stub, done.job_id)
    assert finished.state == pb.JOB_STATE_SUCCEEDED
    result = stub.GetResult(pb.GetResultRequest(job_id=done.job_id), timeout=10)

    # One worker: the first slow job runs, the others wait in the queue (distinct requests: no reuse).
    jobs = [
        stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, min_tissue_fraction=0.5 + i / 100, **SLOW), timeout=30)
        for i in range(3)
    ]
    assert len({j.job_id for j in jobs}) == 3
    stream, _ = _watch_until_mid_tiles(stub, jobs[0].job_id)
    waiting = stub.GetJob(pb.GetJobRequest(job_id=jobs[1].job_id), timeout=10)
    assert waiting.state == pb.JOB_STATE_QUEUED
    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=jobs[1].job_id), timeout=10)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.error_code == "CANCELLED"  # in the reply itself
    assert not cancelled.progress.stage  # it never ran
    assert stub.GetJob(pb.GetJobRequest(job_id=jobs[0].job_id), timeout=10).state == pb.JOB_STATE_RUNNING
    assert stub.GetJob(pb.GetJobRequest(job_id=jobs[2].job_id), timeout=10).state == pb.JOB_STATE_QUEUED

    # A finished job is left exactly as it was, result included; so is a cancelled one cancelled again.
    assert stub.CancelJob(pb.CancelJobRequest(job_id=done.job_id), timeout=10) == finished
    assert stub.GetJob(pb.GetJobRequest(job_id=done.job_id), timeout=10) == finished
    assert stub.GetResult(pb.GetResultRequest(job_id=done.job_id), timeout=10) == result
    assert stub.CancelJob(pb.CancelJobRequest(job_id=jobs[1].job_id), timeout=10) == cancelled

    for job in (jobs[2], jobs[0]):  # clean up: the queued one first, so it never starts
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
    assert [e.job.state for e in stream][-1] == pb.JOB_STATE_CANCELLED
    final = _wait_final(stub, jobs[2].job_id, timeout=10)
    assert final.state == pb.JOB_STATE_CANCELLED and not final.progress.stage
    assert _wait_final(stub, jobs[1].job_id, timeout=10) == cancelled  # the worker never picked it up


# --- limits ---------------------------------------------------------------------------------------------


def test_a_full_queue_answers_resource_exhausted_and_keeps_serving(serve, tmp_path: Path) -> None:
    served = serve(tmp_path / "state", "--max-queued", "1", "--workers", "1")
    stub = served.stub
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).max_queued_jobs == 1
    running = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    stream, _ = _watch_until_mid_tiles(stub, running.job_id)  # the worker took it: the queue is empty
    queued = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, min_tissue_fraction=0.6, **SLOW), timeout=30)
    assert queued.state == pb.JOB_STATE_QUEUED
    for fraction in (0.7, 0.8):  # distinct requests, so neither is answered by an existing job
        error = _code(stub.SubmitAnalysis, pb.AnalysisRequest(slide=SLIDE, min_tissue_fraction=fraction), timeout=30)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue of 1 jobs is full" in error.details() and "try again later" in error.details()
    # Still serving: info, the running and the queued job are untouched.
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version
    assert stub.GetJob(pb.GetJobRequest(job_id=running.job_id), timeout=10).state == pb.JOB_STATE_RUNNING
    assert stub.GetJob(pb.GetJobRequest(job_id=queued.job_id), timeout=10).state == pb.JOB_STATE_QUEUED
    listed = stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs  # refusals are not jobs (issue 19: they were
    assert [j.job_id for j in listed] == [queued.job_id, running.job_id]  # stored as FAILED jobs)

    # Once there is room again, the refused request is taken and runs to the end.
    stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id), timeout=10)
    stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=10)
    assert [e.job.state for e in stream][-1] == pb.JOB_STATE_CANCELLED
    retried = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, min_tissue_fraction=0.7), timeout=30)
    assert _wait_final(stub, retried.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert stub.GetResult(pb.GetResultRequest(job_id=retried.job_id), timeout=10).region_classes


def test_a_message_over_the_size_limit_is_refused_and_the_server_keeps_serving(start_local) -> None:
    limit = 128 * 1024
    _, stub = start_local(max_message_bytes=limit)
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).max_message_bytes == limit
    tile = bytes(range(256)) * 12  # one raw 32 x 32 RGB tile
    too_big = pb.TileBatch(images=[tile] * 64, raw_width_px=32, raw_height_px=32)  # 196 KiB
    assert too_big.ByteSize() > limit
    error = _code(lambda: list(stub.ClassifyTiles(iter([too_big]), timeout=30)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is fine: info, and a batch within the limit on a new stream.
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version
    small = pb.TileBatch(images=[tile] * 8, raw_width_px=32, raw_height_px=32)
    [reply] = list(stub.ClassifyTiles(iter([small]), timeout=30))
    assert len(reply.predictions) == 8
    # A job whose request is over the limit (regions text) is refused the same way, and nothing is queued.
    huge = pb.AnalysisRequest(slide=SLIDE, regions_geojson=" " * (limit + 1))
    assert _code(stub.SubmitAnalysis, huge, timeout=10).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs


def test_a_watch_past_its_deadline_ends_for_the_client_only(start_local) -> None:
    _, stub = start_local()
    job = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    started = time.monotonic()
    events = []
    error = _code(lambda: events.extend(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=0.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert events and all(e.job.state not in FINAL for e in events)  # it had not ended when the client gave up
    assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10).state in (
        pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING,
    )
    final = _wait_final(stub, job.job_id)  # the job went on without the watcher, to the end
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.progress.stage == "outputs"
    assert stub.GetResult(pb.GetResultRequest(job_id=job.job_id), timeout=10).region_classes


def test_retention_keeps_only_the_newest_results(start_local, tmp_path: Path) -> None:
    state = tmp_path / "retained"
    _, stub = start_local(state, max_results=1)
    first_request = pb.AnalysisRequest(slide=SLIDE, omit_tiles=True)
    first = stub.SubmitAnalysis(first_request, timeout=30)
    assert _wait_final(stub, first.job_id).state == pb.JOB_STATE_SUCCEEDED
    first_result = stub.GetResult(pb.GetResultRequest(job_id=first.job_id), timeout=10)
    second = stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, omit_tiles=True, min_tissue_fraction=0.6), timeout=30)
    assert _wait_final(stub, second.job_id).state == pb.JOB_STATE_SUCCEEDED

    error = _code(stub.GetResult, pb.GetResultRequest(job_id=first.job_id), timeout=10)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "removed by the retention limit" in error.details()
    assert not (state / "results" / first.job_id).exists()
    assert stub.GetResult(pb.GetResultRequest(job_id=second.job_id), timeout=10).region_classes
    assert stub.GetJob(pb.GetJobRequest(job_id=first.job_id), timeout=10).state == pb.JOB_STATE_SUCCEEDED

    # The same request again is computed afresh (its old result is gone), and then the second result goes.
    again = stub.SubmitAnalysis(first_request, timeout=30)
    assert again.job_id != first.job_id and not again.reused_result
    assert _wait_final(stub, again.job_id).state == pb.JOB_STATE_SUCCEEDED
    again_result = stub.GetResult(pb.GetResultRequest(job_id=again.job_id), timeout=10)
    assert again_result.region_classes == first_result.region_classes
    error = _code(stub.GetResult, pb.GetResultRequest(job_id=second.job_id), timeout=10)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "retention" in error.details()
    assert sorted(p.name for p in (state / "results").iterdir()) == [again.job_id]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_watching_client_rides_out_a_kill_and_a_slow_restart(serve, tmp_path: Path) -> None:
    """Issue 19: the client gave up after ~15.5 s (5 retries) while a killed server took ~20 s to come back. Now it
    keeps reconnecting (3 minutes by default) and ends with the job's real end: interrupted by the kill."""
    from hepatoquant_client import Client

    grpc_port, http_port = _free_port(), _free_port()
    ports = ("--port", str(grpc_port), "--http-port", str(http_port))
    state = tmp_path / "state"
    first = serve(state, *ports)
    job = first.stub.SubmitAnalysis(pb.AnalysisRequest(slide=SLIDE, **SLOW), timeout=30)
    stream, _ = _watch_until_mid_tiles(first.stub, job.job_id)
    stream.cancel()
    seen = threading.Event()
    ended: dict = {}
    with Client(f"127.0.0.1:{grpc_port}", reconnect_backoff_s=0.2) as client:
        def watch() -> None:
            try:
                ended["job"] = client.watch(job.job_id, on_progress=lambda _: seen.set())
            except Exception as error:  # noqa: BLE001 - the assertion below shows it
                ended["error"] = error

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert seen.wait(30)
        first.process.kill()
        first.process.wait(10)
        time.sleep(20)  # longer than the old client's whole retry budget
        assert watcher.is_alive(), ended  # still waiting for the server, not given up
        serve(state, *ports)
        watcher.join(60)
    assert "error" not in ended, ended.get("error")
    assert ended["job"].state == "interrupted" and ended["job"].error_code == "UNAVAILABLE"
