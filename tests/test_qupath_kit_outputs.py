"""Every kind of GeoJSON the server writes, read by QuPath 0.6.0's own code: the counts agree everywhere.

For each run (whole tissue, ``--regions`` with overlapping annotations, segmenter regions, ``--tile-object
tile``; on the real CMU and TCGA slides and a generated one) QuPath's ``PathIO.readObjects`` must read the file,
and after its ``addObjects`` + ``resolveHierarchy()`` every tile must sit under the region the report counts it
in: per region, the tiles QuPath nests = the report's ``tile_count`` = the ``HQ tiles`` measurement, class by
class; the tiles QuPath leaves at the root = the report's tiles outside every region; and the CSV row holds the
same numbers. A region without tiles carries no percentage measurement (no data, not 0 %).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hepatoquant_client.classes import TISSUE_CLASSES
from hepatoquant_client.qupath_geojson import read_qupath_geojson

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ModelPack, ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack

QUPATH_NAME = {c.code: c.qupath_name for c in TISSUE_CLASSES}


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelPack]:
    models = tmp_path_factory.mktemp("kit-models")
    return {
        "classifier": ensure_demo_pack(models, encoder="test_vit_micro"),
        "segmenter": ensure_demo_segmentation_pack(models),
    }


def _overlapping_regions(path: Path) -> Path:
    """Annotations on the generated slide that overlap: a tumour inside a non-tumour square, two tumour
    annotations partly overlapping, and a small one holding no tile centre."""

    def feature(name: str, cls: str, ring: list[list[float]]) -> dict:
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                "properties": {"objectType": "annotation", "name": name,
                               "classification": {"name": cls, "color": [200, 0, 0]}}}

    def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    disc = [[600 + 250 * math.cos(2 * math.pi * i / 40), 900 + 280 * math.sin(2 * math.pi * i / 40)] for i in range(40)]
    features = [
        feature("section", "Non-tumor", square(250, 450, 1700, 1600)),
        feature("tumour A", "Tumor", disc),
        feature("tumour B", "Tumor", square(700, 700, 1100, 1150)),  # partly over tumour A
        feature("speck", "Non-tumor", square(1500, 300, 1530, 330)),  # no tile centre in it
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


CASES = {
    "cmu-whole-tissue": ("cmu", {}, False),
    "cmu-segmenter": ("cmu", {}, True),
    "tcga-whole-tissue-mpp": ("tcga", {"mpp_override_um_px": 0.5}, False),
    "tcga-segmenter-tile-objects": ("tcga", {"mpp_override_um_px": 0.5, "tile_object_type": "tile"}, True),
    "generated-overlapping-regions": ("generated", {"regions": True}, False),
    "generated-segmenter": ("generated", {}, True),
}


@pytest.fixture(scope="module")
def analysed(packs, cmu_slide: Path, tcga_slide: Path, synthetic_slide: Path,
             tmp_path_factory: pytest.TempPathFactory, qupath_kit):
    """``analysed(case)``: the case analysed, written, and read by QuPath (once per case for the module)."""
    done: dict[str, dict] = {}

    def analyse(case: str) -> dict:
        if case in done:
            return done[case]
        slide_key, option_values, with_segmenter = CASES[case]
        slide = {"cmu": cmu_slide, "tcga": tcga_slide, "generated": synthetic_slide}[slide_key]
        out = tmp_path_factory.mktemp(case)
        option_values = dict(option_values)
        if option_values.pop("regions", False):
            option_values["regions_path"] = _overlapping_regions(out / "regions.geojson")
        options = AnalysisOptions(num_workers=1, **option_values)
        result = analyze_slide(slide, packs["classifier"], options,
                               segmenter=packs["segmenter"] if with_segmenter else None)
        paths = write_outputs(result, out / "results")
        read = qupath_kit.read_geojson(paths.geojson)
        assert read.returncode == 0 and read.result.get("read"), (read.stdout[-2000:], read.stderr[-2000:])
        with paths.cohort_csv.open(newline="") as handle:
            row = next(csv.DictReader(handle))
        done[case] = {"name": case, "report": json.loads(paths.report.read_text()), "qupath": read.result,
                      "geojson": paths.geojson, "csv": row, "tile_type": options.tile_object_type}
        return done[case]

    return analyse


@pytest.fixture(params=list(CASES))
def run(request: pytest.FixtureRequest, analysed) -> dict:
    return analysed(request.param)


def test_qupath_reads_every_object(run) -> None:
    report, qupath = run["report"], run["qupath"]
    regions = report["composition"]["regions"]
    tiles = report["tiles"]["count"]
    assert tiles > 0 and regions
    artefacts = len(report["artefacts"])
    assert qupath["objects"] == len(regions) + artefacts + tiles
    assert qupath["by_type"] == {"annotation": len(regions) + artefacts, run["tile_type"]: tiles}


def test_qupath_nests_each_tile_under_the_region_that_counts_it(run) -> None:
    report, hierarchy = run["report"], run["qupath"]["hierarchy"]
    nested = {entry["name"]: entry for entry in hierarchy["by_annotation"] if not entry["class"].startswith("HQ Artefact")}
    assert len(nested) == len(report["composition"]["regions"]), "region names must be unique"
    for region in report["composition"]["regions"]:
        entry = nested["HepatoQuant: " + region["name"]]
        by_class = {QUPATH_NAME[code]: n for code, n in region["class_tiles"].items() if n}
        nested_tiles = sum(n for kind, n in entry["children_by_type"].items() if kind != "annotation")
        assert nested_tiles == region["tile_count"] == entry["measurements"]["HQ tiles"], (run["name"], region["name"])
        tile_classes = {name: n for name, n in entry["children_by_class"].items() if not name.startswith("HQ Artefact")}
        assert tile_classes == by_class, (run["name"], region["name"])
        for code, count in region["class_tiles"].items():
            assert entry["measurements"][f"{code} tiles"] == count
    outside = report["tiles"]["outside_regions"]["count"]
    assert hierarchy["detections_at_root"] == outside
    unassigned = [c for c in report["composition"]["region_classes"] if c["region_class"] == "unassigned"]
    assert (unassigned[0]["tile_count"] if unassigned else 0) == outside
    assert hierarchy["detections_nested"] + outside == report["tiles"]["count"]


def test_a_regions_tile_area_fits_in_the_region_grown_by_half_a_tile(run) -> None:
    """Region area and tile area stay consistent: every counted tile has its centre in the region, so the
    (disjoint) tiles lie in the region grown by half a tile and their area cannot exceed that shape's (on CMU the
    old largest-overlap rule gave a 0.127 mm^2 region 0.208 mm^2 of tiles)."""
    report = run["report"]
    side_px = report["tiles"]["size_level0_px"]
    mm2_per_px = (report["slide"]["mpp_um_px"] / 1000) ** 2
    regions = {o.name: o for o in read_qupath_geojson(run["geojson"]) if o.object_type == "annotation"}
    for region in report["composition"]["regions"]:
        grown = regions["HepatoQuant: " + region["name"]].geometry.buffer(side_px / 2, join_style="mitre")
        assert region["tile_area_mm2"] <= grown.area * mm2_per_px * (1 + 1e-9), region["name"]


def test_the_csv_row_and_the_report_hold_the_same_counts(run) -> None:
    report, row = run["report"], run["csv"]
    assert int(row["tile_count"]) == report["tiles"]["count"]
    for entry in report["composition"]["region_classes"]:
        prefix = entry["region_class"]
        assert int(row[f"{prefix}_tiles"]) == entry["tile_count"]
        for code in QUPATH_NAME:
            cell = row[f"{prefix}_{code}_pct"]
            if entry["class_percent"] is None:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(entry["class_percent"][code], abs=1e-4)


def test_a_region_without_tiles_has_no_percentages_in_qupath(run) -> None:
    report = run["report"]
    nested = {entry["name"]: entry for entry in run["qupath"]["hierarchy"]["by_annotation"]}
    for region in report["composition"]["regions"]:
        names = set(nested["HepatoQuant: " + region["name"]]["measurements"])
        percent_names = {f"{code} %" for code in QUPATH_NAME}
        if region["tile_count"]:
            assert percent_names <= names and region["class_percent"] is not None and region["no_data"] is None
        else:
            assert not percent_names & names and region["class_percent"] is None and region["no_data"]


def test_overlapping_annotations_are_counted_once_and_a_speck_is_no_data(analysed) -> None:
    report = analysed("generated-overlapping-regions")["report"]
    regions = {r["name"]: r for r in report["composition"]["regions"]}
    assert set(regions) == {"section", "tumour A", "tumour B", "speck"}
    assert regions["speck"]["tile_count"] == 0 and regions["speck"]["class_percent"] is None
    assert all(regions[n]["tile_count"] > 0 for n in ("section", "tumour A", "tumour B"))
    assert any("overlapping annotations" in w for w in report["warnings"])
