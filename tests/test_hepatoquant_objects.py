"""HepatoQuant's QuPath objects: what QuPath will show, and that re-runs can recognise our objects."""

from __future__ import annotations

import json

import pytest
from shapely.geometry import box

from hepatoquant_client.classes import TISSUE_CLASS_CODES, TISSUE_CLASSES, TUMOUR_REGION
from hepatoquant_client.hepatoquant_objects import is_hepatoquant_object, region_object, tile_object
from hepatoquant_client.qupath_geojson import QuPathObject, dumps_feature_collection, parse_qupath_geojson

BUILT_IN_QUPATH_CLASSES = {"Tumor", "Stroma", "Immune cells", "Necrosis", "Other", "Region*", "Ignore*",
                           "Positive", "Negative"}


def test_class_names_avoid_qupath_built_ins_and_are_unique() -> None:
    names = [c.qupath_name for c in TISSUE_CLASSES] + [TUMOUR_REGION.qupath_name]
    assert not set(names) & BUILT_IN_QUPATH_CLASSES
    assert len(set(names)) == len(names)
    assert TISSUE_CLASS_CODES == ("TUM", "FIB", "INF", "NEC", "NOR", "REA", "STE")


def test_tile_round_trips_through_qupath_geojson() -> None:
    probabilities = dict(zip(TISSUE_CLASS_CODES, [0.7, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]))
    tile = tile_object(300.0, 450.0, 150.3, "TUM", probabilities)
    text = dumps_feature_collection([tile])
    feature = json.loads(text)["features"][0]
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"] == {"name": "HQ Tumour", "color": [214, 39, 40]}
    assert feature["properties"]["measurements"]["prob_TUM"] == pytest.approx(0.7)
    [parsed] = parse_qupath_geojson(text)
    assert parsed.geometry.bounds == (300.0, 450.0, 300.0 + 150.3, 450.0 + 150.3)  # exact: no coordinate rounding
    tiny = tile_object(1000.0001, 2000.0004, 150.0, "TUM", probabilities)  # sub-thousandth offsets survive
    [back] = parse_qupath_geojson(dumps_feature_collection([tiny]))
    assert back.geometry.bounds == (1000.0001, 2000.0004, 1000.0001 + 150.0, 2000.0004 + 150.0)
    assert is_hepatoquant_object(parsed)


def test_region_carries_its_composition_as_measurements() -> None:
    region = region_object(
        box(0, 0, 10, 10), "tumour", "Tumour 1", tile_count=4, tile_area_mm2=0.0225, region_area_mm2=0.03,
        class_tiles={"TUM": 3, "NEC": 1}, class_percent={"TUM": 75.0, "NEC": 25.0},
    )
    [parsed] = parse_qupath_geojson(dumps_feature_collection([region]))
    assert parsed.name == "HepatoQuant: Tumour 1" and parsed.class_names == ("HQ Tumour region",)
    assert parsed.measurements["TUM %"] == 75.0 and parsed.measurements["NEC tiles"] == 1.0
    assert parsed.measurements["HQ tiles"] == 4.0
    assert is_hepatoquant_object(parsed)


def test_pathologist_objects_are_not_ours() -> None:
    theirs = QuPathObject(geometry=box(0, 0, 1, 1), class_names=("Tumor",), color_rgb=(200, 0, 0), name="my tumour")
    assert not is_hepatoquant_object(theirs)


def test_bad_object_types_are_refused() -> None:
    with pytest.raises(ValueError, match="detection"):
        tile_object(0, 0, 1, "TUM", {}, object_type="cell")
    with pytest.raises(KeyError, match="TUM"):
        tile_object(0, 0, 1, "XYZ", {})
