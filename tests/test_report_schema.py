"""The report's JSON Schema (``hepatoquant/schemas/report.schema.json``, shipped with the package; issue 18) holds
for every kind of report an analysis writes, and refuses what a program reading reports must not meet."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.outputs.report import REPORT_SCHEMA_PATH, REPORT_SCHEMA_VERSION, validate_report
from hepatoquant.qc_slides import QCSlideSpec, write_qc_slide
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("schema-models")
    return (ensure_demo_pack(models, encoder="test_vit_micro"),
            ensure_demo_segmentation_pack(models, encoder="test_vit_micro"))


def _written_report(slide: Path, pack, options: AnalysisOptions, out: Path, segmenter=None) -> dict:
    paths = write_outputs(analyze_slide(slide, pack, options, segmenter=segmenter), out)
    return json.loads(paths.report.read_text())


def test_the_schema_is_the_version_the_code_writes() -> None:
    schema = json.loads(REPORT_SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["report_schema_version"]["const"] == REPORT_SCHEMA_VERSION


def test_every_kind_of_report_follows_the_schema(packs, cmu_slide: Path, tcga_slide: Path, synthetic_slide: Path,
                                                 synthetic_regions_geojson: str, testdata: Path, tmp_path: Path) -> None:
    classifier, segmenter = packs
    regions = tmp_path / "regions.geojson"
    regions.write_text(synthetic_regions_geojson)
    qc = write_qc_slide(tmp_path / "qc.tiff", QCSlideSpec(testdata=testdata))
    reports = {
        "cmu, whole tissue": _written_report(cmu_slide, classifier, AnalysisOptions(), tmp_path / "a"),
        "tcga, --mpp, segmenter": _written_report(tcga_slide, classifier, AnalysisOptions(mpp_override_um_px=0.5),
                                                  tmp_path / "b", segmenter),
        "generated, regions file": _written_report(synthetic_slide, classifier,
                                                   AnalysisOptions(regions_path=regions), tmp_path / "c"),
        "qc slide, pen ink": _written_report(tmp_path / "qc.tiff", classifier, AnalysisOptions(), tmp_path / "d"),
    }
    for name, report in reports.items():
        validate_report(report)  # raises naming the field
    assert reports["qc slide, pen ink"]["artefacts"]["pen"]["area_mm2"] > 0 and qc.pen.area > 0
    assert reports["tcga, --mpp, segmenter"]["segmentation"] is not None


def test_the_schema_refuses_what_readers_must_not_meet(packs, synthetic_slide: Path, tmp_path: Path) -> None:
    report = _written_report(synthetic_slide, packs[0], AnalysisOptions(), tmp_path / "out")
    broken = []
    missing = copy.deepcopy(report)
    del missing["composition"]
    broken.append(missing)
    zero_not_null = copy.deepcopy(report)  # a region without tiles has no composition, never 0 %
    zero_not_null["composition"]["regions"][0]["class_percent"] = {"TUM": 120.0}
    broken.append(zero_not_null)
    unknown_class = copy.deepcopy(report)
    unknown_class["composition"]["region_classes"][0]["class_tiles"]["XYZ"] = 3
    broken.append(unknown_class)
    other_version = dict(report, report_schema_version="1.0")
    broken.append(other_version)
    for bad in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate_report(bad)
