"""The four QuPath scripts inside QuPath 0.6.0's own classes (``../shared/qupath-kit``'s ``qupath_run_script.sh``),
against a live server on loopback, on a real QuPath project.

The project (made with paquo) holds flat TIFF copies of the real CMU-1-Small-Region slide and of a generated slide:
the kit has no OpenSlide or Bio-Formats, so QuPath opens the images with its ImageJ server, which reads plain TIFFs
only. The server's slide root holds the tiled originals under the same file names (the CMU .svs bytes renamed to
``.tif``: OpenSlide tells the format by content), so that the scripts' ``PATH_MAPPINGS`` map the project's image
folder onto the server's root exactly as at a site. Each check reads the project back with QuPath's ``ProjectIO``
(``qupath_read_project.py``) or reads the script's own hierarchy summary, never the script's word.

One project, one server, a few JVM runs (each a few seconds): the fixtures are module-scoped and run in the order
a pathologist would (analyse, analyse again, import results made elsewhere, summary table, export).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hepatoquant_client.qupath_geojson import read_qupath_geojson
from test_qupath_scripts import _with_settings

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "qupath_scripts"
HEPATOQUANT = Path(sys.executable).with_name("hepatoquant")
TOKEN = "kit-s3cret"
MODEL = "tiny"
CMU = "CMU-1-Small-Region.tif"  # the project's flat copy and the server's .svs bytes share this name
SYNTHETIC = "synthetic.tiff"
FAST_START = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"  # short JVM runs start faster

# A pathologist's own annotations, drawn before HepatoQuant runs, all outside HepatoQuant's regions and tiles.
# (x0, y0, x1, y1) in level-0 pixels; measurements are a pathologist's own numbers.
OWN = {
    CMU: [("my tumour outline", "Tumor", (100, 100, 900, 900), {"my score": 1.5}),
          ("my stroma", "Stroma", (1960, 100, 2200, 400), {"my score": 2.25}),
          ("my necrosis", "Necrosis", (100, 1000, 400, 1300), {})],
    SYNTHETIC: [("my note", "Necrosis", (40, 1800, 240, 2000), {"my score": 3.0})],
}


def _square(x0: float, y0: float, x1: float, y1: float) -> list:
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


# Regions for `hepatoquant analyze --regions` on the generated slide: its tumour, a square of its second tissue
# piece, and a corner without tissue, which therefore has no tiles: no percentages at all (no data is not 0 %).
REGIONS = {"type": "FeatureCollection", "features": [
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(380, 640, 820, 1160)},
     "properties": {"objectType": "annotation", "name": "tumour A",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(1250, 1050, 1650, 1500)},
     "properties": {"objectType": "annotation", "name": "background liver",
                    "classification": {"name": "Non-tumor", "color": [0, 160, 0]}}},
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(1800, 60, 2000, 260)},
     "properties": {"objectType": "annotation", "name": "empty corner",
                    "classification": {"name": "Non-tumor", "color": [0, 160, 0]}}},
]}


def _flat_tiff(slide: Path, target: Path) -> None:
    """Level 0 of a slide as a plain RGB TIFF (no tiles, no pyramid): what QuPath's ImageJ server opens."""
    import numpy as np
    import openslide
    import tifffile

    with openslide.OpenSlide(str(slide)) as opened:
        rgb = np.asarray(opened.read_region((0, 0), 0, opened.dimensions).convert("RGB"))
    tifffile.imwrite(target, rgb, photometric="rgb")


PAQUO_PROJECT = """
import json
from paquo.classes import QuPathPathClass
from paquo.images import QuPathImageType
from paquo.projects import QuPathProject
from shapely.geometry import box

spec = json.loads({spec!r})
with QuPathProject(spec["dir"], mode="x") as project:
    for image in spec["images"]:
        entry = project.add_image(image["path"], image_type=QuPathImageType.BRIGHTFIELD_H_E)
        for name, class_name, bounds, measurements in image["own"]:
            annotation = entry.hierarchy.add_annotation(roi=box(*bounds), path_class=QuPathPathClass(class_name),
                                                        measurements={{k: float(v) for k, v in measurements.items()}})
            annotation.name = name
    print(json.dumps({{"images": [entry.image_name for entry in project.images]}}))
"""


@pytest.fixture(scope="module")
def kit(qupath_kit):
    """The kit with QuPath's INFO log (the scripts' progress and tables) and a fast-starting JVM."""
    return dataclasses.replace(qupath_kit, env={**qupath_kit.env, "QUPATH_KIT_LOG": "info",
                                                "QUPATH_KIT_JAVA_OPTS": FAST_START})


@pytest.fixture(scope="module")
def site(kit, tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path, synthetic_slide: Path, tiny_classifier_pack):
    """The server (tiled originals in its slide root; the tiny trained-kind pack, whose labels vary from tile to
    tile, so that the percentages checked are not all 0 or 100) and the QuPath project (flat copies, a
    pathologist's own annotations), as a lab has them."""
    base = tmp_path_factory.mktemp("kit_site")
    images, slides = base / "images", base / "slides"
    images.mkdir()
    slides.mkdir()
    _flat_tiff(cmu_slide, images / CMU)
    _flat_tiff(synthetic_slide, images / SYNTHETIC)
    shutil.copy(cmu_slide, slides / CMU)
    shutil.copy(synthetic_slide, slides / SYNTHETIC)

    project = base / "project"
    spec = {"dir": str(project), "images": [{"path": str(images / name), "own": own} for name, own in OWN.items()]}
    made = kit.python(PAQUO_PROJECT.format(spec=json.dumps(spec)))
    assert made.returncode == 0 and made.result == {"images": [CMU, SYNTHETIC]}, made.stderr[-3000:]

    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")  # the server's default
    shutil.copytree(tiny_classifier_pack.path, models / MODEL)
    config = ServerConfig(slide_roots=(slides.resolve(),), state_dir=base / "state", models_dir=models, token=TOKEN)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    yield {"base": base, "images": images, "slides": slides.resolve(), "project": project, "pack": models / MODEL,
           "url": f"http://127.0.0.1:{running.http_port}"}
    running.stop(grace_seconds=1)


def _run(kit, site, image: str, name: str, save: bool = False, **settings):
    """qupath_scripts/<name>.groovy with its settings changed (as a pathologist edits them), run in QuPath on one
    project image. Returns (the kit's JSON, the HepatoQuant log lines); the script must not throw nor log an ERROR."""
    script = site["base"] / f"{name}.groovy"
    script.write_text(_with_settings((SCRIPTS / f"{name}.groovy").read_text(), settings))
    run = kit.run_script(site["project"], image, script, save=save)
    log = _log(run.stderr)
    assert run.returncode == 0 and run.result.get("ran") and not run.result.get("threw"), run.stderr[-4000:]
    assert not [line for line in log if line.startswith("ERROR")], log
    assert run.result.get("saved") == save
    return run.result, log


def _log(stderr: str) -> list[str]:
    """The HepatoQuant logger's messages ("LEVEL message", continuation lines included) from slf4j-simple's output."""
    messages: list[str] = []
    for line in stderr.splitlines():
        match = re.match(r"^\[[^\]]*\] (TRACE|DEBUG|INFO|WARN|ERROR) (\S+) - (.*)$", line)
        if match:
            messages.append(f"{match[1]} {match[3]}" if match[2] == "HepatoQuant" else "")
        elif messages and messages[-1] and not line.startswith(("\tat ", "SCRIPT THREW")):
            messages[-1] += "\n" + line
    return [m for m in messages if m]


def _gateway(site, method: str, body: dict) -> dict:
    request = urllib.request.Request(f"{site['url']}/v1/{method}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _image(project_json: dict, name: str) -> dict:
    [image] = [i for i in project_json["images"] if i["name"] == name]
    return image


def _hq_regions(hierarchy: dict) -> list[dict]:
    return [a for a in hierarchy["by_annotation"] if (a["name"] or "").startswith("HepatoQuant: ")]


def _own(hierarchy: dict) -> list[tuple]:
    """The pathologist's annotations as (name, class, measurements, children), sorted by name."""
    return sorted((a["name"], a["class"], a["measurements"], a["children"]) for a in hierarchy["by_annotation"]
                  if not (a["name"] or "").startswith("HepatoQuant: "))


def _expected_own(image: str) -> list[tuple]:
    return sorted((name, cls, {k: float(v) for k, v in m.items()}, 0) for name, cls, _, m in OWN[image])


def _check_nesting(hierarchy: dict, regions: list[dict], outside: int) -> None:
    """Every tile under a region, each region's "HQ tiles" and class counts equal to what QuPath nests under it
    and to the server's composition (regions: proto3-JSON RegionComposition or the report's composition)."""
    hq = {a["name"].removeprefix("HepatoQuant: "): a for a in _hq_regions(hierarchy)}
    assert sorted(hq) == sorted(r["name"] for r in regions)
    assert hierarchy["detections_at_root"] == outside
    assert hierarchy["detections_nested"] == sum(a["children"] for a in hq.values())
    for region in regions:
        annotation = hq[region["name"]]
        tiles = int(region.get("tileCount", region.get("tile_count", 0)))
        assert annotation["children"] == tiles == annotation["measurements"]["HQ tiles"], region["name"]
        assert set(annotation["children_by_type"]) <= {"detection"}
        class_counts = [v for k, v in annotation["measurements"].items() if k.endswith(" tiles") and k != "HQ tiles"]
        assert len(class_counts) == 7 and sum(class_counts) == tiles


# ---- HepatoQuant_Analyze.groovy: the open image through the server -----------------------------------------


@pytest.fixture(scope="module")
def analyzed(kit, site) -> dict:
    """Analyze run twice on the CMU image (saved each time), the server's result, and the project as saved."""
    settings = {"SERVER_URL": site["url"], "TOKEN": TOKEN, "PATH_MAPPINGS": {str(site["images"]): str(site["slides"])},
                "MODEL": MODEL, "POLL_SECONDS": 0.2}
    first, first_log = _run(kit, site, CMU, "HepatoQuant_Analyze", save=True, **settings)
    second, second_log = _run(kit, site, CMU, "HepatoQuant_Analyze", save=True, **settings)
    [job_id] = [m[1] for line in first_log if (m := re.search(r": job (\w+) for \S+$", line.splitlines()[0]))]
    result = _gateway(site, "GetResult", {"jobId": job_id})
    project = kit.read_project(site["project"])
    assert project.returncode == 0, project.stderr[-3000:]
    return {"first": first, "first_log": first_log, "second": second, "second_log": second_log, "result": result,
            "project": project.result}


def test_analyze_in_qupath_nests_every_tile_under_its_region(analyzed, site) -> None:
    log = "\n".join(analyzed["first_log"])
    assert f"for {site['slides'] / CMU}\n" in log  # the mapped path of the server's copy
    result = analyzed["result"]
    assert json.loads(result["reportJson"])["model"]["name"] == MODEL and "UNTRAINED DEMO" not in log
    regions = result["regions"]
    outside = sum(int(r.get("tileCount", 0)) for r in result["regionClasses"] if r["regionClass"] == "unassigned")
    hierarchy = analyzed["first"]["hierarchy"]
    _check_nesting(hierarchy, regions, outside)
    tiles = sum(int(r.get("tileCount", 0)) for r in regions) + outside
    assert hierarchy["detections"] == tiles > 50  # every tile the server classified, each once
    assert hierarchy["annotations"] == len(regions) + len(OWN[CMU])
    imported = re.search(r"imported (\d+) objects, replacing (\d+) earlier", log)
    assert imported and int(imported[1]) == tiles + len(regions) and imported[2] == "0"
    # The region's composition as measurements equals the server's, and the log's table shows the same numbers.
    [region] = regions
    [annotation] = _hq_regions(hierarchy)
    for share in region["classes"]:
        assert annotation["measurements"][f"{share['code']} %"] == pytest.approx(share["percent"], abs=1e-4)
        assert annotation["measurements"][f"{share['code']} tiles"] == int(share.get("tiles", 0))
    [row] = [line for line in log.splitlines() if line.startswith(region["name"] + " ")]
    assert row.split()[-7:] == [f"{share['percent']:.1f}" for share in region["classes"]]


def test_analyze_leaves_the_pathologists_annotations_alone_and_a_rerun_replaces_only_its_own(analyzed) -> None:
    first, second = analyzed["first"]["hierarchy"], analyzed["second"]["hierarchy"]
    saved = _image(analyzed["project"], CMU)
    assert _own(first) == _own(second) == _own(saved["hierarchy"]) == _expected_own(CMU)
    # The second run replaced the first's objects one for one: same counts, no duplicates, same nesting.
    log = "\n".join(analyzed["second_log"])
    imported = re.search(r"imported (\d+) objects, replacing (\d+) earlier", log)
    assert imported and imported[1] == imported[2] and "identical earlier analysis" in log
    for key in ("annotations", "detections", "detections_at_root", "detections_nested"):
        assert first[key] == second[key] == saved["hierarchy"][key], key
    assert sorted((a["name"], a["children"], a["measurements"]["HQ tiles"]) for a in _hq_regions(second)) == \
        sorted((a["name"], a["children"], a["measurements"]["HQ tiles"]) for a in _hq_regions(saved["hierarchy"]))
    assert saved["by_type_class"]["annotation"] == {"Tumor": 1, "Stroma": 1, "Necrosis": 1, "HQ Tissue": 1}
    assert saved["objects"] == second["annotations"] + second["detections"]


# ---- HepatoQuant_ImportResults.groovy: results of `hepatoquant analyze` -------------------------------------


@pytest.fixture(scope="module")
def imported(kit, site) -> dict:
    """`hepatoquant analyze --regions` on the generated slide, then ImportResults on its project image (saved)."""
    out = site["base"] / "results"
    regions = site["base"] / "regions.geojson"
    regions.write_text(json.dumps(REGIONS))
    done = subprocess.run(
        [str(HEPATOQUANT), "analyze", str(site["slides"] / SYNTHETIC), "--model", str(site["pack"]), "--regions",
         str(regions), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "HEPATOQUANT_MODELS_DIR": str(site["base"] / "models")})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "synthetic.report.json").read_text())
    run, log = _run(kit, site, SYNTHETIC, "HepatoQuant_ImportResults", save=True, RESULTS_FOLDER=str(out))
    return {"report": report, "run": run, "log": log}


def test_import_results_in_qupath_matches_the_report(imported) -> None:
    report, hierarchy = imported["report"], imported["run"]["hierarchy"]
    composition = report["composition"]
    outside = sum(r["tile_count"] for r in composition["region_classes"] if r["region_class"] == "unassigned")
    _check_nesting(hierarchy, composition["regions"], outside)
    tiles = report["tiles"]["count"]
    assert hierarchy["detections"] == tiles == sum(r["tile_count"] for r in composition["regions"]) + outside > 10
    assert _own(hierarchy) == _expected_own(SYNTHETIC)
    by_name = {a["name"].removeprefix("HepatoQuant: "): a["measurements"] for a in _hq_regions(hierarchy)}
    for region in composition["regions"]:
        measurements = by_name[region["name"]]
        for code, count in region["class_tiles"].items():
            assert measurements[f"{code} tiles"] == count
            if region["class_percent"] is None:
                assert f"{code} %" not in measurements  # no tiles: no percentage, not 0 %
            else:
                assert measurements[f"{code} %"] == pytest.approx(region["class_percent"][code], abs=1e-4)
    empty = next(r for r in composition["regions"] if r["name"] == "empty corner")
    assert empty["tile_count"] == 0 and empty["class_percent"] is None
    assert by_name["empty corner"]["HQ tiles"] == 0

    [message] = [line for line in imported["log"] if "imported" in line]
    objects = len(composition["regions"]) + tiles
    assert re.search(rf"imported {objects} objects from .*synthetic\.geojson, replacing 0 earlier", message)
    rows = {line.split("  ")[0].strip(): line for line in message.splitlines()[1:]}
    assert rows["empty corner"].split() == ["empty", "corner", "Non-tumour", "region", "0.010", "0"]  # blank %, not 0.0
    tumour = composition["regions"][0]
    assert rows["tumour A"].split()[-7:] == [f"{tumour['class_percent'][c]:.1f}" for c in tumour["class_tiles"]]
    assert "no classified tiles" in message


# ---- HepatoQuant_SummaryTable.groovy: one CSV for the project ----------------------------------------------


@pytest.fixture(scope="module")
def summary(kit, site, analyzed, imported) -> dict:
    """SummaryTable run once for the project (after Analyze and ImportResults saved their images), the CSV it
    wrote, and the project as saved."""
    _, log = _run(kit, site, SYNTHETIC, "HepatoQuant_SummaryTable")
    project = kit.read_project(site["project"])
    assert project.returncode == 0, project.stderr[-3000:]
    with open(site["project"] / "hepatoquant-summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"rows": rows, "log": log, "project": project.result}


def test_summary_table_in_qupath_matches_the_reports_and_the_nesting(summary, analyzed, imported) -> None:
    rows = summary["rows"]
    for image in (CMU, SYNTHETIC):  # as saved by Analyze and ImportResults: the pathologist's own still there
        assert _own(_image(summary["project"], image)["hierarchy"]) == _expected_own(image)
    assert [(r["image"], r["region"]) for r in rows][:1] == [(CMU, "Whole tissue")]  # images in project order
    assert sorted((r["image"], r["region"]) for r in rows[1:]) == [
        (SYNTHETIC, "background liver"), (SYNTHETIC, "empty corner"), (SYNTHETIC, "tumour A")]
    codes = ["TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE"]
    assert list(rows[0])[6:] == [f"{c}_{k}" for c in codes for k in ("pct", "tiles")]
    # Tiles per row: what QuPath nests under the region, as saved in the project.
    for row in rows:
        [annotation] = [a for a in _image(summary["project"], row["image"])["hierarchy"]["by_annotation"]
                        if a["name"] == "HepatoQuant: " + row["region"]]
        assert int(row["tiles"]) == annotation["children"], row
    # Composition: the server's for the CMU image, the report's for the generated one.
    [server_region] = analyzed["result"]["regions"]
    assert int(rows[0]["tiles"]) == int(server_region["tileCount"])
    for share in server_region["classes"]:
        assert float(rows[0][f"{share['code']}_pct"]) == pytest.approx(share["percent"], abs=1e-4)
        assert int(rows[0][f"{share['code']}_tiles"]) == int(share.get("tiles", 0))
    by_region = {row["region"]: row for row in rows[1:]}
    for region in imported["report"]["composition"]["regions"]:
        row = by_region[region["name"]]
        assert int(row["tiles"]) == region["tile_count"]
        assert float(row["region_area_mm2"]) == pytest.approx(region["region_area_mm2"], rel=1e-6)
        for code in codes:
            assert int(row[f"{code}_tiles"]) == region["class_tiles"][code]
            if region["class_percent"] is None:
                assert row[f"{code}_pct"] == ""  # no data: an empty cell, never 0
            else:
                assert float(row[f"{code}_pct"]) == pytest.approx(region["class_percent"][code], abs=1e-4)
    assert by_region["empty corner"]["tiles"] == "0"
    assert by_region["empty corner"]["NOR_pct"] == "" and by_region["empty corner"]["NOR_tiles"] == "0"
    assert any("wrote 4 region row(s) of 2 image(s)" in line for line in summary["log"])


# ---- HepatoQuant_ExportAnnotations.groovy: the pathologist's annotations as GeoJSON -------------------------


def test_export_annotations_in_qupath_reads_back_in_qupath_and_python(kit, site, analyzed) -> None:
    # "HQ Tissue" is asked for too: HepatoQuant's own region must still never be exported.
    _, log = _run(kit, site, CMU, "HepatoQuant_ExportAnnotations", EXPORT_CLASSES=["tumor", "Stroma", "HQ Tissue"])
    exported = site["project"] / "hepatoquant-annotations" / "CMU-1-Small-Region.geojson"
    assert any("exported 2 annotation(s)" in line for line in log)
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temporary left behind

    read = kit.read_geojson(exported)
    assert read.returncode == 0 and read.result["read"], read.stdout[-3000:]
    assert read.result["objects"] == 2 and read.result["by_type"] == {"annotation": 2}
    assert read.result["by_class"] == {"Tumor": 1, "Stroma": 1}
    assert sorted((a["name"], a["class"], a["measurements"]) for a in read.result["hierarchy"]["by_annotation"]) == [
        ("my stroma", "Stroma", {"my score": 2.25}), ("my tumour outline", "Tumor", {"my score": 1.5})]

    objects = read_qupath_geojson(exported)
    assert sorted((o.name, o.class_names, dict(o.measurements), o.object_type) for o in objects) == [
        ("my stroma", ("Stroma",), {"my score": 2.25}, "annotation"),
        ("my tumour outline", ("Tumor",), {"my score": 1.5}, "annotation")]
    bounds = {o.name: tuple(round(v) for v in o.geometry.bounds) for o in objects}
    assert bounds == {name: box for name, _, box, _ in OWN[CMU] if name in bounds}
