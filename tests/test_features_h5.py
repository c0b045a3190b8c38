"""Issue 21 (outputs): tile embeddings in the HDF5 layout CLAM- and TRIDENT-style MIL code reads, written with
the other outputs on a real slide and read back with h5py as those tools read it."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hepatoquant_client.qupath_geojson import read_qupath_geojson

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.outputs import write_outputs


@pytest.fixture(scope="module")
def written(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory):
    pack = ensure_demo_pack(tmp_path_factory.mktemp("models"), encoder="test_vit_micro")
    result = analyze_slide(cmu_slide, pack, AnalysisOptions(num_workers=1, keep_embeddings=True))
    return result, write_outputs(result, tmp_path_factory.mktemp("out"))


def test_features_and_coords_as_clam_and_trident_read_them(written) -> None:
    result, paths = written
    assert paths.features_h5 == paths.geojson.with_name("CMU-1-Small-Region.features.h5")
    with h5py.File(paths.features_h5, "r") as h5:  # CLAM: features = f['features'][:]; coords = f['coords'][:]
        features, coords = h5["features"][:], h5["coords"][:]
        attrs = dict(h5["coords"].attrs)
        probabilities, classes = h5["probabilities"][:], [c.decode() if isinstance(c, bytes) else c
                                                          for c in h5.attrs["classes"]]
    n = len(result.grid)
    assert features.dtype == np.float32 and features.shape == (n, result.embeddings.shape[1]) and n > 50
    np.testing.assert_array_equal(features, result.embeddings)
    assert coords.dtype == np.int64 and coords.shape == (n, 2)
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 150
    assert attrs["patch_size_level0"] == round(result.grid.size_level0_px)  # 150 px at 0.5 um on a 0.499 um slide
    assert attrs["target_magnification"] == 20 and attrs["level0_mpp"] == pytest.approx(result.slide.mpp_um_px)
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967) and attrs["name"] == "CMU-1-Small-Region"
    np.testing.assert_allclose(probabilities, result.probabilities)
    assert classes == list(result.classes)
    # the same tiles, in the same order, as the QuPath objects: each coordinate is its tile's top-left corner
    tiles = [o for o in read_qupath_geojson(paths.geojson) if o.object_type == "detection"]
    corners = np.array([o.geometry.bounds[:2] for o in tiles])
    np.testing.assert_allclose(coords, corners, atol=0.5)


def test_a_run_without_embeddings_removes_an_earlier_runs_h5(written, tmp_path: Path) -> None:
    import dataclasses

    result, _ = written
    write_outputs(result, tmp_path)
    assert (tmp_path / "CMU-1-Small-Region.features.h5").is_file()
    write_outputs(dataclasses.replace(result, embeddings=None), tmp_path)
    assert not (tmp_path / "CMU-1-Small-Region.features.h5").exists()
    assert not (tmp_path / "CMU-1-Small-Region.embeddings.npz").exists()


@pytest.mark.parametrize(("fmt", "kept", "removed"), [("h5", "features.h5", "embeddings.npz"),
                                                        ("npz", "embeddings.npz", "features.h5")])
def test_one_embeddings_format_is_written_and_the_other_removed(written, tmp_path: Path, fmt: str, kept: str,
                                                                removed: str) -> None:
    """``--embeddings-format h5|npz`` (request field ``embeddings_format``): only that file; an earlier run's
    other file, which no longer matches, goes."""
    import dataclasses

    result, _ = written
    write_outputs(result, tmp_path)  # both, the default
    paths = write_outputs(dataclasses.replace(result, options=dataclasses.replace(
        result.options, embeddings_formats=(fmt,))), tmp_path)
    assert (tmp_path / f"CMU-1-Small-Region.{kept}").is_file()
    assert not (tmp_path / f"CMU-1-Small-Region.{removed}").exists()
    assert (paths.features_h5 is None) == (fmt == "npz") and (paths.embeddings is None) == (fmt == "h5")
    report = json.loads(paths.report.read_text())
    assert f"CMU-1-Small-Region.{kept}" in report["outputs"].values()
    assert f"CMU-1-Small-Region.{removed}" not in report["outputs"].values()


def test_the_command_line_writes_only_the_h5_when_asked(cmu_slide: Path, tmp_path: Path) -> None:
    from hepatoquant.cli import main

    models = tmp_path / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    argv = ["--models-dir", str(models), "analyze", str(cmu_slide), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu", "--save-embeddings", "--embeddings-format", "h5"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.features.h5")) == ["CMU-1-Small-Region.features.h5"]
    assert not list((tmp_path / "out").glob("*.npz"))
