"""`hepatoquant-client project` and `import-geojson` end to end, checked with QuPath 0.6.0's own code (issue 15).

A live server reads tiled TIFF copies of the team's two real slides (CMU-1-Small-Region, 0.499 um/px, and the
TCGA slide, which has no MPP: the client sends --mpp 0.5). A QuPath project made with paquo holds FLAT TIFF copies
of the same slides (QuPath's ImageJ server opens those; the kit has no OpenSlide), each with a pathologist's own
annotation (with a measurement) and detection. The client's `--map` maps the project's image folder to the server's.

Then QuPath itself (the kit's tools, in subprocesses: no JVM ever starts in the pytest process) must find, after
each run: every tile the server made, nested exactly where QuPath's own ``resolveHierarchy()`` nests it (compared
with the kit reading the server's flat GeoJSON), each region's ``HQ tiles`` equal to the tiles QuPath nests
under it, the pathologist's objects untouched, no duplicates after a second run, and images that still open.

One server, one project, one pass of the CLI runs for the whole module: about ten JVM starts in all.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hepatoquant_client import Client
from hepatoquant_client.classes import TISSUE_CLASSES
from hepatoquant_client.hepatoquant_objects import REGION_NAME_PREFIX, TILE_COUNT_MEASUREMENT

TOKEN = "kit-project-s3cret"
CLI = Path(sys.executable).with_name("hepatoquant-client")
MPP = 0.5  # sent for the TCGA slide, which has no pixel size in its metadata
HQ_TILE_CLASSES = {c.qupath_name for c in TISSUE_CLASSES}
PATHOLOGIST_NOTE = "pathologist note"
PATHOLOGIST_CLASS = "Pathologist ROI"
PATHOLOGIST_MEASUREMENTS = {"my score": 1.5, "my count": 7.0}
TUMOUR_CLASS = "Pathologist tumour"
MISSING = "not-on-the-server.tif"
PATHOLOGIST_EXPORT = (Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "qupath"
                      / "qupath-0.6.0-export-featurecollection.geojson")
# The pathologist's regions, sent with --region-class: on every image a note box (its edges cut tiles); on the CMU
# image also a smaller tumour box that overlaps it without lying inside it (where QuPath gives the larger box the
# tiles of the overlap). Level-0 pixels.
NOTE_BOX = (500, 900, 1500, 2100)
TUMOUR_BOX = (1100, 1700, 1800, 2700)


def _level0(slide: Path) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(slide)) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))


def _write_copies(slide: Path, name: str, server_root: Path, qupath_images: Path, mpp: float | None) -> None:
    """A tiled TIFF for the server (OpenSlide's generic TIFF; MPP in the resolution tags when known) and a flat,
    strip-based TIFF for QuPath, with the same name so that one --map covers both."""
    import tifffile

    pixels = _level0(slide)
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(server_root / name, pixels, photometric="rgb", tile=(256, 256), **resolution)
    tifffile.imwrite(qupath_images / name, pixels, photometric="rgb")


def _run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _read(kit, folder: Path) -> dict:
    run = kit.read_project(folder, open_images=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return {image["name"]: image for image in run.result["images"]}


_MAKE_PROJECT = """
import json, sys
from paquo.classes import QuPathPathClass
from paquo.images import QuPathImageType
from paquo.projects import QuPathProject
from shapely.geometry import box
folder, images, note, cls, measurements, note_box, tumour_cls, tumour_box = json.loads(sys.argv[1])
with QuPathProject(folder, mode="x") as project:
    mine, tumour = QuPathPathClass(cls, color=(20, 120, 220)), QuPathPathClass(tumour_cls, color=(220, 20, 20))
    project.path_classes = [mine, tumour]
    for index, image in enumerate(images):
        entry = project.add_image(image, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        note_object = entry.hierarchy.add_annotation(roi=box(*note_box), path_class=mine, measurements=measurements)
        note_object.name = note
        if index == 0:
            entry.hierarchy.add_annotation(roi=box(*tumour_box), path_class=tumour).name = "my tumour"
        entry.hierarchy.add_detection(roi=box(5, 5, 25, 25), path_class=mine, measurements={"my area": 400.0})
print(json.dumps({"made": [str(i) for i in images]}))
"""

_REOPEN_WITH_PAQUO = """
import json, sys
from paquo.projects import QuPathProject
with QuPathProject(sys.argv[1], mode="r") as project:
    print(json.dumps({e.image_name: {"annotations": len(e.hierarchy.annotations),
                                     "detections": len(e.hierarchy.detections)} for e in project.images}))
"""


def _kit_python(kit, code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=kit.env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path, tcga_slide: Path, qupath_kit) -> dict:
    """Everything the module checks: built once (server, project, two CLI runs, one import, QuPath's readings)."""
    from hepatoquant.model_pack import ensure_demo_pack
    from hepatoquant.service.engine import ServerConfig
    from hepatoquant.service.server import start_server

    base = tmp_path_factory.mktemp("kit_project")
    server_root, qupath_images = base / "server_slides", base / "qupath_images"
    server_root.mkdir()
    qupath_images.mkdir()
    names = {"cmu": "CMU-1-Small-Region.tif", "tcga": "TCGA-CR-7395-01A-01-TS1.tif"}
    _write_copies(cmu_slide, names["cmu"], server_root, qupath_images, mpp=0.499)
    _write_copies(tcga_slide, names["tcga"], server_root, qupath_images, mpp=None)
    # An image the server does not have (mapped, but absent there): it must fail alone and be left as it was.
    import tifffile

    tifffile.imwrite(qupath_images / MISSING, np.full((2200, 1600, 3), 240, np.uint8), photometric="rgb")
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(server_root.resolve(),), state_dir=base / "state", models_dir=models,
                          token=TOKEN)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    target = f"127.0.0.1:{running.grpc_port}"
    try:
        env = dict(qupath_kit.env)
        env["HEPATOQUANT_TOKEN"] = TOKEN
        folder = base / "project"
        made = _kit_python(qupath_kit, _MAKE_PROJECT, json.dumps([
            str(folder), [str(qupath_images / n) for n in [*names.values(), MISSING]], PATHOLOGIST_NOTE,
            PATHOLOGIST_CLASS,
            PATHOLOGIST_MEASUREMENTS, NOTE_BOX, TUMOUR_CLASS, TUMOUR_BOX]))
        assert len(made["made"]) == 3
        before = _read(qupath_kit, folder)

        project_args = ["project", str(folder), "--server", target, "--map", f"{qupath_images}={server_root}",
                        "--mpp", str(MPP), "--region-class", PATHOLOGIST_CLASS, "--region-class", TUMOUR_CLASS,
                        "--tumour-class", TUMOUR_CLASS, "--cohort", str(base / "cohort.csv")]
        first = _run_cli(project_args, env)
        assert first.returncode == 1, first.stdout + first.stderr  # the missing image failed, the others not
        after_first = _read(qupath_kit, folder)

        # The server's own results of the CLI's jobs: what QuPath must show.
        outcomes = {}
        with Client(target, token=TOKEN) as client:
            for job in client.jobs():
                outcome = client.result(job.job_id)
                key = next(k for k, n in names.items() if Path(outcome.report["slide"]["path"]).name == n)
                outcomes[key] = outcome
        assert outcomes.keys() == names.keys()
        resolved = {}
        for key, outcome in outcomes.items():
            path = base / f"{key}.geojson"
            path.write_bytes(outcome.qupath_geojson)
            run = qupath_kit.read_geojson(path)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
            resolved[key] = run.result

        second = _run_cli([project_args[0], str(folder / "project.qpproj"), *project_args[2:]], env)
        assert second.returncode == 1, second.stdout + second.stderr
        after_second = _read(qupath_kit, folder)
        reopened = _kit_python(qupath_kit, _REOPEN_WITH_PAQUO, str(folder))

        imported = _run_cli(["import-geojson", str(folder), names["cmu"], str(base / "cmu.geojson")], env)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        # Refused before anything is written: a pathologist's own file (its objects could never be replaced by a
        # later run) and an image the project does not have.
        refused = {
            "unknown image to analyse": _run_cli([*project_args, "--image", "nope.tif"], env),
            "pathologist file": _run_cli(["import-geojson", str(folder), names["tcga"], str(PATHOLOGIST_EXPORT)], env),
            "unknown image": _run_cli(["import-geojson", str(folder), "nope.tif", str(base / "cmu.geojson")], env),
        }
        exported = {}
        for label, extra in (("all", []), ("tumour", ["--class", TUMOUR_CLASS])):
            out = base / f"exported-{label}"
            run = _run_cli(["export-annotations", str(folder), str(out), *extra], env)
            assert run.returncode == 0, run.stdout + run.stderr
            exported[label] = {f.name: f for f in out.iterdir()}
        after_import = _read(qupath_kit, folder)
        yield {"names": names, "outcomes": outcomes, "resolved": resolved, "before": before,
               "first": first, "second": second, "imported": imported, "after_first": after_first,
               "after_second": after_second, "after_import": after_import, "reopened": reopened,
               "cohort": base / "cohort.csv", "refused": refused, "exported": exported}
    finally:
        running.stop(grace_seconds=1)
        shutil.rmtree(server_root, ignore_errors=True)  # ~100 MB of pixels


def _hq_tiles(image: dict) -> int:
    return sum(n for cls, n in image["by_type_class"].get("detection", {}).items() if cls in HQ_TILE_CLASSES)


def _regions(image: dict) -> dict[str, dict]:
    regions = [a for a in image["hierarchy"]["by_annotation"] if (a["name"] or "").startswith(REGION_NAME_PREFIX)]
    by_name = {a["name"]: a for a in regions}
    assert len(by_name) == len(regions), "HepatoQuant region names repeat"
    return by_name


def _check_written(stand: dict, state: str) -> None:
    """Every tile reached QuPath, nested exactly as QuPath's resolveHierarchy() nests the server's flat output."""
    for key, name in stand["names"].items():
        image, outcome, resolved = stand[state][name], stand["outcomes"][key], stand["resolved"][key]
        tiles = outcome.report["tiles"]["count"]
        assert tiles > 30, (name, tiles)
        assert _hq_tiles(image) == tiles, (state, name, "tiles lost", _hq_tiles(image), tiles)
        mine, qupaths = _regions(image), _regions(resolved)
        assert set(mine) == set(qupaths) and mine, (state, name)
        for region_name, region in mine.items():
            assert region["children"] == qupaths[region_name]["children"], (state, name, region_name)
            assert region["detections_below"] == qupaths[region_name]["detections_below"], (state, name, region_name)
        nested = sum(r["children_by_type"].get("detection", 0) for r in mine.values())
        at_root = resolved["hierarchy"]["detections_at_root"]  # tiles whose centre lies in no region
        assert nested + at_root == tiles and nested > 0, (state, name, nested, at_root, tiles)
        # The pathologist's detection stays at the root beside the tiles no region holds.
        assert image["hierarchy"]["detections_at_root"] == at_root + 1, (state, name)


def test_every_tile_reaches_qupath_nested_as_qupath_nests_it(stand) -> None:
    _check_written(stand, "after_first")
    for name in stand["names"].values():
        assert f"image {name}: wrote " in stand["first"].stderr, stand["first"].stderr


def test_each_regions_tile_count_equals_the_tiles_qupath_nests_under_it(stand) -> None:
    """The issue's requirement: ``HQ tiles`` of a region = what QuPath shows under it. (It holds once the server
    counts a tile in the region containing its centre, QuPath's rule.)"""
    mismatches = []
    for key, name in stand["names"].items():
        for region_name, region in _regions(stand["after_first"][name]).items():
            count = region["measurements"][TILE_COUNT_MEASUREMENT]
            if count != region["detections_below"]:
                mismatches.append((name, region_name, count, region["detections_below"]))
    assert not mismatches, mismatches


def test_the_pathologists_objects_are_untouched(stand) -> None:
    for state in ("before", "after_first", "after_second", "after_import"):
        for key, name in stand["names"].items():
            image = stand[state][name]
            [note] = [a for a in image["hierarchy"]["by_annotation"] if a["name"] == PATHOLOGIST_NOTE]
            assert note["class"] == PATHOLOGIST_CLASS and note["parent"] == "root" and note["children"] == 0
            assert note["measurements"] == PATHOLOGIST_MEASUREMENTS, (state, name)
            assert image["by_type_class"]["detection"][PATHOLOGIST_CLASS] == 1, (state, name)
            assert image["by_type_class"]["annotation"][PATHOLOGIST_CLASS] == 1, (state, name)
            tumours = [a for a in image["hierarchy"]["by_annotation"] if a["name"] == "my tumour"]
            assert [(a["class"], a["children"], a["parent"]) for a in tumours] == (
                [(TUMOUR_CLASS, 0, "root")] if key == "cmu" else []), (state, name)
    before = stand["before"][stand["names"]["cmu"]]
    assert before["objects"] == 3 and before["hierarchy"]["detections_at_root"] == 1


def test_an_image_that_fails_is_left_as_it_was_and_the_others_go_on(stand) -> None:
    for state in ("after_first", "after_second", "after_import"):
        assert stand[state][MISSING]["by_type_class"] == stand["before"][MISSING]["by_type_class"], state
        assert stand[state][MISSING]["hierarchy"] == stand["before"][MISSING]["hierarchy"], state
    for run in (stand["first"], stand["second"]):
        assert f"image {MISSING}: failed, left as it was: NotFoundError" in run.stderr, run.stderr
        assert "1 of 3 image(s) failed" in run.stderr
        assert sum(line.startswith("image ") and ": wrote " in line for line in run.stderr.splitlines()) == 2


def test_a_second_run_replaces_only_hepatoquants_objects(stand) -> None:
    _check_written(stand, "after_second")
    for name in stand["names"].values():
        first, second = stand["after_first"][name], stand["after_second"][name]
        assert second["objects"] == first["objects"] and second["by_type_class"] == first["by_type_class"]
        assert _regions(second).keys() == _regions(first).keys()
    replaced = [line for line in stand["second"].stderr.splitlines() if line.startswith("image ") and "wrote" in line]
    assert len(replaced) == 2
    for line in replaced:  # "image X: wrote N object(s), replaced N"
        written, removed = line.split("wrote ")[1].split(" object(s), replaced ")
        assert int(written) == int(removed) > 30


def test_the_project_reopens_in_qupath_and_paquo(stand) -> None:
    for name in stand["names"].values():
        image = stand["after_second"][name]
        assert image["server"]["class"] == "ImageJServer", image["server"]
        assert image["server"]["width"] > 2000 and image["server"]["height"] > 2900
        counts = stand["reopened"][name]
        assert counts["annotations"] == image["by_type"]["annotation"]
        assert counts["detections"] == image["by_type"]["detection"]


def test_the_tcga_slide_was_analysed_at_the_mpp_sent(stand) -> None:
    tcga, cmu = stand["outcomes"]["tcga"], stand["outcomes"]["cmu"]
    assert tcga.report["slide"]["mpp_um_px"] == pytest.approx(MPP)
    assert cmu.report["slide"]["mpp_um_px"] == pytest.approx(MPP)  # --mpp applies to every image it is given for
    rows = list(csv.DictReader(stand["cohort"].open()))
    assert sorted(r["slide"] for r in rows) == sorted(stand["names"].values())  # the failed image has no row
    for row in rows:
        key = next(k for k, n in stand["names"].items() if n == row["slide"])
        assert int(row["tile_count"]) == stand["outcomes"][key].report["tiles"]["count"]
        assert row["model_status"] == "untrained-demo"


def test_import_geojson_loses_nothing(stand) -> None:
    _check_written(stand, "after_import")
    name = stand["names"]["cmu"]
    assert stand["after_import"][name]["by_type_class"] == stand["after_second"][name]["by_type_class"]
    tiles = stand["outcomes"]["cmu"].report["tiles"]["count"]
    regions = len(_regions(stand["after_import"][name]))
    assert f"wrote {tiles + regions} object(s), replaced {tiles + regions}" in stand["imported"].stderr
    other = stand["names"]["tcga"]  # the other image is left alone
    assert stand["after_import"][other]["by_type_class"] == stand["after_second"][other]["by_type_class"]


def test_unknown_images_and_foreign_files_are_refused_before_anything_is_written(stand) -> None:
    pathologist, unknown = stand["refused"]["pathologist file"], stand["refused"]["unknown image"]
    analyse = stand["refused"]["unknown image to analyse"]
    assert analyse.returncode == 2 and "no image named 'nope.tif'" in analyse.stderr and "wrote" not in analyse.stderr
    assert pathologist.returncode == 2 and "carries no HepatoQuant marker" in pathologist.stderr
    assert unknown.returncode == 2 and "no image named 'nope.tif'" in unknown.stderr
    # Nothing was written: the TCGA image is as the second run left it (checked after both refusals).
    name = stand["names"]["tcga"]
    assert stand["after_import"][name]["hierarchy"] == stand["after_second"][name]["hierarchy"]


def test_export_annotations_writes_the_pathologists_annotations_only(stand) -> None:
    from hepatoquant_client.hepatoquant_objects import is_hepatoquant_object
    from hepatoquant_client.qupath_geojson import read_qupath_geojson

    everything, tumour = stand["exported"]["all"], stand["exported"]["tumour"]
    assert sorted(everything) == sorted(f"{n}.geojson" for n in [*stand["names"].values(), MISSING])
    cmu = read_qupath_geojson(everything[f"{stand['names']['cmu']}.geojson"])
    assert sorted(o.name for o in cmu) == ["my tumour", PATHOLOGIST_NOTE]
    assert not any(is_hepatoquant_object(o) for f in everything.values() for o in read_qupath_geojson(f))
    [note] = [o for o in cmu if o.name == PATHOLOGIST_NOTE]
    assert note.measurements == PATHOLOGIST_MEASUREMENTS and note.class_names == (PATHOLOGIST_CLASS,)
    assert list(tumour) == [f"{stand['names']['cmu']}.geojson"]
    assert [o.name for o in read_qupath_geojson(tumour[f"{stand['names']['cmu']}.geojson"])] == ["my tumour"]
