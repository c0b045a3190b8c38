"""The QuPath Groovy scripts, without QuPath: they parse, their shared code is in step, their plain logic works
against a live server on loopback, and each script as shipped runs in a stand-in for the QuPath calls it makes
(tests/qupath_fake), leaving a pathologist's own objects alone whatever goes wrong.

Every Groovy test runs twice: with Debian's Groovy 2.4 and with Groovy 4.0, QuPath 0.5 / 0.6's (Gson on the class
path, as in QuPath); ``scripts/install.sh --test-tools`` installs both. Set ``HEPATOQUANT_SKIP_GROOVY=1`` to skip
these tests on a machine that cannot have them.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hepatoquant_client.project_plan import UriMappingError, map_image_uri, parse_mappings
from hepatoquant_client.qupath_geojson import parse_qupath_geojson
from slow_jobs import throttle

import hepatoquant.service.engine as engine
from hepatoquant.errors import CorruptSlideError
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "qupath_scripts"
FAKE = REPO / "tests" / "qupath_fake"
GSON_JARS = (Path("/usr/share/java/gson.jar"),)
TOKEN = "groovy-s3cret"
SCRIPT_NAMES = ["HepatoQuant_Analyze", "HepatoQuant_ImportResults", "HepatoQuant_ExportAnnotations",
                "HepatoQuant_SummaryTable"]


GROOVY4_JAR = REPO / ".tools" / "groovy-4.0.26.jar"
FAST_START = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")  # short JVM runs: start fast, ~40 % less time


@pytest.fixture(scope="module", params=["groovy-2.4", "groovy-4.0"])
def groovy(request: pytest.FixtureRequest) -> list[str]:
    """A groovy command with Gson and the QuPath stand-in on the class path: Debian's Groovy 2.4, and Groovy 4.0,
    the Groovy QuPath 0.5 and 0.6 run scripts with. Missing tools fail: the test setup installs them."""
    if os.environ.get("HEPATOQUANT_SKIP_GROOVY") == "1":
        pytest.skip("HEPATOQUANT_SKIP_GROOVY=1: Groovy script tests skipped on request")
    gson = next((jar for jar in GSON_JARS if jar.is_file()), None)
    if request.param == "groovy-2.4":
        executable = shutil.which("groovy")
        command = [executable, "-cp", f"{gson}{os.pathsep}{FAKE}"] if executable and gson else None
    else:
        java = shutil.which("java")
        command = ([java, *FAST_START, "-cp", os.pathsep.join(map(str, (GROOVY4_JAR, gson, FAKE))), "groovy.ui.GroovyMain"]
                   if java and gson and GROOVY4_JAR.is_file() else None)
    if command is None:
        pytest.fail(f"{request.param} with /usr/share/java/gson.jar is needed: run `bash scripts/install.sh "
                    "--test-tools` (Debian's groovy, libgoogle-gson-java, default-jre-headless; Groovy 4 into "
                    ".tools/), or set HEPATOQUANT_SKIP_GROOVY=1 to skip these tests")
    version = _run([*command, "-e", "print GroovySystem.version"])
    assert version.stdout.startswith(request.param.removeprefix("groovy-")), version
    return command


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAVA_OPTS": " ".join(FAST_START)}  # read by Debian's groovy launcher
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def server(groovy: list[str], tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path):
    """A server per Groovy version, so that neither finds the other's results to reuse."""
    base = tmp_path_factory.mktemp("groovy_server")
    root = base / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    shutil.copy(synthetic_slide, root / "failing.tiff")
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=base / "state", models_dir=models, token=TOKEN,
                          max_queued_jobs=64)
    with pytest.MonkeyPatch.context() as patch:
        throttle(patch)  # batches slowed (slow_jobs): a script can stop a job mid-way on any machine
        running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        yield {"url": f"http://127.0.0.1:{running.http_port}", "grpc_port": running.grpc_port, "root": root.resolve()}
        running.stop(grace_seconds=1)


@pytest.fixture(autouse=True)
def _failing_slide_fails_mid_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server reads 'failing.tiff' until its first tiles are classified, then hits a corrupt tile: a server
    error in the middle of a job, as a damaged slide gives."""
    real = engine.analyze_slide

    def analyze_slide(slide, *args, progress=None, **kwargs):
        def failing_progress(stage, done, total):
            if progress is not None:
                progress(stage, done, total)
            if Path(str(slide)).name == "failing.tiff" and stage == "tiles" and done > 0:
                raise CorruptSlideError(f"slide {slide}: tile at x=1024 y=512 cannot be decoded (corrupt JPEG data)")
        return real(slide, *args, progress=failing_progress, **kwargs)

    monkeypatch.setattr(engine, "analyze_slide", analyze_slide)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- The scripts themselves ---------------------------------------------------------------------------------


def test_the_four_scripts_exist_and_parse(groovy: list[str]) -> None:
    paths = [SCRIPTS / f"{name}.groovy" for name in SCRIPT_NAMES]
    assert all(p.is_file() for p in paths)
    done = _run([*groovy, str(FAKE / "parse_scripts.groovy"), *map(str, paths)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("parses:") == 4


def test_the_parse_check_catches_a_syntax_error(groovy: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "Broken.groovy"
    broken.write_text((SCRIPTS / "HepatoQuant_Analyze.groovy").read_text().replace("try {", "try {{", 1))
    done = _run([*groovy, str(FAKE / "parse_scripts.groovy"), str(broken)])
    assert done.returncode == 1 and "Broken.groovy" in done.stderr


def test_every_script_carries_the_current_shared_code() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import embed_qupath_core
    finally:
        sys.path.pop(0)
    assert embed_qupath_core.main(["--check"]) == 0
    stale = (SCRIPTS / "HepatoQuant_Analyze.groovy").read_text().replace("static final String METADATA_KEY", "static final String METADATA_KEYX")
    assert embed_qupath_core.embedded(stale, "x") != stale  # a changed copy is detected and refreshed


def test_scripts_use_only_what_qupath_ships() -> None:
    for name in SCRIPT_NAMES:
        text = (SCRIPTS / f"{name}.groovy").read_text()
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)  # comments may name what is not used
        for forbidden in ("JsonSlurper", "groovy.json", "@Grab", "io.grpc", "putMeasurement", "getServerURIs"):
            assert forbidden not in code, f"{name} uses {forbidden}, which QuPath 0.4-0.6 lacks"
        imports = {i.rstrip(".") for i in re.findall(r"^import (?:static )?([\w.]+)", code, flags=re.M)}
        assert imports <= {"qupath.lib.gui.scripting.QPEx", "org.slf4j.LoggerFactory", "qupath.lib.io.PathIO"}, imports


# ---- The plain logic (HepatoQuantCore) against a live server -------------------------------------------------


def _core_calls(groovy: list[str], tmp_path: Path, calls: list[dict], timeout: float = 240) -> list[dict]:
    script = tmp_path / "calls.groovy"
    script.write_text((FAKE / "core_calls.groovy").read_text() + "\n" + (SCRIPTS / "core" / "HepatoQuantCore.groovy").read_text())
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    done = _run([*groovy, str(script), str(tmp_path / "calls.json"), str(tmp_path / "out.json")], timeout)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "out.json").read_text())


MAPPING_CASES = [
    ("file:/C:/Slides/liver%201.svs", ["C:/slides=/data/slides"]),
    ("file:///C:/Slides/sub/a.svs", ["C:/Slides/sub=/deep", "c:/slides=/data"]),
    ("file://labserver/wsi/case%2B1/a.ndpi", ["//labserver/wsi=/mnt/wsi"]),
    ("file:/home/path/slides/a.svs", ["/home/path/slides/=/srv/slides"]),
    ("file:/home/path/slidesX/a.svs", ["/home/path/slides=/srv/slides"]),
    ("file:/data/a.svs", ["/data=D:/archive"]),
    ("file:/data/a.svs", ["/data=/"]),
    ("C:\\Slides\\b.svs", ["C:/Slides=/s"]),
    ("https://example.org/a.svs", ["/a=/b"]),
]


def test_path_mapping_agrees_with_the_python_client(groovy: list[str], tmp_path: Path) -> None:
    calls = []
    for uri, specs in MAPPING_CASES:
        mappings = {m.prefix_from: m.prefix_to for m in parse_mappings(specs)}
        calls.append({"static": "mapImagePath", "args": [uri, mappings]})
    outcomes = _core_calls(groovy, tmp_path, calls)
    for (uri, specs), outcome in zip(MAPPING_CASES, outcomes, strict=True):
        try:
            expected = map_image_uri(uri, parse_mappings(specs))
        except UriMappingError:
            assert "error" in outcome, (uri, outcome)
            assert uri in outcome["error"]["message"]
        else:
            assert outcome == {"value": expected}, (uri, specs)
    assert outcomes[0] == {"value": "/data/slides/liver 1.svs"}


def test_plain_logic_files_and_tables(groovy: list[str], tmp_path: Path) -> None:
    import gzip

    names = ["a/b/case 7.svs", "C:\\x\\y.ome.tiff", "noext", ".hidden", "S1.mrxs"]
    (tmp_path / "results").mkdir()
    with gzip.open(tmp_path / "results" / "S1.geojson.gz", "wt") as f:
        f.write(json.dumps([OLD_REGION]))
    calls = [{"static": "fileStem", "args": [n]} for n in names] + [
        {"static": "findResultFile", "args": [str(tmp_path / "results"), ["S0", "S1"], "S1"], "fileArgs": [0]},
        {"static": "csvCell", "args": ['say "hi", twice']},
        {"static": "csvCell", "args": [0.8700000047683716]},
        {"static": "summaryColumns", "args": [[{"image": "a", "FIB_pct": 1}, {"image": "b", "TUM_pct": 2, "FIB_pct": 3}]]},
        {"static": "checkAllHepatoQuant", "args": [json.dumps([OLD_REGION, OLD_TILE]), "ok.geojson"]},
        {"static": "checkAllHepatoQuant", "args": ['{"type": "Topology"}', "odd.geojson"]},
    ]
    outcomes = _core_calls(groovy, tmp_path, calls)
    assert [o["value"] for o in outcomes[:5]] == [Path(n.replace("\\", "/")).stem for n in names]
    found = outcomes[5]["value"]
    assert found.endswith("S1.geojson.gz")
    [text] = [o["value"] for o in _core_calls(groovy, tmp_path, [{"static": "readResultText", "args": [found], "fileArgs": [0]}])]
    assert json.loads(text) == [OLD_REGION]  # .gz read as QuPath reads it
    assert outcomes[6]["value"] == '"say ""hi"", twice"' and outcomes[7]["value"] == "0.87"
    assert outcomes[8]["value"][6:] == ["FIB_pct", "FIB_tiles", "TUM_pct", "TUM_tiles"]
    assert "error" not in outcomes[9]  # all HepatoQuant objects: accepted
    assert "is not QuPath GeoJSON" in outcomes[10]["error"]["message"]


def test_script_settings_reach_every_request_field(groovy: list[str], tmp_path: Path) -> None:
    """The Analyze script's settings map onto AnalysisRequest (the one schema, issue 18): every field but the
    embeddings (kept on the server; QuPath has no use for them) is reachable, and a 0 given is sent as 0."""
    from google.protobuf import json_format

    from hepatoquant_client.proto import pb

    settings = {"model": "demo", "segmenterModel": "demo-seg", "mppUmPx": 0.25, "tileSizePx": 224,
                "tileSpacingUmPx": 1.0, "minTissueFraction": 0, "tissueThreshold": 20, "windowOverlap": 0.5,
                "minFocus": 0, "tileObjectType": "tile", "precision": "fp32", "importTiles": False,
                "keepArtefacts": True, "includeEmbeddings": True, "embeddingsFormat": "h5",
                "tumourClassNames": ["HCC"]}
    [made] = _core_calls(groovy, tmp_path, [{"static": "analysisRequest", "args": ["a.svs", settings, "{}"]}])
    request = json_format.ParseDict(made["value"], pb.AnalysisRequest())
    unset = [f.name for f in pb.AnalysisRequest.DESCRIPTOR.fields
             if not (request.HasField(f.name) if f.has_presence else getattr(request, f.name))]
    assert unset == [], (unset, made["value"])
    assert request.min_focus == 0 and request.min_tissue_fraction == 0 and request.tile_size_px == 224
    script = (SCRIPTS / "HepatoQuant_Analyze.groovy").read_text()
    for key in set(settings) - {"includeEmbeddings", "embeddingsFormat"}:  # each one is a setting at the script's top
        assert f"{key}:" in script, key


def test_plain_logic_analyses_a_slide_through_the_gateway(groovy: list[str], tmp_path: Path, server) -> None:
    api = {"url": server["url"] + "/", "token": TOKEN}
    [info, outcome] = _core_calls(groovy, tmp_path, [
        {"api": api, "method": "serverInfo", "args": []},
        {"api": api, "analyse": {"slide": "synthetic.tiff", "tile_size_px": 48}, "pollMillis": 20},  # ~20 batches
    ])
    assert [m["name"] for m in info["value"]["models"]] == ["demo"]
    value = outcome["value"]
    assert value["job"]["state"] == "JOB_STATE_SUCCEEDED" and value["modelStatus"] == "untrained-demo"
    assert any(line.startswith("tiles ") and "/" in line for line in value["progress"])
    objects = parse_qupath_geojson(value["geoJson"])
    tiles = [o for o in objects if o.object_type == "detection"]
    assert tiles and any(o.name == "HepatoQuant: Whole tissue" for o in objects)
    header, row, *totals = value["table"].splitlines()
    assert header.split()[:5] == ["Region", "Class", "Area", "mm2", "Tiles"] and "TUM %" in header
    assert row.split()[:3] == ["Whole", "tissue", "tissue"] and int(row.split()[4]) == len(tiles)
    assert totals and totals[0].split()[:3] == ["All", "tissue", "tissue"]  # then the region classes' totals


def test_plain_logic_errors_say_what_to_change(groovy: list[str], tmp_path: Path, server) -> None:
    good = {"url": server["url"], "token": TOKEN}
    outcomes = _core_calls(groovy, tmp_path, [
        {"api": {"url": server["url"], "token": "wrong"}, "method": "serverInfo", "args": []},
        {"api": {"url": f"http://127.0.0.1:{_closed_port()}", "token": TOKEN, "timeout": 5}, "method": "serverInfo", "args": []},
        {"api": {"url": f"http://127.0.0.1:{server['grpc_port']}", "token": TOKEN, "timeout": 5}, "method": "serverInfo", "args": []},
        {"api": {"url": "localhost:8080", "token": ""}, "method": "serverInfo", "args": []},
        {"api": good, "method": "submit", "args": [{"slide": "/etc/passwd"}]},
        {"api": good, "method": "submit", "args": [{"slide": "missing.svs"}]},
        {"api": good, "analyse": {"slide": "failing.tiff"}},
        {"api": good, "method": "submit", "args": [{"slide": "synthetic.tiff", "model": "nope"}]},
    ])
    errors = [o["error"] for o in outcomes]
    assert errors[0]["code"] == "UNAUTHENTICATED" and "set TOKEN" in errors[0]["message"]
    assert errors[1]["code"] == "UNAVAILABLE" and "cannot reach" in errors[1]["message"] and "SERVER_URL" in errors[1]["message"]
    assert errors[2]["code"] == "UNAVAILABLE" and "8080" in errors[2]["message"]  # the gRPC port is not the gateway
    assert errors[3]["code"] == "INVALID_ARGUMENT" and "http://" in errors[3]["message"]
    assert errors[4]["code"] == "PERMISSION_DENIED" and "PATH_MAPPINGS" in errors[4]["message"]
    assert errors[5]["code"] == "NOT_FOUND" and "missing.svs" in errors[5]["message"]
    assert errors[6]["code"] == "INVALID_ARGUMENT"  # the job's own error code, as the server recorded it
    assert "analysis failed on the server" in errors[6]["message"] and "corrupt JPEG" in errors[6]["message"]
    assert errors[7]["code"] in ("NOT_FOUND", "INVALID_ARGUMENT") and "nope" in errors[7]["message"]


def test_waiting_for_a_job_rides_out_a_server_that_cannot_be_reached_for_a_while(groovy: list[str], tmp_path: Path,
                                                                                 server) -> None:
    """Issue 19: the scripts polled once and failed when the server restarted under them. They now keep asking
    (3 minutes by default), saying so, and fail with UNAVAILABLE only once that time is up."""
    api = {"url": server["url"], "token": TOKEN}
    request = {"slide": "synthetic.tiff", "omit_tiles": True, "min_tissue_fraction": 0.58}
    rides, gives_up = _core_calls(groovy, tmp_path, [
        {"api": api, "analyseThroughOutage": request, "unreachableCalls": 3, "reconnectMillis": 20000},
        {"api": api, "analyseThroughOutage": dict(request, min_tissue_fraction=0.59), "unreachableCalls": 1000,
         "reconnectMillis": 1500},
    ])
    assert rides["value"]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    waits = [line for line in rides["value"]["progress"] if line.startswith("server unreachable")]
    assert len(waits) == 3 and "asking again in 500 ms" in waits[0] and "asking again in 2000 ms" in waits[2]
    assert gives_up["error"]["code"] == "UNAVAILABLE" and "connection refused" in gives_up["error"]["message"]


def test_stopping_the_script_cancels_its_job_on_the_server(groovy: list[str], tmp_path: Path, server) -> None:
    api = {"url": server["url"], "token": TOKEN}
    slow = {"slide": "synthetic.tiff", "tile_size_px": 16, "omit_tiles": True}
    [outcome] = _core_calls(groovy, tmp_path, [{"api": api, "interruptAfterRunning": slow}])
    assert outcome["value"]["error"]["code"] == "CANCELLED"
    assert outcome["value"]["finalState"] == "JOB_STATE_CANCELLED"


# ---- The scripts as shipped, in the stand-in for QuPath (tests/qupath_fake) ------------------------------------


def _groovy_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(_groovy_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "[" + ", ".join(f"{_groovy_literal(k)}: {_groovy_literal(v)}" for k, v in value.items()) + "]" if value else "[:]"
    raise TypeError(value)


def _with_settings(script: str, settings: dict) -> str:
    """The script with the given settings lines changed, as a pathologist edits them at its top."""
    for name, value in settings.items():
        script, count = re.subn(rf"^def {name} = .*$", lambda _: f"def {name} = {_groovy_literal(value)}", script,
                                count=1, flags=re.M)
        assert count == 1, f"no setting {name}"
    return script


def _run_script(groovy: list[str], tmp_path: Path, name: str, scenario: dict, **settings) -> dict:
    """Runs qupath_scripts/<name>.groovy in the fake QuPath; the script must never throw (Run for project goes on)."""
    script = tmp_path / f"{name}.groovy"
    script.write_text(_with_settings((SCRIPTS / f"{name}.groovy").read_text(), settings))
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    out = tmp_path / "out.json"
    done = _run([*groovy, str(FAKE / "run_script.groovy"), str(tmp_path / "scenario.json"), str(script), str(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def _feature(name: str | None, class_name: str | None, object_type: str = "annotation", *, metadata=None,
             box=(0, 0, 100, 100), colour=(200, 0, 0), measurements=None) -> dict:
    x0, y0, x1, y1 = box
    properties: dict = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if class_name is not None:
        properties["classification"] = {"name": class_name, "color": list(colour)}
    if metadata:
        properties["metadata"] = metadata
    if measurements:
        properties["measurements"] = measurements
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}


USER_ANNOTATION = _feature("my tumour outline", "Tumor")
USER_DETECTION = _feature(None, "Tumor", "detection", box=(10, 10, 20, 20))
OLD_REGION = _feature("HepatoQuant: Whole tissue", "HQ Tissue", metadata={"hepatoquant": "region"})
OLD_TILE = _feature(None, "HQ Fibrosis", "detection", metadata={"hepatoquant": "tile"}, box=(0, 0, 75, 75))
EXISTING = [USER_ANNOTATION, USER_DETECTION, OLD_REGION, OLD_TILE]
USERS_OWN = [("my tumour outline", "Tumor", "annotation"), (None, "Tumor", "detection")]


def _image(server, slide: str = "synthetic.tiff", objects=EXISTING, **extra) -> dict:
    return {"uris": [(server["root"] / slide).as_uri()], "name": slide, "objects": objects, **extra}


def _kinds(objects: list[dict]) -> list[tuple]:
    return [(o.get("name"), o.get("className"), o["objectType"]) for o in objects]


def _server_settings(server, **overrides) -> dict:
    return {"SERVER_URL": server["url"], "TOKEN": TOKEN, "POLL_SECONDS": 0.05, **overrides}


@pytest.mark.parametrize("qupath", ["0.4", "0.6"])
def test_analyze_replaces_only_hepatoquant_objects(groovy, tmp_path: Path, server, qupath: str) -> None:
    """QuPath 0.4 keeps no metadata on objects: HepatoQuant's are still recognised (name prefix, HQ classes)."""
    out = _run_script(groovy, tmp_path, "HepatoQuant_Analyze", {"qupath": qupath, "image": _image(server)},
                      **_server_settings(server))
    errors = [line for line in out["log"] if line["level"] == "ERROR"]
    assert not errors, errors
    kinds = _kinds(out["objects"])
    assert kinds[:2] == USERS_OWN  # the pathologist's objects are kept
    new = kinds[2:]
    assert ("HepatoQuant: Whole tissue", "HQ Tissue", "annotation") in new
    assert sum(1 for k in new if k[2] == "detection") > 10
    assert out["calls"] == ["readObjects", "removeObjects(2, keepChildren=true)", f"addObjects({len(new)})",
                            "resolveHierarchy", "fireHierarchyUpdate"]
    assert out["classColours"]["HQ Tissue"] == (255 << 24 | 100 << 16 | 100 << 8 | 160) - (1 << 32)
    messages = "\n".join(line["message"] for line in out["log"])
    assert "Whole tissue  tissue" in messages and "TUM %" in messages  # the composition table
    assert "UNTRAINED DEMO" in messages


def test_analyze_selected_annotations_as_regions_without_tiles(groovy, tmp_path: Path, server,
                                                               synthetic_regions_geojson: str) -> None:
    regions = json.loads(synthetic_regions_geojson)["features"]
    image = _image(server, objects=[*regions, OLD_REGION], selected=[0, 1, 2])  # our own old region is not sent
    out = _run_script(groovy, tmp_path, "HepatoQuant_Analyze", {"qupath": "0.6", "image": image},
                      **_server_settings(server, IMPORT_TILES=False, SEGMENTER_MODEL="none"))
    assert not [line for line in out["log"] if line["level"] == "ERROR"], out["log"]
    assert "exportObjectsToGeoJson(2, FEATURE_COLLECTION)" in out["calls"]
    kinds = _kinds(out["objects"])
    assert kinds[:2] == [("tumour A", "Tumor", "annotation"), ("background liver", "Non-tumor", "annotation")]
    new = kinds[2:]
    assert new and all(k[2] == "annotation" for k in new)  # IMPORT_TILES = false: regions only
    assert {k[1] for k in new} >= {"HQ Tumour region", "HQ Non-tumour region"}
    assert any("tumour A" in (k[0] or "") for k in new)


def _untouched(out: dict) -> str:
    """The one ERROR line of a failed run, after checking that the image's objects were not changed."""
    assert _kinds(out["objects"]) == _kinds([{"name": f["properties"].get("name"),
                                              "className": f["properties"]["classification"]["name"],
                                              "objectType": f["properties"]["objectType"]} for f in EXISTING])
    assert not any(c.startswith(("removeObjects", "addObjects")) for c in out["calls"])
    errors = [line["message"] for line in out["log"] if line["level"] == "ERROR"]
    assert len(errors) == 1, out["log"]
    return errors[0]


@pytest.mark.parametrize(("case", "expected"), [
    ("wrong token", "set TOKEN at the top of this script"),
    ("server unreachable", "cannot reach the HepatoQuant server"),
    ("image not under a mapped path", "lies under none of the PATH_MAPPINGS folders"),
    ("server error mid-job", "corrupt JPEG"),
    ("no image open", "no image is open"),
])
def test_analyze_failures_log_one_clear_error_and_change_nothing(groovy, tmp_path: Path, server, case: str,
                                                                 expected: str) -> None:
    settings = _server_settings(server)
    scenario = {"qupath": "0.6", "image": _image(server)}
    if case == "wrong token":
        settings["TOKEN"] = "not-the-token"
    elif case == "server unreachable":
        settings["SERVER_URL"] = f"http://127.0.0.1:{_closed_port()}"
    elif case == "image not under a mapped path":
        settings["PATH_MAPPINGS"] = {"D:/Slides": str(server["root"])}
    elif case == "server error mid-job":
        scenario["image"] = _image(server, "failing.tiff")
    else:
        scenario["image"] = None
    out = _run_script(groovy, tmp_path, "HepatoQuant_Analyze", scenario, **settings)
    if case == "no image open":
        assert out.get("objects") is None and not out["calls"]
        [message] = [line["message"] for line in out["log"] if line["level"] == "ERROR"]
    else:
        message = _untouched(out)
    assert expected in message and "were not changed" in message


@pytest.fixture(scope="module")
def result_geojson(server) -> bytes:
    """The server's QuPath GeoJSON for the synthetic slide, fetched over the HTTP gateway as a script would."""
    import base64
    import time
    import urllib.request

    def call(method: str, body: dict) -> dict:
        request = urllib.request.Request(f"{server['url']}/v1/{method}", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    job = call("SubmitAnalysis", {"slide": "synthetic.tiff"})
    while job.get("state") not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"):
        time.sleep(0.1)
        job = call("GetJob", {"jobId": job["jobId"]})
    return base64.b64decode(call("GetResult", {"jobId": job["jobId"]})["qupathGeojson"])


@pytest.mark.parametrize("file_name", ["synthetic.geojson", "synthetic.geojson.gz"])
def test_import_results_replaces_only_hepatoquant_objects(groovy, tmp_path: Path, server, result_geojson: bytes,
                                                          file_name: str) -> None:
    import gzip

    results = tmp_path / "results"
    results.mkdir()
    (results / file_name).write_bytes(gzip.compress(result_geojson) if file_name.endswith(".gz") else result_geojson)
    out = _run_script(groovy, tmp_path, "HepatoQuant_ImportResults", {"qupath": "0.4", "image": _image(server)},
                      RESULTS_FOLDER=str(results))
    assert not [line for line in out["log"] if line["level"] == "ERROR"], out["log"]
    kinds = _kinds(out["objects"])
    expected = parse_qupath_geojson(result_geojson)
    assert kinds[:2] == USERS_OWN and len(kinds) == 2 + len(expected)
    assert out["calls"][:3] == ["readObjects", "removeObjects(2, keepChildren=true)", f"addObjects({len(expected)})"]
    assert "resolveHierarchy" in out["calls"] and out["classColours"]


@pytest.mark.parametrize(("case", "expected"), [
    ("no file for the image", "looked for synthetic.geojson, synthetic.json"),
    ("a file HepatoQuant did not write", "was not written by HepatoQuant"),
    ("a file that is not JSON", "is not valid JSON"),
])
def test_import_results_refusals_change_nothing(groovy, tmp_path: Path, server, case: str, expected: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "other-slide.geojson").write_text("[]")
    if case == "a file HepatoQuant did not write":
        (results / "synthetic.geojson").write_text(json.dumps([USER_ANNOTATION]))
    elif case == "a file that is not JSON":
        (results / "synthetic.geojson").write_text("{not json")
    out = _run_script(groovy, tmp_path, "HepatoQuant_ImportResults", {"qupath": "0.6", "image": _image(server)},
                      RESULTS_FOLDER=str(results))
    message = _untouched(out)
    assert expected in message
    if case == "no file for the image":
        assert "other-slide.geojson" in message  # what is there, to spot a naming mismatch


def test_export_annotations_of_chosen_classes(groovy, tmp_path: Path, server) -> None:
    stroma = _feature("stroma 1", "Stroma", box=(200, 200, 300, 300))
    unclassified = _feature("unclassified", None, box=(400, 400, 500, 500))
    project = tmp_path / "project"
    image = _image(server, objects=[*EXISTING, stroma, unclassified], entry=0)
    scenario = {"qupath": "0.6", "image": image,
                "project": {"dir": str(project), "entries": [{"name": "synthetic.tiff", "objects": image["objects"]}]}}
    out = _run_script(groovy, tmp_path, "HepatoQuant_ExportAnnotations", scenario, EXPORT_CLASSES=["tumor", "Stroma"])
    written = project / "hepatoquant-annotations" / "synthetic.geojson"
    exported = parse_qupath_geojson(written.read_bytes())
    assert [(o.name, o.class_names) for o in exported] == [("my tumour outline", ("Tumor",)), ("stroma 1", ("Stroma",))]
    assert [p.name for p in written.parent.iterdir()] == ["synthetic.geojson"]  # no temporary left behind
    assert any("exported 2 annotation(s)" in line["message"] for line in out["log"])

    everything = tmp_path / "everything"
    _run_script(groovy, tmp_path, "HepatoQuant_ExportAnnotations", scenario, EXPORT_CLASSES=[], EXPORT_FOLDER=str(everything))
    names = [o.name for o in parse_qupath_geojson((everything / "synthetic.geojson").read_bytes())]
    assert names == ["my tumour outline", "stroma 1", "unclassified"]  # never HepatoQuant's own region

    out = _run_script(groovy, tmp_path, "HepatoQuant_ExportAnnotations", scenario, EXPORT_CLASSES=["Necrosis"],
                      EXPORT_FOLDER=str(tmp_path / "none"))
    [message] = [line["message"] for line in out["log"] if line["level"] == "ERROR"]
    assert "no annotation of the classes [Necrosis]" in message and not (tmp_path / "none" / "synthetic.geojson").exists()


def test_summary_table_has_one_row_per_hepatoquant_region(groovy, tmp_path: Path, server, result_geojson: bytes,
                                                          synthetic_regions_geojson: str) -> None:
    features = json.loads(result_geojson)["features"]
    project = tmp_path / "project"
    scenario = {"qupath": "0.4", "image": _image(server, objects=features, entry=0), "project": {
        "dir": str(project), "entries": [{"name": "synthetic.tiff", "objects": features},
                                         {"name": "not analysed.svs", "objects": [USER_ANNOTATION]}]}}
    project.mkdir()
    out = _run_script(groovy, tmp_path, "HepatoQuant_SummaryTable", scenario)
    with open(project / "hepatoquant-summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    regions = [f for f in features if f["properties"].get("name", "").startswith("HepatoQuant: ")]
    assert len(rows) == len(regions) == 1
    [row], [region] = rows, regions
    measurements = region["properties"]["measurements"]
    assert list(row)[:6] == ["image", "region", "region_class", "region_area_mm2", "tiles", "tile_area_mm2"]
    assert list(row)[6:8] == ["TUM_pct", "TUM_tiles"] and len(row) == 6 + 2 * 7
    assert row["image"] == "synthetic.tiff" and row["region"] == "Whole tissue" and row["region_class"] == "HQ Tissue"
    assert int(row["tiles"]) == measurements["HQ tiles"]
    for code in ("TUM", "FIB", "NOR"):
        assert float(row[f"{code}_pct"]) == pytest.approx(measurements[f"{code} %"], rel=1e-6)
    warnings = [line["message"] for line in out["log"] if line["level"] == "WARN"]
    assert warnings == ["HepatoQuant: 1 image(s) have no HepatoQuant regions yet: not analysed.svs"]

    out = _run_script(groovy, tmp_path, "HepatoQuant_SummaryTable", {"qupath": "0.6", "image": None})
    assert [line["message"] for line in out["log"] if line["level"] == "ERROR"] == [
        "HepatoQuant: no project is open; open the QuPath project whose images you analysed. Nothing was written."]


def test_a_region_without_tiles_shows_no_percentages_never_zero(groovy, tmp_path: Path) -> None:
    """No data is not 0 %: a region without tiles has no "<CODE> %" measurements (the server leaves them out), so
    the log's table shows blank cells and the summary CSV empty ones, while its tile counts stay (0)."""
    share = lambda code, tiles, percent=None: {"code": code, **({"tiles": tiles} if tiles else {}),  # noqa: E731
                                               **({} if percent is None else {"percent": percent})}
    result = {  # proto3 JSON as the gateway sends it: unset fields (0 tiles, no percent) are absent
        "regions": [{"name": "tumour A", "regionClass": "tumour", "regionAreaMm2": 0.05, "tileCount": "4",
                     "classes": [share("TUM", "4", 100.0), share("FIB", None, 0.0)]},
                    {"name": "empty corner", "regionClass": "non_tumour", "regionAreaMm2": 0.01,
                     "classes": [share("TUM", None), share("FIB", None)]}],
        "regionClasses": [{"name": "non_tumour", "regionClass": "non_tumour", "regionAreaMm2": 0.01,
                           "classes": [share("TUM", None), share("FIB", None)]}]}
    empty = _feature("HepatoQuant: empty corner", "HQ Non-tumour region", metadata={"hepatoquant": "region"},
                     measurements={"HQ region area mm^2": 0.01, "HQ tiles": 0, "HQ tile area mm^2": 0,
                                   "TUM tiles": 0, "FIB tiles": 0})
    [table, from_file] = [o["value"] for o in _core_calls(groovy, tmp_path, [
        {"static": "compositionTable", "args": [result]},
        {"static": "compositionFromGeoJson", "args": [json.dumps([empty, OLD_TILE]), "x.geojson"]},
    ])]
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["tumour A"][3:] == ["0.050", "4", "100.0", "0.0"]  # a set 0 % is a real 0
    assert rows["empty corner"][3:] == ["0.010", "0"]  # blank, not 0.0
    assert rows["All non_tumour"][3:] == ["0.010", "0"]
    assert "no classified tiles" in table.splitlines()[-1]
    assert from_file == {"regions": [{"name": "empty corner", "regionClass": "Non-tumour region", "regionAreaMm2": 0.01,
                                      "tileCount": 0, "classes": [{"code": "TUM"}, {"code": "FIB"}]}]}

    # The summary CSV of a project whose only region has no tiles: its class columns exist, "_pct" cells empty.
    project = tmp_path / "project"
    project.mkdir()
    scenario = {"qupath": "0.6", "image": {"uris": ["file:/s/empty.svs"], "name": "empty.svs", "objects": [empty],
                                           "entry": 0},
                "project": {"dir": str(project), "entries": [{"name": "empty.svs", "objects": [empty]}]}}
    _run_script(groovy, tmp_path, "HepatoQuant_SummaryTable", scenario)
    with open(project / "hepatoquant-summary.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row["tiles"] == "0" and row["TUM_tiles"] == "0" and row["FIB_tiles"] == "0"
    assert row["TUM_pct"] == "" and row["FIB_pct"] == ""
