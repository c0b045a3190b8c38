"""Artefacts are named, not hidden; each tile carries its quality; blurred tiles are left out and counted.

The artefact plumbing (report, overlay, QuPath annotations, tiles left out) is checked here with an artefact area
placed on the generated slide, whatever detector found it: the detector itself is checked in test_tissue_qc.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from hepatoquant_client.qupath_geojson import read_qupath_geojson, to_feature
from shapely.geometry import MultiPolygon, box

from hepatoquant import analysis
from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ModelPack, ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.slide import Slide
from hepatoquant.tile_reader import focus_score
from hepatoquant.tiling import TileSpec, build_tile_grid
from hepatoquant.tissue import detect_tissue

PEN = MultiPolygon([box(300, 700, 700, 760)])  # a pen line across the generated slide's tumour ellipse
REAL_DETECT_TISSUE = analysis.detect_tissue


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> ModelPack:
    return ensure_demo_pack(tmp_path_factory.mktemp("artefact-models"), encoder="test_vit_micro")


@pytest.fixture
def with_pen(monkeypatch: pytest.MonkeyPatch):
    """The slide's tissue detection, plus a pen stroke where there is tissue."""
    real = analysis.detect_tissue

    def detect(slide, params):
        tissue = real(slide, params)
        return dataclasses.replace(tissue, artefacts={"pen": PEN})

    monkeypatch.setattr(analysis, "detect_tissue", detect)


def _analyse(slide: Path, pack: ModelPack, out: Path, **options) -> tuple[dict, list, Path]:
    result = analyze_slide(slide, pack, AnalysisOptions(num_workers=1, **options))
    paths = write_outputs(result, out)
    return json.loads(paths.report.read_text()), read_qupath_geojson(paths.geojson), paths.geojson


def _tiles(objects: list) -> list:
    return [o for o in objects if o.object_type in ("detection", "tile")]


def test_tiles_touching_an_artefact_are_left_out_counted_and_the_artefact_is_a_qupath_annotation(
    with_pen, synthetic_slide: Path, pack: ModelPack, tmp_path: Path, qupath_kit
) -> None:
    kept_report, kept_objects, _ = _analyse(synthetic_slide, pack, tmp_path / "kept", keep_artefacts=True, min_focus=0)
    report, objects, geojson = _analyse(synthetic_slide, pack, tmp_path / "default", min_focus=0)

    on_pen = [t for t in _tiles(kept_objects) if t.geometry.intersects(PEN) and not t.geometry.touches(PEN)]
    assert on_pen, "the pen stroke must lie on tiled tissue for this test to mean anything"
    assert not [t for t in _tiles(objects) if t.geometry.intersects(PEN) and not t.geometry.touches(PEN)]
    assert report["tiles"]["excluded"] == {"pen": len(on_pen)} and kept_report["tiles"]["excluded"] == {}
    assert report["tiles"]["count"] == kept_report["tiles"]["count"] - len(on_pen)
    assert any("on pen" in w for w in report["warnings"])

    assert report["artefacts"]["pen"]["area_mm2"] == pytest.approx(PEN.area * 0.25 / 1e6)
    assert report["artefacts"]["pen"]["share_of_slide"] == pytest.approx(PEN.area / 2048**2)
    [pen] = [o for o in objects if o.class_names[:1] == ("HQ Artefact",)]
    assert pen.class_names == ("HQ Artefact", "pen") and pen.object_type == "annotation"
    assert shapely.equals(pen.geometry, PEN) and pen.metadata["hepatoquant"] == "artefact"

    read = qupath_kit.read_geojson(geojson)  # QuPath reads it; the artefact holds no tile; counts still agree
    assert read.returncode == 0 and read.result["class_colours"].get("HQ Artefact: pen") is not None, read.stdout[-800:]
    [artefact] = [a for a in read.result["hierarchy"]["by_annotation"] if a["class"] == "HQ Artefact: pen"]
    assert artefact["children"] == 0
    for region in report["composition"]["regions"]:
        [entry] = [a for a in read.result["hierarchy"]["by_annotation"] if a["name"] == "HepatoQuant: " + region["name"]]
        assert entry["children_by_type"].get("detection", 0) == region["tile_count"] == entry["measurements"]["HQ tiles"]


def test_the_overlay_shows_the_artefact(with_pen, synthetic_slide: Path, pack: ModelPack, tmp_path: Path) -> None:
    from hepatoquant.outputs.overlay import render_overlay

    result = analyze_slide(synthetic_slide, pack, AnalysisOptions(num_workers=1, min_focus=0))
    image = render_overlay(result)
    without = render_overlay(dataclasses.replace(result, tissue=dataclasses.replace(result.tissue, artefacts={})))
    scale = 1600 / 2048 if image.shape[0] >= 1600 else image.shape[0] / 2048
    y0, y1, x0, x1 = (int(v * scale) for v in (700, 760, 300, 700))
    differs = np.any(image[y0:y1, x0:x1] != without[y0:y1, x0:x1], axis=-1)
    assert differs.mean() > 0.2  # hatched and outlined


def test_every_tile_carries_its_focus_and_tissue_fraction(synthetic_slide: Path, pack: ModelPack, tmp_path: Path) -> None:
    report, objects, _ = _analyse(synthetic_slide, pack, tmp_path, min_focus=0)
    tiles = _tiles(objects)
    assert len(tiles) == report["tiles"]["count"] > 0
    for tile in tiles:
        assert tile.measurements["HQ focus"] >= 0
        assert 0.5 <= tile.measurements["HQ tissue fraction"] <= 1.0  # kept where at least half is tissue


def test_tiles_below_the_focus_threshold_are_left_out_and_counted(synthetic_slide: Path, pack: ModelPack,
                                                                 tmp_path: Path) -> None:
    _, objects, _ = _analyse(synthetic_slide, pack, tmp_path / "all", min_focus=0)
    scores = np.array([t.measurements["HQ focus"] for t in _tiles(objects)])
    threshold = float(np.median(scores))
    report, sharp_objects, _ = _analyse(synthetic_slide, pack, tmp_path / "sharp", min_focus=threshold)
    blurred = int((scores.astype(np.float32) < np.float32(threshold)).sum())
    assert 0 < blurred < len(scores)
    assert report["tiles"]["excluded"] == {"blur": blurred} and report["tiles"]["min_focus"] == threshold
    assert len(_tiles(sharp_objects)) == report["tiles"]["count"] == len(scores) - blurred
    assert all(t.measurements["HQ focus"] >= np.float32(threshold) for t in _tiles(sharp_objects))
    assert sum(r["tile_count"] for r in report["composition"]["region_classes"]) == report["tiles"]["count"]


def test_the_focus_score_separates_real_tissue_from_the_same_tissue_out_of_focus(cmu_slide: Path) -> None:
    """The default threshold (50) on real H&E: tiles in focus above it, the same tiles blurred (sigma 3 px) below."""
    default = AnalysisOptions().min_focus
    sharp, blurred = [], []
    with Slide(cmu_slide) as slide:
        grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, detect_tissue(slide), TileSpec())
        for index in np.linspace(0, len(grid) - 1, 12).astype(int):  # tiles spread over the tissue
            tile = slide.read_region((int(grid.x_level0_px[index]), int(grid.y_level0_px[index])), 0, (150, 150))
            sharp.append(focus_score(tile))
            blurred.append(focus_score(cv2.GaussianBlur(tile, (0, 0), 3)))
    assert min(sharp) > default > max(blurred), (sharp, blurred)


def test_artefact_annotations_fed_back_with_regions_are_left_out_again(
    with_pen, synthetic_slide: Path, pack: ModelPack, tmp_path: Path, synthetic_regions_geojson: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pathologist keeps (or redraws) HepatoQuant's artefact annotation, adds regions, and sends the file back
    with --regions: the artefact is left out again, although this time nothing detects it."""
    _, objects, _ = _analyse(synthetic_slide, pack, tmp_path / "first", min_focus=0)
    [pen] = [o for o in objects if o.class_names[:1] == ("HQ Artefact",)]
    regions = json.loads(synthetic_regions_geojson)
    regions["features"].append(to_feature(pen))
    path = tmp_path / "reviewed.geojson"
    path.write_text(json.dumps(regions))
    monkeypatch.setattr(analysis, "detect_tissue", REAL_DETECT_TISSUE)  # no detector finds the pen now
    report, again, _ = _analyse(synthetic_slide, pack, tmp_path / "again", min_focus=0, regions_path=path)
    assert set(report["artefacts"]) == {"pen"}
    assert report["tiles"]["excluded"].get("pen", 0) > 0
    assert not [t for t in _tiles(again) if t.geometry.intersects(PEN) and not t.geometry.touches(PEN)]
    assert {r["name"] for r in report["composition"]["regions"]} == {"tumour A", "background liver"}
