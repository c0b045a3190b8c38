"""Issue 19: what one client (or one bad moment) could do to a server a whole lab shares, as tests against a real
server on loopback. Each test is a row of the issue's table; it failed on the server before the fix."""

from __future__ import annotations

import errno
import io
import json
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hepatoquant_client.proto import pb, pb_grpc
from PIL import Image
from rss_sampler import RssSampler
from slow_jobs import throttle

from hepatoquant.errors import InvalidParameterError
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

TOKEN = "lab-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=base / "state", models_dir=models, token=TOKEN,
                          max_queued_jobs=16)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    yield {"running": running, "root": root.resolve(), "stub": pb_grpc.HepatoQuantStub(channel), "models": models}
    channel.close()
    running.stop(grace_seconds=1)


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, metadata=AUTH, timeout=30)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return caught.value


def _http(server, method: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server['running'].http_port}/v1/{method}", data=body,
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    ("slide", "fragment"),
    [
        ("synthetic.tiff\x00.png", "control character"),
        ("slides/\nsynthetic.tiff", "control character"),
        ("a" * 300 + ".svs", "longer than 255 bytes"),
        ("a/" * 2100 + "s.svs", "longer than 4096 characters"),
        ("file:///x/synthetic%00.tiff", "control character"),
    ],
)
def test_a_slide_path_no_file_can_have_is_invalid_argument_without_server_paths(server, slide: str, fragment: str) -> None:
    """Was: UNKNOWN 'Exception calling application' over gRPC and no reply over HTTP."""
    error = _error(server["stub"].SubmitAnalysis, pb.AnalysisRequest(slide=slide))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details()
    assert str(server["root"]) not in error.details() and len(error.details()) < 400
    status, body = _http(server, "SubmitAnalysis", json.dumps({"slide": slide}).encode())
    assert status == 400 and body["code"] == "INVALID_ARGUMENT" and fragment in body["message"]


@pytest.mark.parametrize("model", ["/root", "/etc/ssl", "/no/such/folder", "../models/demo", ".", "nope"])
def test_model_takes_pack_names_only_and_answers_every_other_name_alike(server, model: str) -> None:
    """Was: existing and missing server folders answered differently, naming the models folder."""
    error = _error(server["stub"].SubmitAnalysis, pb.AnalysisRequest(slide="synthetic.tiff", model=model))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith(f"no model pack {model!r} on this server (its packs: demo)")
    assert str(server["models"]) not in error.details()
    segmenter = _error(server["stub"].SubmitAnalysis, pb.AnalysisRequest(slide="synthetic.tiff", segmenter_model=model))
    assert segmenter.code() == grpc.StatusCode.NOT_FOUND and str(server["models"]) not in segmenter.details()


@pytest.mark.parametrize("job_id", ["x" * 100_000, "not-an-id", "0" * 31 + "\x00"])
def test_what_cannot_be_a_job_id_is_invalid_argument_in_a_short_message(server, job_id: str) -> None:
    """Was: a 100 kB job id answered RESOURCE_EXHAUSTED, because the NOT_FOUND message repeated it whole."""
    for call, request in ((server["stub"].GetJob, pb.GetJobRequest(job_id=job_id)),
                          (server["stub"].GetResult, pb.GetResultRequest(job_id=job_id)),
                          (server["stub"].CancelJob, pb.CancelJobRequest(job_id=job_id)),
                          (server["stub"].WatchJob, pb.WatchJobRequest(job_id=job_id))):
        error = _error(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 200


def test_one_slide_named_three_ways_is_one_job(server) -> None:
    """Was: a relative path, the absolute path and a file: URI ran three jobs."""
    absolute = server["root"] / "synthetic.tiff"
    stub = server["stub"]
    names = ["synthetic.tiff", str(absolute), absolute.as_uri()]
    jobs = [stub.SubmitAnalysis(pb.AnalysisRequest(slide=name, omit_tiles=True, min_tissue_fraction=0.55),
                                metadata=AUTH, timeout=30) for name in names]
    assert len({job.job_id for job in jobs}) == 1


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (230, 180, 200)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_a_huge_image_in_a_small_file_is_refused_before_it_is_decoded(server, monkeypatch) -> None:
    """Was: a 441 kB PNG of 12,000 x 12,000 px cost the server +930 MiB, decoded before any size check."""
    import cv2

    decoded: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flags: (decoded.append(len(data)), real_imdecode(data, flags))[1])
    bomb = _png(12_000, 12_000)
    assert len(bomb) < 1_000_000
    with RssSampler() as rss:
        error = _error(server["stub"].ClassifyTiles, iter([pb.TileBatch(images=[bomb] * 3)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "12000 x 12000 px" in error.details()
    assert decoded == []  # refused from the header: never decoded
    assert rss.growth_mib < 100, rss.growth_mib  # decoding one would take 12,000^2 x 3 bytes = 412 MiB


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        (pb.TileBatch(images=[b""]), "is empty"),
        (pb.TileBatch(images=[b"GIF89a" + bytes(64)]), "not a PNG or JPEG"),
        (pb.TileBatch(images=[_png(224, 224)[:60]]), "damaged"),
        (pb.TileBatch(images=[bytes(3 * 5000 * 5000)[:3]], raw_width_px=5000, raw_height_px=5000), "raw RGB"),
    ],
)
def test_empty_or_damaged_tiles_are_invalid_argument(server, batch: pb.TileBatch, fragment: str) -> None:
    """Was: empty tile bytes answered UNKNOWN."""
    error = _error(server["stub"].ClassifyTiles, iter([batch]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details()


def test_tiles_of_normal_size_are_still_classified(server) -> None:
    tile = np.asarray(Image.new("RGB", (224, 224), (200, 120, 180)))
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG")
    [reply] = server["stub"].ClassifyTiles(iter([pb.TileBatch(images=[_png(224, 224), buffer.getvalue()])]),
                                           metadata=AUTH, timeout=60)
    assert len(reply.predictions) == 2


@pytest.mark.parametrize("token", ["", "   ", "two words", "tab\there"])
def test_a_token_that_would_switch_authentication_off_is_refused_at_start(tmp_path: Path, token: str) -> None:
    """Was: an empty token file turned gRPC authentication off while HTTP demanded `Bearer ` with nothing."""
    with pytest.raises(InvalidParameterError, match="token"):
        ServerConfig(slide_roots=(tmp_path,), state_dir=tmp_path / "state", token=token)


@pytest.mark.parametrize("content", ["", "\n", "  \n"])
def test_serve_refuses_an_empty_token_file_naming_it(tmp_path: Path, content: str, capsys) -> None:
    from hepatoquant.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(content)
    state = tmp_path / "state"
    code = main(["serve", "--slide-root", str(tmp_path), "--state-dir", str(state), "--token-file", str(token_file),
                 "--port", "0", "--http-port", "0"])
    assert code != 0 and not (state / "jobs.sqlite3").exists()
    error = capsys.readouterr().err
    assert str(token_file) in error and "is empty" in error


# --- the state disk and the job store ---------------------------------------------------------------------


class _FailingConnection:
    """The job store's SQLite connection, failing the statements named in ``fail`` the way SQLite fails them on a
    full disk ("database or disk is full"); everything else goes to the real connection."""

    def __init__(self, real) -> None:
        self.real = real
        self.fail: set[str] = set()

    def execute(self, sql: str, *args):
        if sql.lstrip().split(None, 1)[0].upper() in self.fail:
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@pytest.fixture()
def own_server(tmp_path: Path, synthetic_slide: Path, monkeypatch: pytest.MonkeyPatch):
    """A server of its own (its store is tampered with), with a failing-capable job store connection and slowed
    batches (slow_jobs: a job is still running when a test breaks the store)."""
    throttle(monkeypatch)
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    models = tmp_path / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=tmp_path / "state", models_dir=models, token=TOKEN)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    connection = _FailingConnection(running.engine.store._conn)
    running.engine.store._conn = connection
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    yield {"running": running, "stub": pb_grpc.HepatoQuantStub(channel), "db": connection, "state": tmp_path / "state"}
    connection.fail.clear()
    channel.close()
    running.stop(grace_seconds=1)


def _health(server) -> tuple[str, str]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server['running'].grpc_port}")
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    finally:
        channel.close()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server['running'].http_port}/healthz", timeout=5) as response:
            http = json.loads(response.read())["status"]
    except urllib.error.HTTPError as error:
        http = json.loads(error.read())["status"]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), http


def _until(condition, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {seconds} s: {condition}")


def test_a_full_disk_on_submit_is_resource_exhausted_naming_no_server_path(own_server) -> None:
    """Was: UNKNOWN "database or disk is full" while health stayed SERVING."""
    own_server["db"].fail.add("INSERT")
    error = _error(own_server["stub"].SubmitAnalysis, pb.AnalysisRequest(slide="synthetic.tiff"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in error.details()
    assert str(own_server["state"]) not in error.details()
    status, body = _http(own_server, "SubmitAnalysis", b'{"slide": "synthetic.tiff"}')
    assert status == 429 and body["code"] == "RESOURCE_EXHAUSTED"
    own_server["db"].fail.clear()
    job = own_server["stub"].SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff", omit_tiles=True),
                                            metadata=AUTH, timeout=30)
    assert job.state == pb.JOB_STATE_QUEUED


def test_a_job_whose_end_cannot_be_written_is_retried_then_ends_failed_and_health_says_so(own_server) -> None:
    """Was: the job failed inside but stayed RUNNING forever, and identical requests were handed the stuck job."""
    stub, db = own_server["stub"], own_server["db"]
    request = pb.AnalysisRequest(slide="synthetic.tiff", tile_size_px=16, omit_tiles=True)
    job = stub.SubmitAnalysis(request, metadata=AUTH, timeout=30)
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=AUTH, timeout=60):
        if event.job.state == pb.JOB_STATE_RUNNING and event.job.progress.done > 0:
            break
    db.fail.add("UPDATE")  # the disk fills: progress, and then the job's end, cannot be written
    assert _until(lambda: _health(own_server) == ("NOT_SERVING", "NOT_SERVING"))
    assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=AUTH).state == pb.JOB_STATE_RUNNING
    again = stub.SubmitAnalysis(request, metadata=AUTH, timeout=30)
    assert again.job_id != job.job_id  # not the job whose end is unrecorded
    db.fail.clear()  # space is freed: the end is recorded on the next try
    ended = _until(lambda: (j := stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=AUTH)).state
                   != pb.JOB_STATE_RUNNING and j)
    assert ended.state == pb.JOB_STATE_FAILED and ended.error_code == "RESOURCE_EXHAUSTED"
    assert "disk is full" in ended.error_message and str(own_server["state"]) not in ended.error_message
    assert _until(lambda: _health(own_server) == ("SERVING", "SERVING"))


def test_results_that_cannot_be_written_fail_the_job_naming_no_server_path(own_server, monkeypatch) -> None:
    """Was: INTERNAL with a message holding the state folder's path."""
    from hepatoquant.service import engine

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(own_server["state"] / "results" / "x"))

    monkeypatch.setattr(engine, "write_outputs", full_disk)
    job = own_server["stub"].SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff", omit_tiles=True,
                                                               min_tissue_fraction=0.66), metadata=AUTH, timeout=30)
    final = list(own_server["stub"].WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=AUTH, timeout=60))[-1].job
    assert final.state == pb.JOB_STATE_FAILED and final.error_code == "RESOURCE_EXHAUSTED"
    assert "disk is full" in final.error_message and str(own_server["state"]) not in final.error_message
    assert not [p for p in (own_server["state"] / "results").iterdir()]  # nothing half-written left


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 16 MiB file system (tmpfs) to fill: needs the right to mount (root here and in CI's container)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): run as root to fill a real disk")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 2**16)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_real_full_state_disk_ends_jobs_recorded_with_clear_codes_and_the_server_recovers(
        small_disk: Path, tmp_path: Path, synthetic_slide: Path, monkeypatch) -> None:
    """The rows above on a real full file system instead of injected SQLite errors: the state folder on a 16 MiB
    tmpfs that is filled while the server runs. Whatever fails first (the job store or the outputs), no job stays
    RUNNING, every code says the disk is full without a server path, and freeing space is enough to go on."""
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    ensure_demo_pack(tmp_path / "models", encoder="test_vit_micro")
    state = small_disk / "state"
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=state, models_dir=tmp_path / "models",
                          token=TOKEN, min_free_bytes=0)  # SQLite and the outputs meet the full disk themselves
    from hepatoquant.service import engine as engine_module

    release = threading.Event()
    real = engine_module.analyze_slide
    monkeypatch.setattr(engine_module, "analyze_slide", lambda *a, **k: (release.wait(120), real(*a, **k))[1])
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    stub = pb_grpc.HepatoQuantStub(channel)
    server = {"running": running}

    def run(fraction: float):
        job = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff", omit_tiles=True,
                                                     min_tissue_fraction=fraction), metadata=AUTH, timeout=30)
        return _until(lambda: (j := stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=AUTH)).state
                      not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and j, seconds=60)

    try:
        release.set()
        assert run(0.5).state == pb.JOB_STATE_SUCCEEDED
        release.clear()  # the next job runs, held before its analysis, while the disk fills
        held = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff", omit_tiles=True,
                                                      min_tissue_fraction=0.52), metadata=AUTH, timeout=30)
        _until(lambda: stub.GetJob(pb.GetJobRequest(job_id=held.job_id), metadata=AUTH).state == pb.JOB_STATE_RUNNING)
        filler = _fill(small_disk)

        def settle(job_id: str) -> str:
            """Until the job ends, or runs with an end that cannot be written (health says so: retried below)."""
            deadline = time.monotonic() + 60
            while (current := stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=AUTH)).state in (
                    pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and time.monotonic() < deadline:
                if current.state == pb.JOB_STATE_RUNNING and _health(server) == ("NOT_SERVING", "NOT_SERVING"):
                    return "RUNNING, NOT_SERVING"
                time.sleep(0.1)
            return pb.JobState.Name(current.state)

        release.set()
        outcomes = {held.job_id: settle(held.job_id)}
        assert outcomes[held.job_id] in ("RUNNING, NOT_SERVING", "JOB_STATE_FAILED")  # its outputs met the full disk
        for fraction in (0.55, 0.6):  # new requests while the disk is full
            try:
                job = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff", omit_tiles=True,
                                                             min_tissue_fraction=fraction), metadata=AUTH, timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in error.details()
                assert str(small_disk) not in error.details()
                outcomes[fraction] = "refused"
                continue
            outcomes[job.job_id] = settle(job.job_id)
        filler.unlink()  # space is freed
        for job_id in (key for key, outcome in outcomes.items() if outcome != "refused"):
            ended = _until(lambda: (j := stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=AUTH)).state
                           not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and j, seconds=60)
            assert ended.state == pb.JOB_STATE_FAILED and ended.error_code == "RESOURCE_EXHAUSTED", ended
            assert "disk is full" in ended.error_message and str(small_disk) not in ended.error_message
        assert _until(lambda: _health(server) == ("SERVING", "SERVING"))
        assert run(0.7).state == pb.JOB_STATE_SUCCEEDED
        print("outcomes on the full disk:", outcomes)
    finally:
        channel.close()
        running.stop(grace_seconds=1)


def _store_with_one_result(state: Path) -> tuple[str, str]:
    from hepatoquant.service.jobs import JobState, JobStore, write_job_file

    store = JobStore(state)
    record = store.create('{"slide": "s.svs"}', "key-1")
    folder = state / "results" / record.job_id
    folder.mkdir(parents=True)
    (folder / "s.report.json").write_text("{}")
    write_job_file(folder, record)
    store.set_state(record.job_id, JobState.SUCCEEDED, result_dir=str(folder))
    store.close()
    return record.job_id, record.request_json


@pytest.mark.parametrize("damage", ["truncated", "garbage", "emptied"])
def test_a_damaged_job_database_is_refused_at_start_and_can_be_rebuilt(tmp_path: Path, damage: str, capsys) -> None:
    """Was: a raw sqlite3.DatabaseError traceback at start; a 0-byte file silently accepted (history lost)."""
    from hepatoquant.cli import main
    from hepatoquant.errors import JobStoreDamagedError
    from hepatoquant.service.jobs import JobState, JobStore

    state = tmp_path / "state"
    job_id, request_json = _store_with_one_result(state)
    database = state / "jobs.sqlite3"
    for leftover in state.glob("jobs.sqlite3-*"):
        leftover.unlink()
    data = database.read_bytes()
    database.write_bytes({"truncated": data[: len(data) // 3], "garbage": b"\x13" * len(data), "emptied": b""}[damage])
    with pytest.raises(JobStoreDamagedError, match="--rebuild-job-store"):
        JobStore(state)
    code = main(["serve", "--slide-root", str(tmp_path), "--state-dir", str(state), "--port", "0", "--http-port", "0"])
    error = capsys.readouterr().err
    assert code != 0 and "is damaged" in error and "--rebuild-job-store" in error and "Traceback" not in error
    store, recovered = JobStore.rebuild(state)
    record = store.get(job_id)
    assert recovered == 1 and record.state is JobState.SUCCEEDED and record.request_json == request_json
    assert store.find_reusable("key-1") == record  # an identical request reuses it again
    assert list(state.glob("jobs.sqlite3.damaged-*"))  # the old file is kept
    store.close()


def test_health_says_not_serving_when_the_request_threads_are_all_busy(tmp_path: Path, synthetic_slide: Path,
                                                                        monkeypatch) -> None:
    """A server that cannot take a call is NOT_SERVING on both ports (the check itself runs on those threads)."""
    import threading

    from hepatoquant.service import server as server_module

    monkeypatch.setattr(server_module, "_POOL_ANSWER_SECONDS", 0.5)
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    ensure_demo_pack(tmp_path / "models", encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=tmp_path / "state", models_dir=tmp_path / "models",
                          rpc_threads=2)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    release = threading.Event()
    real_info = running.engine.info
    monkeypatch.setattr(running.engine, "info", lambda: (release.wait(60), real_info())[1])
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    stuck = [pb_grpc.HepatoQuantStub(channel).GetServerInfo.future(pb.GetServerInfoRequest(), timeout=60)
             for _ in range(2)]
    server = {"running": running}
    try:
        assert _until(lambda: _health(server) == ("NOT_SERVING", "NOT_SERVING"), 10)
        release.set()
        assert all(call.result().version for call in stuck)
        assert _until(lambda: _health(server) == ("SERVING", "SERVING"), 10)
    finally:
        release.set()
        channel.close()
        running.stop(grace_seconds=1)
