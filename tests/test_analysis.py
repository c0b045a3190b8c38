"""End to end: `hepatoquant analyze` and `analyze_slide` on generated and real slides, outputs and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.cli import main
from hepatoquant.errors import OutputWriteError
from hepatoquant.model_pack import ModelPack, ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant_client.slide_report import cohort_columns
from hepatoquant.synthetic import SyntheticSlideSpec, write_synthetic_slide
from hepatoquant_client.qupath_geojson import read_qupath_geojson


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> ModelPack:
    """An untrained classifier pack on the 32 px test encoder: the whole pipeline in a fraction of a second."""
    return ensure_demo_pack(tmp_path_factory.mktemp("tiny-models"), encoder="test_vit_micro")


def test_analysis_of_a_generated_slide_writes_every_output(synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path) -> None:
    result = analyze_slide(synthetic_slide, tiny_pack, AnalysisOptions(batch_size=16, keep_embeddings=True))
    n = len(result.grid)
    # Two ellipses of ~0.33 of a 1024 um square slide at 75 um tiles: ~60 tiles are mostly tissue.
    assert 40 <= n <= 80
    assert result.probabilities.shape == (n, 7)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.embeddings is not None and result.embeddings.shape == (n, 32)
    [whole] = result.composition.region_classes
    assert whole.region_class == "tissue" and whole.tile_count == n

    paths = write_outputs(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["synthetic.geojson", "synthetic.report.json", "synthetic.csv", "synthetic.overlay.png",
         "synthetic.embeddings.npz", "synthetic.features.h5", "synthetic.tissue-map.tif", "synthetic.tissue-map.png",
         "synthetic.region-mask.tif", "synthetic.region-mask.png"]
    )

    objects = read_qupath_geojson(paths.geojson)
    regions = [o for o in objects if o.object_type == "annotation"]
    tiles = [o for o in objects if o.object_type == "detection"]
    assert len(regions) == 1 and len(tiles) == n
    assert regions[0].measurements["HQ tiles"] == n
    assert sum(regions[0].measurements[f"{c} tiles"] for c in result.classes) == n
    assert set(tiles[0].measurements) == {f"prob_{c}" for c in result.classes} | {"HQ focus", "HQ tissue fraction"}
    # The untrained status travels with every object into QuPath.
    assert tiles[0].metadata["model_status"] == regions[0].metadata["model_status"] == "untrained-demo"
    first_box = tiles[0].geometry.bounds
    assert first_box[2] - first_box[0] == pytest.approx(150.0, abs=0.01)  # 75 um at 0.5 um/px

    report = json.loads(paths.report.read_text())
    assert report["report_schema_version"] == "2.4"
    assert report["model_status"] == "untrained-demo"
    assert "Research use only" in report["notice"]
    assert report["slide"]["mpp_um_px"] == 0.5 and report["slide"]["mpp_source"] == "metadata"
    assert report["tiles"]["count"] == n
    assert set(report["timings_s"]) >= {"tissue_detection", "tiling", "classification", "quantification"}
    assert any("UNTRAINED DEMO" in w for w in report["warnings"])

    with paths.cohort_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and list(rows[0]) == cohort_columns()
    assert int(rows[0]["tissue_tiles"]) == n and rows[0]["tumour_tiles"] == ""
    assert rows[0]["model_status"] == "untrained-demo" and rows[0]["segmenter"] == ""

    overlay = cv2.imread(str(paths.overlay_png))
    assert overlay is not None and overlay.shape[0] >= 330 and overlay.shape[1] > 230

    saved = np.load(paths.embeddings)
    assert saved["embeddings"].shape == (n, 32) and saved["x_level0_px"].shape == (n,)


def test_regions_split_the_composition_by_tumour_and_non_tumour(
    synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path, synthetic_regions_geojson: str
) -> None:
    regions = tmp_path / "regions.geojson"
    regions.write_text(synthetic_regions_geojson)
    result = analyze_slide(synthetic_slide, tiny_pack, AnalysisOptions(regions_path=regions))
    by_class = {c.region_class: c for c in result.composition.region_classes}
    assert set(by_class) == {"tumour", "non_tumour"}  # tiles are restricted to the regions: none unassigned
    assert by_class["tumour"].tile_count > 5 and by_class["non_tumour"].tile_count > 5
    assert set(result.composition.headline_indicators) == {"tumour", "non_tumour"}
    # Only tiles whose centre is inside a region are analysed.
    assert len(result.grid) == by_class["tumour"].tile_count + by_class["non_tumour"].tile_count
    paths = write_outputs(result, tmp_path / "out")
    names = [o.name for o in read_qupath_geojson(paths.geojson) if o.object_type == "annotation"]
    assert names == ["HepatoQuant: tumour A", "HepatoQuant: background liver"]


def test_cli_analyze_with_progress_summary_and_outputs(
    synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    code = main(["analyze", str(synthetic_slide), "--model", str(tiny_pack.path), "--out", str(out), "--tile-object", "tile"])
    captured = capsys.readouterr()
    assert code == 0
    assert "UNTRAINED DEMO" in captured.err and "tiles/s" in captured.err and "Research use only" in captured.err
    assert {p.name for p in out.iterdir()} == {"synthetic.geojson", "synthetic.report.json", "synthetic.csv",
                                               "synthetic.overlay.png", "synthetic.tissue-map.tif",
                                               "synthetic.tissue-map.png", "synthetic.region-mask.tif",
                                               "synthetic.region-mask.png"}
    assert {o.object_type for o in read_qupath_geojson(out / "synthetic.geojson")} == {"annotation", "tile"}


def test_real_svs_without_mpp_needs_the_override(tcga_slide: Path, tiny_pack: ModelPack, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["analyze", str(tcga_slide), "--model", str(tiny_pack.path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--mpp" in err and "TCGA-CR-7395" in err
    assert not out.exists() or not any(out.iterdir())

    assert main(["analyze", str(tcga_slide), "--model", str(tiny_pack.path), "--out", str(out), "--mpp", "0.5",
                 "--no-progress"]) == 0
    report = json.loads((out / "TCGA-CR-7395-01A-01-TS1.report.json").read_text())
    assert report["slide"]["mpp_source"] == "override" and report["slide"]["level_count"] == 2
    assert report["tiles"]["count"] > 50


def test_demo_pack_on_the_real_sample_slide(cmu_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `make demo` runs: the default (demo) model, created on first use, on the real SVS sample."""
    out = tmp_path / "demo"
    assert main(["analyze", str(cmu_slide), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "CMU-1-Small-Region.report.json").read_text())
    assert report["model"]["name"] == "demo" and report["model"]["encoder"] == "demo_vit_tiny"
    assert report["model_status"] == "untrained-demo"
    assert report["slide"]["mpp_um_px"] == pytest.approx(0.499)
    assert 60 <= report["tiles"]["count"] <= 200
    assert "UNTRAINED DEMO" in capsys.readouterr().err


def _blank_slide(tmp_path: Path) -> Path:
    return write_synthetic_slide(tmp_path / "blank.tiff", SyntheticSlideSpec(width_px=1024, height_px=1024, tissue=()))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "does not exist"),
        ("directory", "is a directory"),
        ("text-file", "not a whole-slide format"),
        ("blank", "no tile"),
        ("bad-regions", "regions.geojson"),
        ("bad-tile-size", "tile size 5 px"),
        ("bad-mpp", "--mpp = 99.0"),
        ("unknown-model", "no model pack 'nope'"),
    ],
)
def test_cli_bad_input_fails_clearly_and_writes_nothing(
    case: str, expected: str, synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slide, extra = str(synthetic_slide), []
    if case == "missing":
        slide = str(tmp_path / "nope.svs")
    elif case == "directory":
        slide = str(tmp_path)
    elif case == "text-file":
        (tmp_path / "notes.svs").write_text("not a slide")
        slide = str(tmp_path / "notes.svs")
    elif case == "blank":
        slide = str(_blank_slide(tmp_path))
    elif case == "bad-regions":
        (tmp_path / "regions.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
        extra = ["--regions", str(tmp_path / "regions.geojson")]
    elif case == "bad-tile-size":
        extra = ["--tile-size", "5"]
    elif case == "bad-mpp":
        extra = ["--mpp", "99"]
    out = tmp_path / "out"
    model = "nope" if case == "unknown-model" else str(tiny_pack.path)
    code = main(["analyze", slide, "--model", model, "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("hepatoquant: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_failure_while_writing_leaves_no_partial_output(
    synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = analyze_slide(synthetic_slide, tiny_pack)

    def broken_overlay(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("hepatoquant.outputs.write_overlay", broken_overlay)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match="disk full") as info:
        write_outputs(result, out)
    assert str(out) in str(info.value) and isinstance(info.value, OSError)
    assert list(out.iterdir()) == []  # no output, no staging folder left behind


def test_unwritable_output_folder_is_a_clear_error(
    synthetic_slide: Path, tiny_pack: ModelPack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["analyze", str(synthetic_slide), "--model", str(tiny_pack.path), "--out", str(blocker / "out"),
                 "--no-progress"])
    assert code == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file" in err  # found before the slide is read
    # written at the end too (a disk that fills during the run): the same clear error, nothing partial
    from hepatoquant.analysis import AnalysisOptions, analyze_slide
    from hepatoquant.errors import OutputWriteError
    from hepatoquant.outputs import write_outputs

    result = analyze_slide(synthetic_slide, tiny_pack, AnalysisOptions())
    with pytest.raises(OutputWriteError, match="could not write the outputs"):
        write_outputs(result, blocker / "out")
    assert blocker.read_text() == "not a folder"
