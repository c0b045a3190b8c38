"""The server over loopback: gRPC (with health and reflection) and the HTTP/JSON gateway, on real slides."""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hepatoquant_client.proto import pb, pb_grpc
from hepatoquant_client.qupath_geojson import parse_qupath_geojson

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path, testdata: Path):
    base = tmp_path_factory.mktemp("server")
    root = base / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    (root / "notes.txt").write_text("not a slide")
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(synthetic_slide, outside / "private.tiff")
    os.symlink(outside / "private.tiff", root / "escape.tiff")  # a link inside a root to a slide outside every root
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")  # "demo" here is the tiny test encoder: fast
    config = ServerConfig(slide_roots=(root.resolve(), (testdata / "slides").resolve()), state_dir=base / "state",
                          models_dir=models, token=TOKEN, max_queued_jobs=64)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    yield {"running": running, "root": root, "base": base}
    running.stop(grace_seconds=1)


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server['running'].grpc_port}")
    yield pb_grpc.HepatoQuantStub(channel)
    channel.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _wait(stub, job_id: str) -> pb.Job:
    last = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=AUTH, timeout=120):
        last = event.job
    return last


def test_health_reflection_and_info(server, stub) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server['running'].grpc_port}")
    health_stub = health_pb2_grpc.HealthStub(channel)
    reply = health_stub.Check(health_pb2.HealthCheckRequest(service="hepatoquant.v1.HepatoQuant"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING  # no token needed for health
    reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection_stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     metadata=AUTH)
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert "hepatoquant.v1.HepatoQuant" in services and "grpc.health.v1.Health" in services
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=AUTH)
    assert [c.code for c in info.tissue_classes] == ["TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE"]
    assert any(m.name == "demo" and m.model_status == "untrained-demo" for m in info.models)
    assert str(server["root"].resolve()) in info.slide_roots and "Research use only" in info.notice


def test_analysis_job_end_to_end_and_reuse(stub) -> None:
    job = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff"), metadata=AUTH)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    final = _wait(stub, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error_message
    assert final.progress.stage in ("tiles", "outputs")
    result = stub.GetResult(pb.GetResultRequest(job_id=job.job_id), metadata=AUTH)
    assert result.model_status == "untrained-demo"
    [whole] = result.region_classes
    assert whole.region_class == "tissue" and whole.tile_count > 30
    assert sum(c.tiles for c in whole.classes) == whole.tile_count
    objects = parse_qupath_geojson(result.qupath_geojson)
    assert sum(o.object_type == "detection" for o in objects) == whole.tile_count
    assert json.loads(result.report_json)["tiles"]["count"] == whole.tile_count

    again = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff"), metadata=AUTH)
    assert again.job_id != job.job_id and again.reused_result and again.state == pb.JOB_STATE_SUCCEEDED
    assert stub.GetResult(pb.GetResultRequest(job_id=again.job_id), metadata=AUTH).qupath_geojson == result.qupath_geojson
    listed = stub.ListJobs(pb.ListJobsRequest(limit=10), metadata=AUTH)
    assert {job.job_id, again.job_id} <= {j.job_id for j in listed.jobs}


def test_a_result_counted_under_another_report_schema_is_not_reused(stub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server upgraded to another counting rule (report schema 2.0: QuPath's centre rule) must compute anew
    rather than hand out a result made under the old one."""
    from hepatoquant.service import engine

    first = _wait(stub, stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff"), metadata=AUTH).job_id)
    assert first.state == pb.JOB_STATE_SUCCEEDED
    monkeypatch.setattr(engine, "REPORT_SCHEMA_VERSION", "999.0")
    again = stub.SubmitAnalysis(pb.AnalysisRequest(slide="synthetic.tiff"), metadata=AUTH)
    assert not again.reused_result
    assert _wait(stub, again.job_id).state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("request_fields", "code", "fragment"),
    [
        ({"slide": "absent.svs"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"slide": "/etc/passwd"}, grpc.StatusCode.PERMISSION_DENIED, "outside the server's slide roots"),
        ({"slide": "../../etc/passwd"}, grpc.StatusCode.PERMISSION_DENIED, "outside"),
        ({"slide": "escape.tiff"}, grpc.StatusCode.PERMISSION_DENIED, "outside"),
        ({"slide": "notes.txt"}, grpc.StatusCode.INVALID_ARGUMENT, "not a whole-slide format"),
        ({"slide": "TCGA-CR-7395-01A-01-TS1.svs"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"slide": "synthetic.tiff", "regions_geojson": "{not json"}, grpc.StatusCode.INVALID_ARGUMENT, "regions_geojson"),
        ({"slide": "synthetic.tiff", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "no model pack 'nope'"),
        ({"slide": "synthetic.tiff", "tile_size_px": 5}, grpc.StatusCode.INVALID_ARGUMENT, "tile size 5 px"),
        # explicit 0 is validated, never read as "the pack's default"; every option is checked before a job exists
        ({"slide": "synthetic.tiff", "tile_size_px": 0}, grpc.StatusCode.INVALID_ARGUMENT, "tile size 0 px"),
        ({"slide": "synthetic.tiff", "tile_spacing_um_px": 0}, grpc.StatusCode.INVALID_ARGUMENT, "tile spacing 0.0"),
        ({"slide": "synthetic.tiff", "mpp_um_px": 0}, grpc.StatusCode.INVALID_ARGUMENT, "mpp_um_px = 0.0"),
        ({"slide": "synthetic.tiff", "min_focus": -1}, grpc.StatusCode.INVALID_ARGUMENT, "minimum focus -1"),
        ({"slide": "synthetic.tiff", "window_overlap": 0.95}, grpc.StatusCode.INVALID_ARGUMENT, "window overlap 0.95"),
        ({"slide": "synthetic.tiff", "tissue_threshold": 300}, grpc.StatusCode.INVALID_ARGUMENT, "saturation threshold 300"),
        ({"slide": "synthetic.tiff", "precision": "fp8"}, grpc.StatusCode.INVALID_ARGUMENT, "precision 'fp8'"),
        ({"slide": ""}, grpc.StatusCode.INVALID_ARGUMENT, "names no slide"),
    ],
)
def test_bad_requests_get_precise_codes(stub, request_fields: dict, code, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitAnalysis(pb.AnalysisRequest(**request_fields), metadata=AUTH)
    assert info.value.code() == code
    assert fragment in info.value.details()
    assert "/etc" not in info.value.details() or "passwd" in request_fields["slide"]


def test_slide_without_mpp_needs_the_override(server, stub, testdata: Path) -> None:
    slide = str(testdata / "slides" / "TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitAnalysis(pb.AnalysisRequest(slide=slide), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--mpp" in info.value.details()
    job = stub.SubmitAnalysis(pb.AnalysisRequest(slide=slide, mpp_um_px=0.5, omit_tiles=True), metadata=AUTH)
    assert _wait(stub, job.job_id).state == pb.JOB_STATE_SUCCEEDED
    objects = parse_qupath_geojson(stub.GetResult(pb.GetResultRequest(job_id=job.job_id), metadata=AUTH).qupath_geojson)
    assert objects and all(o.object_type == "annotation" for o in objects)


def test_unknown_job_and_wrong_token(stub) -> None:
    unknown = "0" * 32
    for call, request in ((stub.GetJob, pb.GetJobRequest(job_id=unknown)),
                          (stub.GetResult, pb.GetResultRequest(job_id=unknown)),
                          (stub.CancelJob, pb.CancelJobRequest(job_id=unknown))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and unknown in info.value.details()
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_classify_tiles_stream(stub, testdata: Path) -> None:
    patches = sorted((testdata / "patches" / "crc-val-he-7k").rglob("*.png"))[:6]
    batches = [pb.TileBatch(images=[p.read_bytes() for p in patches[:4]], mpp_um_px=0.5 * 150 / 224),
               pb.TileBatch(images=[p.read_bytes() for p in patches[4:]], mpp_um_px=0.5 * 150 / 224, include_embeddings=True)]
    replies = list(stub.ClassifyTiles(iter(batches), metadata=AUTH))
    assert [len(r.predictions) for r in replies] == [4, 2]
    assert replies[0].classes == ["TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE"]
    assert abs(sum(replies[0].predictions[0].probabilities) - 1) < 1e-4
    assert len(replies[1].predictions[0].embedding) == 32 and not replies[0].predictions[0].embedding
    for bad, fragment in ((pb.TileBatch(), "no images"), (pb.TileBatch(images=[b"garbage"]), "not a PNG or JPEG"),
                          (pb.TileBatch(images=[patches[0].read_bytes()], mpp_um_px=2.0), "classifies 75 um tiles")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ClassifyTiles(iter([bad]), metadata=AUTH))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


def _http(server, method: str, body: dict | None = None, token: str | None = TOKEN, path: str | None = None):
    url = f"http://127.0.0.1:{server['running'].http_port}{path or '/v1/' + method}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_gateway_mirrors_the_rpcs(server) -> None:
    assert _http(server, "", path="/healthz", token=None) == (200, '{"status": "SERVING"}')
    status, body = _http(server, "GetServerInfo", {})
    assert status == 200 and json.loads(body)["tissueClasses"][0]["code"] == "TUM"
    status, body = _http(server, "SubmitAnalysis", {"slide": "synthetic.tiff", "omitTiles": True})
    assert status == 200
    job_id = json.loads(body)["jobId"]
    status, body = _http(server, "WatchJob", {"jobId": job_id})
    events = [json.loads(line) for line in body.splitlines() if line]
    assert status == 200 and events[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    status, body = _http(server, "GetResult", {"jobId": job_id})
    result = json.loads(body)
    assert status == 200 and result["regionClasses"][0]["regionClass"] == "tissue"
    assert parse_qupath_geojson(base64.b64decode(result["qupathGeojson"]))

    assert _http(server, "GetJob", {"jobId": "f" * 32})[0] == 404
    status, body = _http(server, "SubmitAnalysis", {"slide": "/etc/passwd"})
    assert status == 403 and json.loads(body)["code"] == "PERMISSION_DENIED"
    assert _http(server, "SubmitAnalysis", {"slide": "x", "unknownField": 1})[0] == 400
    assert _http(server, "GetServerInfo", {}, token="wrong")[0] == 401
    assert _http(server, "NoSuchMethod", {})[0] == 404


def test_sixteen_concurrent_clients_lose_nothing(server, testdata: Path) -> None:
    """16 clients submit distinct requests (different tile thresholds) on the generated and the real slide and
    watch them; every result comes back, and equals what the same request gives when run alone."""
    slides = ["synthetic.tiff", str(testdata / "slides" / "CMU-1-Small-Region.svs")]

    def client(index: int) -> tuple[int, int, str]:
        channel = grpc.insecure_channel(f"127.0.0.1:{server['running'].grpc_port}")
        stub = pb_grpc.HepatoQuantStub(channel)
        slide = slides[index % 2]
        job = stub.SubmitAnalysis(pb.AnalysisRequest(slide=slide, min_tissue_fraction=0.5 + index / 100,
                                                     omit_tiles=True), metadata=AUTH)
        final = _wait(stub, job.job_id)
        result = stub.GetResult(pb.GetResultRequest(job_id=job.job_id), metadata=AUTH)
        channel.close()
        return final.state, result.region_classes[0].tile_count, slide

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(client, range(16)))
    assert all(state == pb.JOB_STATE_SUCCEEDED for state, _, _ in outcomes)
    for slide in slides:
        counts = [count for _, count, name in outcomes if name == slide]
        assert len(counts) == 8 and counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_tile_batches_over_the_limit_are_refused(stub, testdata: Path) -> None:
    png = next((testdata / "patches" / "crc-val-he-7k").rglob("*.png")).read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ClassifyTiles(iter([pb.TileBatch(images=[png] * 513)]), metadata=AUTH))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 512" in info.value.details()


def test_tls_on_both_ports(tmp_path: Path, synthetic_slide: Path, self_signed_cert) -> None:
    import ssl

    cert, key = self_signed_cert
    ensure_demo_pack(tmp_path / "models", encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(synthetic_slide.parent,), state_dir=tmp_path / "state", models_dir=tmp_path / "models")
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0,
                           tls=(str(cert), str(key)))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.grpc_port}", credentials) as channel:
            info = pb_grpc.HepatoQuantStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.version
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as plain:
            with pytest.raises(grpc.RpcError):
                pb_grpc.HepatoQuantStub(plain).GetServerInfo(pb.GetServerInfoRequest(), timeout=3)
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{running.http_port}/healthz", context=context, timeout=10) as r:
            assert r.status == 200
    finally:
        running.stop(grace_seconds=1)


def test_demo_command_runs_the_main_job_through_the_server(synthetic_slide: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from hepatoquant.cli import main

    out = tmp_path / "demo"
    assert main(["demo", str(synthetic_slide), "--out", str(out), "--seg-model", "none"]) == 0
    err = capsys.readouterr().err
    assert "server started" in err and "server stopped" in err and "UNTRAINED DEMO" in err
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.csv", "synthetic.geojson", "synthetic.overlay.png",
                                                     "synthetic.region-mask.tif", "synthetic.report.json",
                                                     "synthetic.tissue-map.tif"]
    report = json.loads((out / "synthetic.report.json").read_text())
    assert report["model_status"] == "untrained-demo" and report["tiles"]["count"] > 30
