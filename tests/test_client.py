"""The Python client and `hepatoquant-client` against a real server over loopback (tiny demo pack, generated slide)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

import pytest
from hepatoquant_client import (
    AnalysisOutcome,
    Client,
    HepatoQuantClientError,
    InvalidArgumentError,
    JobProgress,
    NotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from hepatoquant_client.cli import main
from hepatoquant_client.proto import pb
from slow_jobs import throttle

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

TOKEN = "client-s3cret"
CODES = ["TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE"]
OUTPUT_NAMES = ["synthetic.csv", "synthetic.geojson", "synthetic.overlay.png", "synthetic.region-mask.tif",
                "synthetic.report.json", "synthetic.tissue-map.tif"]
SLOW = {"tile_size_px": 16, "omit_tiles": True}  # 183 batches on the 2048 px slide, each slowed: time to act mid-job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path):
    base = tmp_path_factory.mktemp("client_server")
    root = base / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")  # "demo" here is the tiny test encoder: fast
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=base / "state", models_dir=models, token=TOKEN,
                          max_queued_jobs=64)
    with pytest.MonkeyPatch.context() as patch:
        throttle(patch)  # batches slowed (slow_jobs): jobs last long enough to act on mid-way on any machine
        running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        yield {"target": f"127.0.0.1:{running.grpc_port}", "root": root.resolve(), "token_file": token_file}
        running.stop(grace_seconds=1)


@pytest.fixture()
def client(server):
    with Client(server["target"], token=TOKEN, reconnect_backoff_s=0.01) as c:
        yield c


@pytest.fixture(scope="module")
def first_analysis(server) -> tuple[AnalysisOutcome, list[JobProgress]]:
    events: list[JobProgress] = []
    with Client(server["target"], token=TOKEN) as c:
        return c.analyze("synthetic.tiff", on_progress=events.append), events


class _FakeRpcError(grpc.RpcError, grpc.Call):
    """What a broken stream raises: an RpcError that is also a Call with a status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


# --- analysis ---------------------------------------------------------------------------------------------


def test_analyze_end_to_end_reports_progress_and_writes_outputs(first_analysis, tmp_path: Path) -> None:
    outcome, events = first_analysis
    assert events and {e.job_id for e in events} == {outcome.job_id}
    assert events[-1].state == "succeeded" and events[-1].finished
    assert any(e.stage == "tiles" and e.total > 0 for e in events)
    assert outcome.model_status == "untrained-demo" and outcome.slide_stem == "synthetic"
    [whole] = outcome.region_classes
    assert whole.region_class == "tissue" and whole.tile_count > 30
    assert [c.code for c in whole.classes] == CODES
    assert sum(c.tiles for c in whole.classes) == whole.tile_count
    assert sum(c.percent for c in whole.classes) == pytest.approx(100.0, abs=0.01)
    records = whole.records()
    assert len(records) == 7 and records[0]["region_class"] == "tissue" and records[0]["code"] == "TUM"
    row = whole.as_dict()
    assert row["tile_count"] == whole.tile_count and row["STE_percent"] == whole.percent("STE")
    assert all(isinstance(v, float) for v in outcome.headline_indicators.values())
    assert outcome.report["tiles"]["count"] == whole.tile_count

    out = tmp_path / "nested" / "out"
    written = outcome.write(out)
    assert sorted(p.name for p in written) == OUTPUT_NAMES == sorted(p.name for p in out.iterdir())  # no temp files
    assert (out / "synthetic.geojson").read_bytes() == outcome.qupath_geojson
    assert json.loads((out / "synthetic.report.json").read_text())["tiles"]["count"] == whole.tile_count
    assert len((out / "synthetic.csv").read_text().strip().splitlines()) == 2
    assert (out / "synthetic.overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the rasters (issue 21) as the server wrote them: one pixel per tile position holding its class, with um/px
    import tifffile

    with tifffile.TiffFile(out / "synthetic.tissue-map.tif") as tiff:
        tile_map = tiff.pages[0].asarray()
        x_resolution = tiff.pages[0].tags["XResolution"].value
    assert (tile_map > 0).sum() == whole.tile_count and tile_map.max() <= len(CODES)
    assert x_resolution[0] / x_resolution[1] > 0  # pixels per centimetre, from the tile pitch
    with tifffile.TiffFile(out / "synthetic.region-mask.tif") as tiff:
        assert tiff.pages[0].asarray().any()
    objects = outcome.qupath_objects()
    assert sum(o.object_type == "detection" for o in objects) == whole.tile_count
    assert sum(o.object_type == "annotation" for o in objects) >= 1

    # A stem with a folder part never leaves the output folder; writing again replaces the files.
    escaped = dataclasses.replace(outcome, slide_stem="../evil")
    assert [p.parent for p in escaped.write(out)] == [out] * 6 and (out / "evil.geojson").is_file()
    # a result from a server that sends no rasters writes the other four
    older = dataclasses.replace(outcome, slide_stem="older", tissue_map_tiff=b"", region_mask_tiff=b"")
    assert [p.name for p in older.write(out)] == ["older.geojson", "older.report.json", "older.csv", "older.overlay.png"]
    assert not (out.parent / "evil.geojson").exists()


def test_identical_request_reuses_the_result(client, first_analysis) -> None:
    outcome, _ = first_analysis
    again_id = client.submit("synthetic.tiff")
    assert again_id != outcome.job_id
    again = client.job(again_id)
    assert again.reused_result and again.state == "succeeded"
    assert client.result(again_id).qupath_geojson == outcome.qupath_geojson
    listed = {j.job_id for j in client.jobs(limit=10)}
    assert {outcome.job_id, again_id} <= listed


def test_analyze_raises_the_job_error_when_the_job_is_cancelled(client) -> None:
    cancelled: list[JobProgress] = []

    def cancel_at_once(progress: JobProgress) -> None:
        if not cancelled:
            cancelled.append(client.cancel(progress.job_id))

    with pytest.raises(HepatoQuantClientError) as info:
        client.analyze("synthetic.tiff", on_progress=cancel_at_once, min_tissue_fraction=0.61, **SLOW)
    assert info.value.code == "CANCELLED" and "cancelled" in info.value.message
    assert cancelled and client.job(cancelled[0].job_id).state == "cancelled"


# --- errors -----------------------------------------------------------------------------------------------


def test_errors_carry_the_status_code_and_the_servers_message(server, client, tmp_path: Path) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        client.submit("/etc/passwd")
    assert info.value.code == "PERMISSION_DENIED" and "outside the server's slide roots" in info.value.message
    assert isinstance(info.value, PermissionError) and not isinstance(info.value, grpc.RpcError)

    with pytest.raises(NotFoundError) as info:
        client.submit("synthetic.tiff", model="nope")
    assert info.value.code == "NOT_FOUND" and "no model pack 'nope'" in str(info.value)

    with pytest.raises(InvalidArgumentError) as info:
        client.submit("synthetic.tiff", tile_size_px=5)
    assert info.value.code == "INVALID_ARGUMENT" and "tile size 5 px" in info.value.message

    with pytest.raises(HepatoQuantClientError) as info:
        client.result("0" * 32)
    assert info.value.code == "NOT_FOUND" and "0" * 32 in info.value.message

    for token in ("wrong", None):
        with Client(server["target"], token=token) as other, pytest.raises(UnauthenticatedError) as info:
            other.info()
        assert info.value.code == "UNAUTHENTICATED" and info.value.message

    with pytest.raises(TypeError, match="'colour'"):
        client.submit("synthetic.tiff", colour="red")

    with pytest.raises(NotFoundError, match="absent.geojson"):
        client.submit("synthetic.tiff", regions_geojson=str(tmp_path / "absent.geojson"))

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with Client(f"127.0.0.1:{closed_port}", timeout_s=5) as nowhere, pytest.raises(ServerUnavailableError) as info:
        nowhere.info()
    assert info.value.code == "UNAVAILABLE"


def test_regions_path_is_read_and_sent_as_text(client, tmp_path: Path, synthetic_regions_geojson: str) -> None:
    path = tmp_path / "regions.geojson"
    path.write_text(synthetic_regions_geojson)
    request = client.analysis_request("synthetic.tiff", regions_geojson=path, tumour_class_names="Tumor")
    assert request.regions_geojson == path.read_text() and list(request.tumour_class_names) == ["Tumor"]
    assert client.analysis_request("s", regions_geojson=str(path)).regions_geojson == path.read_text()
    text = '{"type": "FeatureCollection", "features": []}'
    assert client.analysis_request("s", regions_geojson=text).regions_geojson == text


def test_server_info(client, server) -> None:
    info = client.info()
    assert [c.code for c in info.tissue_classes] == CODES
    assert any(m.name == "demo" and m.model_status == "untrained-demo" and m.kind == "classifier" for m in info.models)
    assert info.slide_roots == (str(server["root"]),) and info.version


# --- tiles ------------------------------------------------------------------------------------------------


def test_classify_tiles_streams_batches(client, testdata: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patches = sorted((testdata / "patches").rglob("*.png"))[:6]
    assert len(patches) == 6
    sent: list[int] = []
    original = client._stub.ClassifyTiles

    def spy(requests, **kwargs):
        def counted():
            for batch in requests:
                sent.append(len(batch.images))
                yield batch
        return original(counted(), **kwargs)

    monkeypatch.setattr(client._stub, "ClassifyTiles", spy)
    mpp = 0.5 * 150 / 224  # 224 px patches showing one 75 um tile
    predictions = client.classify_tiles((p.read_bytes() for p in patches), mpp_um_px=mpp, batch_size=4)
    assert sent == [4, 2] and len(predictions) == 6
    for p in predictions:
        assert list(p.probabilities) == CODES
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert p.code == max(p.probabilities, key=p.probabilities.get) and p.embedding == ()
    [with_embedding] = client.classify_tiles([patches[0].read_bytes()], mpp_um_px=mpp, include_embeddings=True)
    assert len(with_embedding.embedding) == 32

    with pytest.raises(InvalidArgumentError, match="not a PNG or JPEG"):
        client.classify_tiles([b"garbage"], mpp_um_px=mpp)
    with pytest.raises(ValueError, match="batch_size"):
        client.classify_tiles([b"x"], mpp_um_px=mpp, batch_size=0)

    def failing_source():
        yield patches[0].read_bytes()
        raise RuntimeError("the tile source broke")

    with pytest.raises(RuntimeError, match="the tile source broke"):
        client.classify_tiles(failing_source(), mpp_um_px=mpp, batch_size=1)


# --- watching ---------------------------------------------------------------------------------------------


def test_watch_reconnects_to_the_same_job_after_a_broken_stream(client, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: list[str] = []
    watched: list[str] = []
    original_submit, original_watch = client._stub.SubmitAnalysis, client._stub.WatchJob

    def submit(request, **kwargs):
        submitted.append(request.slide)
        return original_submit(request, **kwargs)

    def watch(request, **kwargs):
        watched.append(request.job_id)
        stream = original_watch(request, **kwargs)
        if len(watched) > 1:
            return stream

        def broken():  # the first event, then the connection drops
            yield next(stream)
            stream.cancel()
            raise _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        return broken()

    monkeypatch.setattr(client._stub, "SubmitAnalysis", submit)
    monkeypatch.setattr(client._stub, "WatchJob", watch)
    events: list[JobProgress] = []
    outcome = client.analyze("synthetic.tiff", on_progress=events.append, min_tissue_fraction=0.62, omit_tiles=True)
    assert len(submitted) == 1 and len(watched) == 2 and watched[0] == watched[1] == outcome.job_id
    assert {e.job_id for e in events} == {outcome.job_id} and len(events) >= 2 and events[-1].state == "succeeded"
    assert outcome.region_classes[0].tile_count > 0


def test_watch_gives_up_after_its_reconnect_time(server, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    with Client(server["target"], token=TOKEN, reconnect_for_s=0.2, reconnect_backoff_s=0.04) as c:
        calls: list[str] = []

        def always_broken(request, **kwargs):
            calls.append(request.job_id)
            raise _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")

        monkeypatch.setattr(c._stub, "WatchJob", always_broken)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="hepatoquant_client"), pytest.raises(ServerUnavailableError) as info:
            c.watch("a" * 32)
        assert 0.2 <= time.monotonic() - started < 1.0
        assert len(calls) == 4 and set(calls) == {"a" * 32}  # waits of 0.04, 0.08, then the 0.08 s left
        assert "connection refused" in info.value.message and "after 0.2 s of reconnecting" in info.value.message
        waits = [r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()]
        assert len(waits) == 3 and "giving up in" in waits[0]  # says so while it waits

    with Client(server["target"], token=TOKEN, reconnect_backoff_s=0.01) as c:  # other codes are not retried
        with pytest.raises(NotFoundError):
            c.watch("b" * 32)


# --- command line -----------------------------------------------------------------------------------------


def test_cli_info(server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEPATOQUANT_TOKEN", raising=False)
    assert main(["info", "--server", server["target"], "--token-file", str(server["token_file"])]) == 0
    out = capsys.readouterr().out
    assert re.search(r"demo\s+classifier\s+encoder test_vit_micro\s+untrained-demo", out)
    assert str(server["root"]) in out and "Research use only" in out

    assert main(["info", "--server", server["target"]]) == 2  # no token
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hepatoquant-client: error: ")


def test_cli_analyze(server, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                     synthetic_regions_geojson: str) -> None:
    monkeypatch.delenv("HEPATOQUANT_TOKEN", raising=False)
    regions = tmp_path / "regions.geojson"
    regions.write_text(synthetic_regions_geojson)
    out = tmp_path / "out"
    common = ["--server", server["target"], "--token-file", str(server["token_file"])]
    assert main(["analyze", "synthetic.tiff", *common, "--out", str(out), "--regions", str(regions)]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_NAMES
    assert re.search(r"^tiles (\d+)/\1 ", captured.err, re.MULTILINE)  # the stage's last count is shown
    table = captured.out
    assert "TUM %" in table and "STE %" in table and "UNTRAINED DEMO MODEL" in table
    assert re.search(r"^tumour\s+all\s+\d+", table, re.MULTILINE)
    assert re.search(r"^non_tumour\s+all\s+\d+", table, re.MULTILINE)
    report = json.loads((out / "synthetic.report.json").read_text())
    assert {r["region_class"] for r in report["composition"]["region_classes"]} >= {"tumour", "non_tumour"}

    assert main(["analyze", "/etc/passwd", *common, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hepatoquant-client: error: ") and "outside" in err
    assert not (tmp_path / "x").exists()


def test_client_import_is_light_and_the_script_is_installed() -> None:
    code = ("import hepatoquant_client.client, sys; "
            "assert 'torch' not in sys.modules and 'hepatoquant' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
    script = Path(sys.executable).with_name("hepatoquant-client")
    assert script.is_file(), "run `pip install -e ./python_client`"
    shown = subprocess.run([str(script), "--help"], check=True, capture_output=True, text=True, timeout=60)
    assert "analyze" in shown.stdout and "info" in shown.stdout


def test_job_progress_raise_for_state() -> None:
    job = pb.Job(job_id="j", state=pb.JOB_STATE_FAILED, error_code="NOT_FOUND", error_message="slide gone")
    progress = JobProgress.from_proto(job)
    assert progress.state == "failed" and progress.finished
    with pytest.raises(NotFoundError, match="slide gone"):
        progress.raise_for_state()
    interrupted = JobProgress.from_proto(pb.Job(job_id="j", state=pb.JOB_STATE_INTERRUPTED))
    with pytest.raises(ServerUnavailableError):
        interrupted.raise_for_state()
    JobProgress.from_proto(pb.Job(job_id="j", state=pb.JOB_STATE_SUCCEEDED)).raise_for_state()
