"""Regions from QuPath GeoJSON: which annotations count, how classes map, and the errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hepatoquant.errors import InvalidGeoJSONError, RegionsError
from hepatoquant.regions import regions_from_geojson


def test_qupath_export_gives_polygon_annotations_as_regions(testdata: Path) -> None:
    path = testdata / "qupath" / "qupath-0.6.0-export-featurecollection.geojson"
    regions, warnings = regions_from_geojson(path, (5000, 5000))
    # Polygon/MultiPolygon annotations: tumor-with-hole, the locked MultiPolygon, the ellipse.
    assert [r.name for r in regions] == ["tumor-with-hole", "Non-tumor", "annotation 5"]
    assert [r.region_class for r in regions] == ["tumour", "non_tumour", "non_tumour"]
    hole = regions[0].geometry
    assert hole.area == pytest.approx(800 * 600 - 200 * 200)
    assert regions[1].geometry.geom_type == "MultiPolygon"
    text = " ".join(warnings)
    assert "tile" in text and "detection" in text and "cell" in text  # skipped, and said so
    assert "Non-tumor" in text and "(unclassified)" in text  # the non-tumour mapping is reported


def test_tumour_class_names_are_configurable(testdata: Path) -> None:
    path = testdata / "qupath" / "qupath-0.6.0-export-featurecollection.geojson"
    regions, _ = regions_from_geojson(path, (5000, 5000), tumour_class_names=("non-tumor",))
    assert [r.region_class for r in regions] == ["non_tumour", "tumour", "non_tumour"]


def test_annotations_of_another_slide_are_an_error(testdata: Path) -> None:
    path = testdata / "qupath" / "qupath-0.6.0-camelyon16-tumor_009-annotations.geojson"
    with pytest.raises(RegionsError, match="lies outside the slide") as info:
        regions_from_geojson(path, (4443, 3567))
    assert str(path) in str(info.value) and "4443 x 3567" in str(info.value)
    regions, _ = regions_from_geojson(path, (100_000, 220_000))  # tumor_009 is 97792 x 221184 px
    assert len(regions) == 6 and all(r.region_class == "tumour" for r in regions)  # class Metastasis


def test_partly_outside_is_clipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "regions.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[50, 50], [150, 50], [150, 150], [50, 150], [50, 50]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    }
    path.write_text(json.dumps([feature]))
    regions, warnings = regions_from_geojson(path, (100, 100))
    assert regions[0].geometry.bounds == (50.0, 50.0, 100.0, 100.0)
    assert any("clipped" in w for w in warnings)


def test_file_without_area_annotations_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                                "properties": {"objectType": "annotation"}}))
    with pytest.raises(RegionsError, match="no polygon annotations"):
        regions_from_geojson(path, (100, 100))


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("broken.geojson", "{not json"),
        ("null-properties.geojson", json.dumps({"type": "Feature", "properties": None,
                                                "geometry": {"type": "Point", "coordinates": [0, 0]}})),
        ("regions.txt", "[]"),
    ],
)
def test_malformed_regions_files_name_the_file(tmp_path: Path, filename: str, content: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(InvalidGeoJSONError) as info:
        regions_from_geojson(path, (100, 100))
    assert filename in str(info.value)


def test_missing_regions_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        regions_from_geojson(tmp_path / "absent.geojson", (100, 100))


def _feature(coordinates, class_name=None, *, name=None, metadata=None) -> dict:
    properties: dict = {"objectType": "annotation"}
    if class_name:
        properties["classification"] = {"name": class_name, "color": [200, 0, 0]}
    if name:
        properties["name"] = name
    if metadata:
        properties["metadata"] = metadata
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coordinates]}, "properties": properties}


def _square(x0: float, y0: float, x1: float, y1: float) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_tumour_inside_a_larger_annotation_is_cut_out_of_it(tmp_path: Path) -> None:
    """QuPath exports parents first: a 'Tissue' outline around a 'Tumor' must not swallow the tumour."""
    path = tmp_path / "nested.geojson"
    path.write_text(json.dumps([_feature(_square(0, 0, 1000, 1000), "Tissue"), _feature(_square(200, 200, 400, 400), "Tumor")]))
    regions, _ = regions_from_geojson(path, (1000, 1000))
    tissue, tumour = regions
    assert tumour.region_class == "tumour" and tumour.geometry.area == pytest.approx(200 * 200)
    assert tissue.region_class == "non_tumour" and tissue.geometry.area == pytest.approx(1000 * 1000 - 200 * 200)


def test_our_own_objects_and_ignore_classes_are_not_regions(tmp_path: Path) -> None:
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps([
        _feature(_square(0, 0, 500, 500), "HQ Tissue", name="HepatoQuant: Whole tissue", metadata={"hepatoquant": "region"}),
        _feature(_square(0, 0, 100, 100), "Ignore*"),
        _feature(_square(100, 100, 300, 300), "Tumor"),
    ]))
    regions, warnings = regions_from_geojson(path, (1000, 1000))
    assert [r.region_class for r in regions] == ["tumour"]
    assert any("HepatoQuant object" in w and "Ignore*" in w for w in warnings)
