"""Issue 21 (outputs): the region mask and the tile-class map as rasters with their um/px, written with the other
outputs for real slides and read back with tifffile and OpenSlide; a PNG preview of each."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack


@pytest.fixture(scope="module")
def runs(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    models = tmp_path_factory.mktemp("models")
    pack = ensure_demo_pack(models, encoder="test_vit_micro")
    whole = analyze_slide(cmu_slide, pack, AnalysisOptions(num_workers=1))
    segmented = analyze_slide(cmu_slide, pack, AnalysisOptions(num_workers=1),
                              segmenter=ensure_demo_segmentation_pack(models))
    return {name: (result, write_outputs(result, tmp_path_factory.mktemp(name)))
            for name, result in (("whole", whole), ("segmented", segmented))}


def _read(path: Path) -> tuple[np.ndarray, float, dict]:
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        x_resolution = page.tags["XResolution"].value
        per_cm = x_resolution[0] / x_resolution[1]
        assert page.tags["ResolutionUnit"].value == 3 and page.is_tiled  # centimetre
        return page.asarray(), 1e4 / per_cm, json.loads(page.description)


@pytest.mark.parametrize("name", ["whole", "segmented"])
def test_the_tile_class_map_holds_every_classified_tile_at_its_place(runs, name) -> None:
    result, paths = runs[name]
    labels, um_per_px, meta = _read(paths.tissue_map)
    side = result.grid.size_level0_px
    assert um_per_px == pytest.approx(side * result.slide.mpp_um_px, rel=1e-6)  # 75 um
    assert labels.shape == (int(2967 // side), int(2220 // side)) and labels.dtype == np.uint8
    cols = np.rint(result.grid.x_level0_px / side).astype(int)
    rows = np.rint(result.grid.y_level0_px / side).astype(int)
    np.testing.assert_array_equal(labels[rows, cols], result.predicted_class + 1)
    assert np.count_nonzero(labels) == len(result.grid)
    assert meta["values"] == {str(i + 1): code for i, code in enumerate(result.classes)}
    assert cv2.imread(str(paths.tissue_map_png)).shape[:2] == labels.shape


@pytest.mark.parametrize("name", ["whole", "segmented"])
def test_the_region_mask_covers_the_regions_at_its_recorded_spacing(runs, name) -> None:
    result, paths = runs[name]
    labels, um_per_px, meta = _read(paths.region_mask)
    expected_spacing = result.segmentation.spacing_um_px if result.segmentation is not None else 8.0
    assert um_per_px == pytest.approx(expected_spacing, rel=1e-6)
    assert list(meta["values"]) == ["1", "2", "3"] and meta["values"]["3"] == "tissue"
    # each region class's area in the mask matches its polygons' area (to a pixel ring at their border)
    import shapely

    px_area_um2 = um_per_px**2
    for value, code in ((int(k), v) for k, v in meta["values"].items()):
        geometry = shapely.union_all([r.geometry for r in result.regions if r.region_class == code])
        mask_mm2 = np.count_nonzero(labels == value) * px_area_um2 / 1e6
        polygon_mm2 = geometry.area * result.slide.mpp_um_px**2 / 1e6
        perimeter_mm = geometry.length * result.slide.mpp_um_px / 1e3
        assert abs(mask_mm2 - polygon_mm2) <= perimeter_mm * um_per_px / 1e3 + 1e-4, (code, mask_mm2, polygon_mm2)
    assert np.count_nonzero(labels) > 0
    assert cv2.imread(str(paths.region_mask_png)) is not None


def test_openslide_opens_the_rasters_with_their_pixel_size(runs) -> None:
    result, paths = runs["segmented"]
    for path in (paths.tissue_map, paths.region_mask):
        with openslide.OpenSlide(str(path)) as slide:
            labels, um_per_px, _ = _read(path)
            assert slide.dimensions == (labels.shape[1], labels.shape[0])
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(um_per_px, rel=1e-4)
            grey = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("L"))
            np.testing.assert_array_equal(grey, labels)  # the values themselves, not a rendering of them
