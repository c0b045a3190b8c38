"""`hepatoquant cohort run`: generated and real slides plus a corrupt one, with the local engine and with Ray on
this machine (2 CPUs): the same results slide for slide, the corrupt slide in the failures table, a second run
skipping everything already complete, bad cohort tables refused before anything runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from hepatoquant.cli import EXIT_SOME_SLIDES_FAILED, main
from hepatoquant.cohort.engines import run_cohort
from hepatoquant.cohort.inputs import read_cohort
from hepatoquant.analysis_request import AnalysisRequest
from hepatoquant.cohort.runner import CohortSettings, is_complete, slide_folder
from hepatoquant.model_pack import ensure_demo_pack

GOOD = ["gen-a", "gen-b", "cmu", "tcga"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path, cmu_slide: Path, tcga_slide: Path) -> Path:
    """A cohort CSV: two generated slides, the two real ones (TCGA has no MPP: given in the table), a corrupt one."""
    base = tmp_path_factory.mktemp("cohort")
    shutil.copy(synthetic_slide, base / "a.tiff")
    shutil.copy(synthetic_slide, base / "b.tiff")
    (base / "broken.svs").write_bytes(cmu_slide.read_bytes()[:20000])  # truncated in transfer
    with (base / "cohort.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "slide", "mpp"])
        writer.writerows([["gen-a", "a.tiff", ""], ["gen-b", "b.tiff", ""], ["cmu", str(cmu_slide), ""],
                          ["broken", "broken.svs", ""], ["tcga", str(tcga_slide), "0.5"]])
    return base / "cohort.csv"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort_models")
    ensure_demo_pack(folder, encoder="test_vit_micro")
    return folder


def _run(cohort: Path, out: Path, models: Path, *extra: str) -> int:
    return main(["--models-dir", str(models), "cohort", "run", str(cohort), "--out", str(out), "--workers", "2",
                 "--tile-size", "300", *extra])  # 300 px tiles: a quarter of the tiles, same code path


@pytest.fixture(scope="module")
def local_run(cohort: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    assert _run(cohort, out, models) == EXIT_SOME_SLIDES_FAILED
    return out


def _features_without_ids(path: Path) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "id"} for f in json.loads(path.read_text())["features"]]


def test_local_engine_analyses_every_good_slide_and_records_the_corrupt_one(local_run: Path) -> None:
    assert all(is_complete(local_run, slide_id) for slide_id in GOOD) and not is_complete(local_run, "broken")
    with open(local_run / "failures.csv", newline="") as handle:
        [failure] = list(csv.DictReader(handle))
    assert failure["slide_id"] == "broken" and "OpenSlide" in failure["error"]
    with open(local_run / "cohort.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["slide"] for r in rows] == ["gen-a", "gen-b", "cmu", "tcga"]  # cohort order, only completed slides
    assert all(int(r["tile_count"]) > 0 for r in rows)
    report = json.loads(next(slide_folder(local_run, "tcga").glob("*.report.json")).read_text())
    assert report["slide"]["mpp_um_px"] == 0.5  # the table's MPP override reached the analysis
    assert not list((local_run / "slides").glob(".*"))  # no temporary folder left behind


def test_the_per_slide_csvs_and_cohort_csv_concatenate(local_run: Path) -> None:
    """One row definition (the client's SlideReport.to_row): the per-slide <slide>.csv rows and cohort.csv share their
    header, and a slide's row is the same in both but for its name (file stem vs cohort id)."""
    cohort_text = (local_run / "cohort.csv").read_text()
    header = cohort_text.splitlines()[0]
    cohort_rows = {row["slide"]: row for row in csv.DictReader(cohort_text.splitlines())}
    for slide_id in GOOD:
        [per_slide] = slide_folder(local_run, slide_id).glob("*.csv")
        lines = per_slide.read_text().splitlines()
        assert lines[0] == header and len(lines) == 2
        [row] = csv.DictReader(lines)
        assert {**row, "slide": slide_id} == cohort_rows[slide_id]


def test_ray_gives_the_same_results_and_a_second_run_skips_what_is_complete(
        local_run: Path, cohort: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    assert _run(cohort, out, models, "--engine", "ray") == EXIT_SOME_SLIDES_FAILED
    assert (out / "cohort.csv").read_text() == (local_run / "cohort.csv").read_text()
    assert (out / "failures.csv").read_text() == (local_run / "failures.csv").read_text()
    for slide_id in GOOD:  # slide for slide: every object the same (QuPath object ids are fresh UUIDs per run)
        [geojson] = slide_folder(out, slide_id).glob("*.geojson")
        assert _features_without_ids(geojson) == _features_without_ids(slide_folder(local_run, slide_id) / geojson.name)

    shutil.rmtree(slide_folder(out, "gen-b"))
    (slide_folder(out, "gen-b")).mkdir()  # an incomplete folder (no report) never counts as complete
    seen = []
    settings = CohortSettings(AnalysisRequest(model="demo", segmenter_model="none", tile_size_px=300), models_dir=str(models))
    outcomes = run_cohort(read_cohort(cohort), settings, out, engine="ray", workers=2, on_outcome=seen.append)
    assert sorted(o.slide_id for o in seen if o.skipped) == ["cmu", "gen-a", "tcga"]
    assert outcomes["gen-b"].ok and not outcomes["gen-b"].skipped and is_complete(out, "gen-b")
    assert not outcomes["broken"].ok


def test_bad_cohort_tables_are_refused_before_anything_runs(tmp_path: Path, models: Path, capsys) -> None:
    cases = {
        "no_slide_column.csv": "path\na.svs\n",
        "repeated_id.csv": "slide,slide_id\na.svs,x\nb.svs,x\n",
        "bad_mpp.csv": "slide,mpp\na.svs,fast\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["--models-dir", str(models), "cohort", "run", str(tmp_path / name), "--out",
                     str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()
    errors = capsys.readouterr().err
    assert "no 'slide' column" in errors and "appears twice" in errors and "'fast' is not a positive number" in errors


def test_outputs_at_an_fsspec_url_count_only_once_complete(cohort: Path, models: Path, tmp_path: Path,
                                                          local_run: Path) -> None:
    """file:// stands in for s3:// and the like: uploaded files, then the marker; no marker, not complete."""
    items = [i for i in read_cohort(cohort) if i.slide_id in ("gen-a", "broken")]
    url = (tmp_path / "bucket").as_uri()
    settings = CohortSettings(AnalysisRequest(model="demo", segmenter_model="none", tile_size_px=300), models_dir=str(models))
    outcomes = run_cohort(items, settings, url, engine="local", workers=1)
    assert outcomes["gen-a"].ok and not outcomes["broken"].ok
    from hepatoquant.cohort.runner import write_tables

    written = write_tables(items, outcomes, url)
    assert written["cohort"] == f"{url}/cohort.csv"
    uploaded = tmp_path / "bucket" / "slides" / "gen-a"
    assert (uploaded / ".complete").is_file()
    [geojson] = uploaded.glob("*.geojson")
    assert _features_without_ids(geojson) == _features_without_ids(slide_folder(local_run, "gen-a") / geojson.name)
    assert (tmp_path / "bucket" / "cohort.csv").read_text().splitlines()[1] == \
        (local_run / "cohort.csv").read_text().splitlines()[1]  # gen-a's row, as the folder run wrote it
    (uploaded / ".complete").unlink()  # as if the upload had stopped before the marker
    assert not is_complete(url, "gen-a")


def test_a_slide_counted_under_another_report_schema_is_analysed_again(local_run: Path, tmp_path: Path) -> None:
    """Resuming a cohort made before the counting changed (report schema < 2.0) must not keep the old counts
    beside new ones in one table: such a slide is not complete."""
    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    assert is_complete(out, "gen-a")
    [report] = slide_folder(out, "gen-a").glob("*.report.json")
    old = json.loads(report.read_text())
    old["report_schema_version"] = "1.1"
    report.write_text(json.dumps(old))
    assert not is_complete(out, "gen-a") and is_complete(out, "gen-b")
    url = (tmp_path / "bucket").as_uri()
    (tmp_path / "bucket" / "slides" / "gen-a").mkdir(parents=True)
    (tmp_path / "bucket" / "slides" / "gen-a" / ".complete").write_text("complete\n")  # an older marker
    assert not is_complete(url, "gen-a")


def test_cohort_run_backend_reaches_each_slides_report(synthetic_slide: Path, models: Path, tmp_path: Path) -> None:
    """`cohort run --backend` and `--readers` are the run's choice for every slide (default auto: OpenVINO and
    reader threads on a CPU)."""
    (tmp_path / "cohort.csv").write_text(f"slide_id,slide\ngen,{synthetic_slide}\n")
    for flags, expected, readers in (([], "openvino", "threads"),
                                     (["--backend", "torch", "--readers", "processes"], "torch", "processes")):
        out = tmp_path / f"out-{expected}"
        assert main(["--models-dir", str(models), "cohort", "run", str(tmp_path / "cohort.csv"), "--out", str(out),
                     "--tile-size", "300", *flags]) == 0
        [report] = (out / "slides" / "gen").glob("*.report.json")
        parameters = json.loads(report.read_text())["parameters"]
        assert (parameters["backend"], parameters["readers"]) == (expected, readers)
