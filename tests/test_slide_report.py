"""The typed result (issue 18): :class:`SlideReport` reads a written report and gives the report, the API's result
message and the cohort row from one object; the server's GetResult and every cohort table come from it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hepatoquant_client.results import AnalysisOutcome
from hepatoquant_client.errors import ReportFormatError
from hepatoquant_client.slide_report import SlideReport, cohort_columns

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.service.convert import result_to_proto
from hepatoquant.service.status import status_name_for


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path, synthetic_regions_geojson: str):
    """A real analysis's outputs: user regions (tumour and non-tumour) on the generated slide."""
    folder = tmp_path_factory.mktemp("slide-report")
    regions = folder / "regions.geojson"
    regions.write_text(synthetic_regions_geojson)
    pack = ensure_demo_pack(folder / "models", encoder="test_vit_micro")
    paths = write_outputs(analyze_slide(synthetic_slide, pack, AnalysisOptions(regions_path=regions)), folder / "out")
    return paths


def test_to_report_gives_back_the_report_as_written(written) -> None:
    report = json.loads(written.report.read_text())
    typed = SlideReport.from_json(written.report.read_text())
    assert typed.to_report() == report
    copy_of = typed.to_report()
    copy_of["composition"]["regions"].clear()
    assert typed.to_report() == report  # a copy: changing it changes nothing


def test_to_proto_carries_every_number_of_the_report(written) -> None:
    """Read field by field from the report JSON, not through SlideReport: a region without tiles has no
    percent (unset, not 0), unassigned tiles have no polygon area (0 in the message), headline indicators only
    where the region class has tiles."""
    text = written.report.read_text()
    report = json.loads(text)
    message = SlideReport.from_json(text).to_proto(
        job_id="j1", report_json=text, qupath_geojson=b"g", cohort_csv=b"c", overlay_png=b"o", slide_stem="synthetic")
    assert message.job_id == "j1" and message.report_json == text and message.slide_stem == "synthetic"
    assert (message.qupath_geojson, message.cohort_csv, message.overlay_png) == (b"g", b"c", b"o")
    assert message.model_status == report["model_status"] == "untrained-demo"
    assert list(message.warnings) == report["warnings"]
    for key in ("regions", "region_classes"):
        entries, sent = report["composition"][key], getattr(message, key)
        assert len(sent) == len(entries) > 1
        for entry, region in zip(entries, sent):
            assert (region.name, region.region_class, region.source) == (entry["name"], entry["region_class"], entry["source"])
            assert region.region_area_mm2 == (entry["region_area_mm2"] or 0.0)
            assert (region.tile_count, region.tile_area_mm2) == (entry["tile_count"], entry["tile_area_mm2"])
            assert [c.code for c in region.classes] == list(entry["class_tiles"])
            for share in region.classes:
                assert share.tiles == entry["class_tiles"][share.code]
                assert share.area_mm2 == entry["class_area_mm2"][share.code]
                if entry["class_percent"] is None:
                    assert not share.HasField("percent")
                else:
                    assert share.percent == entry["class_percent"][share.code]
    expected = {f"{rc}/{code}": v for rc, values in report["composition"]["headline_indicators_percent"].items()
                for code, v in values.items() if v is not None}
    assert dict(message.headline_indicators_percent) == expected and expected


def test_a_region_without_tiles_keeps_no_percent_through_the_message(written) -> None:
    report = json.loads(written.report.read_text())
    entry = report["composition"]["regions"][0]
    entry.update(tile_count=0, tile_area_mm2=0.0, class_percent=None,
                 class_tiles=dict.fromkeys(entry["class_tiles"], 0), class_area_mm2=dict.fromkeys(entry["class_tiles"], 0.0))
    message = SlideReport.from_report(report).to_proto(
        job_id="j", report_json="{}", qupath_geojson=b"", cohort_csv=b"", overlay_png=b"", slide_stem="s")
    assert not any(c.HasField("percent") for c in message.regions[0].classes)
    outcome = AnalysisOutcome.from_proto(message)
    assert all(c.percent is None for c in outcome.regions[0].classes)


def test_to_row_is_the_per_slide_csv_and_the_outcomes_row(written) -> None:
    typed = SlideReport.from_json(written.report.read_text())
    row = typed.to_row(slide="synthetic")
    assert list(row) == cohort_columns()
    [on_disk] = csv.DictReader(written.cohort_csv.read_text().splitlines())
    assert {k: "" if v is None else str(v) for k, v in row.items()} == on_disk
    assert row["tumour_tiles"] > 0 and row["non_tumour_tiles"] > 0
    message = result_to_proto("job-7", written.report.parent)
    outcome = AnalysisOutcome.from_proto(message)
    assert outcome.to_row() == {**row, "job_id": "job-7"}  # named by the slide's stem, with the job id


def test_getresult_reads_the_stored_outputs_into_the_message(written) -> None:
    message = result_to_proto("job-1", written.report.parent)
    assert message.report_json == written.report.read_text()
    assert message.qupath_geojson == written.geojson.read_bytes()
    assert message.cohort_csv == written.cohort_csv.read_bytes()
    assert message.overlay_png == written.overlay_png.read_bytes()
    assert message.slide_stem == "synthetic"


@pytest.mark.parametrize("damage", ["truncated", "no composition", "not an object", "percent as text"])
def test_a_damaged_report_is_a_clear_data_loss_error(written, tmp_path: Path, damage: str) -> None:
    text = written.report.read_text()
    report = json.loads(text)
    if damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "no composition":
        del report["composition"]
        text = json.dumps(report)
    elif damage == "not an object":
        text = "[1, 2]"
    else:
        report["composition"]["regions"][0]["class_percent"] = dict.fromkeys(report["composition"]["regions"][0]["class_tiles"], "many")
        text = json.dumps(report)
    folder = tmp_path / "job"
    folder.mkdir()
    for path in (written.geojson, written.cohort_csv, written.overlay_png):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / written.report.name).write_text(text)
    with pytest.raises(ReportFormatError, match="the report of job job-9") as caught:
        result_to_proto("job-9", folder)
    assert str(folder) not in str(caught.value)  # names the job, not the server's folders
    assert status_name_for(caught.value) == "DATA_LOSS"
