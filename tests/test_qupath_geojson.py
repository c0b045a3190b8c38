"""Tests of the QuPath GeoJSON dialect against real QuPath 0.6.0 exports and the rules in shared/QUPATH.md."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import geojson
import pytest
from shapely.geometry import GeometryCollection, LineString, MultiPoint, MultiPolygon, Point, Polygon

from hepatoquant_client.classes import TISSUE_CLASSES, TUMOUR_REGION
from hepatoquant_client.errors import HepatoQuantError, InvalidGeoJSONError
from hepatoquant_client.qupath_geojson import (
    OBJECT_TYPES,
    check_qupath_nesting,
    GeoJSONFileNotFoundError,
    QuPathObject,
    dumps_feature_collection,
    feature_collection,
    parse_qupath_geojson,
    polygonal_part,
    read_qupath_geojson,
    to_feature,
)

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
QUPATH_DIR = TESTDATA / "qupath"
EXPORT_ARRAY = QUPATH_DIR / "qupath-0.6.0-export-array.geojson"
EXPORT_COLLECTION = QUPATH_DIR / "qupath-0.6.0-export-featurecollection.geojson"
CAMELYON = QUPATH_DIR / "qupath-0.6.0-camelyon16-tumor_009-annotations.geojson"

needs_testdata = pytest.mark.skipif(  # in CI (CI=true) never skipped: a missing export fails the test
    not QUPATH_DIR.is_dir() and os.environ.get("CI") != "true",
    reason=f"real QuPath exports not found at {QUPATH_DIR} (shared/testdata is absent)",
)

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]


def feature(**properties: Any) -> dict[str, Any]:
    """A valid annotation Feature with the given properties (tests then break one thing in it)."""
    return {
        "type": "Feature",
        "id": "11111111-2222-4333-8444-555555555555",
        "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
        "properties": {"objectType": "annotation", **properties},
    }


def collection(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


# ---------------------------------------------------------------------------------------------------------------
# Real QuPath exports
# ---------------------------------------------------------------------------------------------------------------


@needs_testdata
def test_both_export_forms_give_the_same_ten_objects() -> None:
    from_array = read_qupath_geojson(EXPORT_ARRAY)
    from_collection = read_qupath_geojson(EXPORT_COLLECTION)
    assert len(from_array) == 10
    assert from_array == from_collection


@needs_testdata
def test_export_objects_types_classes_and_ids() -> None:
    objects = read_qupath_geojson(EXPORT_COLLECTION)
    assert [o.object_type for o in objects] == ["annotation"] * 5 + ["tile"] * 3 + ["detection", "cell"]
    assert [o.class_names for o in objects] == [
        ("Tumor",),
        ("Non-tumor",),
        ("Immune cells",),
        ("Tumor", "Positive"),
        (),
        ("Tumor",),
        ("Stroma",),
        ("Necrosis",),
        ("Stroma",),
        ("Tumor",),
    ]
    assert objects[3].color_rgb == (200, 50, 50)
    assert objects[0].color_rgb == (200, 0, 0)
    assert objects[4].color_rgb is None
    raw = json.loads(EXPORT_COLLECTION.read_text())
    assert [o.object_id for o in objects] == [f["id"] for f in raw["features"]]


@needs_testdata
def test_export_geometries_hole_multipolygon_points_line() -> None:
    objects = read_qupath_geojson(EXPORT_ARRAY)
    with_hole = objects[0]
    assert isinstance(with_hole.geometry, Polygon)
    assert with_hole.name == "tumor-with-hole"
    assert len(with_hole.geometry.interiors) == 1
    assert with_hole.geometry.area == pytest.approx(800 * 600 - 200 * 200)
    assert with_hole.measurements == {"Tumor area fraction": 0.75}
    assert isinstance(objects[1].geometry, MultiPolygon)
    assert len(objects[1].geometry.geoms) == 2
    assert isinstance(objects[2].geometry, MultiPoint)
    assert isinstance(objects[3].geometry, LineString)
    assert isinstance(objects[4].geometry, Polygon)  # the ellipse: "isEllipse" is ignored


@needs_testdata
def test_export_locked_cell_and_tile_measurements() -> None:
    objects = read_qupath_geojson(EXPORT_ARRAY)
    assert [o.is_locked for o in objects] == [False, True] + [False] * 8
    tile = objects[5]
    assert len(tile.measurements) == 7
    assert tile.measurements["prob_Tumor"] == pytest.approx(0.9, abs=1e-6)
    assert sum(tile.measurements.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(objects[6].measurements) == set(tile.measurements)
    cell = objects[9]
    assert cell.object_type == "cell"
    assert cell.measurements == {"Nucleus: Area": pytest.approx(153.9, abs=1e-4)}
    # The cell keeps its main geometry (a 30 px ellipse), not nucleusGeometry.
    assert cell.geometry.bounds == pytest.approx((600, 600, 630, 630), abs=0.01)


@needs_testdata
def test_camelyon_annotations() -> None:
    objects = read_qupath_geojson(CAMELYON)
    assert len(objects) == 6
    assert all(o.object_type == "annotation" for o in objects)
    assert {o.class_names for o in objects} == {("Metastasis",)}
    assert [o.name for o in objects] == [f"_{i}" for i in range(6)]
    assert isinstance(objects[5].geometry, MultiPolygon)
    assert all(o.geometry.area > 0 for o in objects)
    assert all(uuid.UUID(o.object_id) for o in objects)


@needs_testdata
def test_real_exports_survive_a_write_and_read_back() -> None:
    for path in (EXPORT_ARRAY, CAMELYON):
        objects = read_qupath_geojson(path)
        assert parse_qupath_geojson(dumps_feature_collection(objects)) == objects


# ---------------------------------------------------------------------------------------------------------------
# Containers and input forms
# ---------------------------------------------------------------------------------------------------------------


def test_single_feature_array_and_collection_agree() -> None:
    f = feature(name="a", classification={"name": "Tumor", "color": [200, 0, 0]})
    single = parse_qupath_geojson(json.dumps(f))
    assert len(single) == 1
    assert parse_qupath_geojson([f]) == single
    assert parse_qupath_geojson(collection(f)) == single
    assert parse_qupath_geojson(json.dumps(collection(f)).encode()) == single
    assert single[0].name == "a"
    assert single[0].geometry.equals(Polygon(SQUARE))


def test_empty_collection_and_bom() -> None:
    assert parse_qupath_geojson('{"type": "FeatureCollection", "features": []}') == []
    assert len(parse_qupath_geojson(b"\xef\xbb\xbf" + json.dumps([feature()]).encode())) == 1
    assert len(parse_qupath_geojson("\ufeff" + json.dumps([feature()]))) == 1


def test_invalid_json_names_the_source() -> None:
    with pytest.raises(InvalidGeoJSONError, match=r"slide-7\.geojson: not valid JSON \(line 1"):
        parse_qupath_geojson('{"type": "FeatureCollection", ', source="slide-7.geojson")


@pytest.mark.parametrize("value", [None, 3, "text", {"type": "Polygon", "coordinates": [SQUARE]}])
def test_unreadable_top_level_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidGeoJSONError, match=r"^in\.json: .*Fix: "):
        parse_qupath_geojson(value, source="in.json")


def test_errors_are_ours_and_value_errors() -> None:
    with pytest.raises(HepatoQuantError):
        parse_qupath_geojson("[1]")
    with pytest.raises(ValueError):
        parse_qupath_geojson("[1]")


# ---------------------------------------------------------------------------------------------------------------
# QuPath's reading rules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("object_type", "expected"),
    [
        ("annotation", "annotation"),
        ("detection", "detection"),
        ("tile", "tile"),
        ("cell", "cell"),
        ("Detection", "annotation"),
        ("TILE", "annotation"),
        (None, "annotation"),
    ],
)
def test_object_type_rule(object_type: str | None, expected: str) -> None:
    f = feature()
    if object_type is None:
        del f["properties"]["objectType"]
    else:
        f["properties"]["objectType"] = object_type
    assert parse_qupath_geojson(f)[0].object_type == expected


def test_missing_properties_is_an_unclassified_annotation() -> None:
    f = feature()
    del f["properties"]
    [obj] = parse_qupath_geojson(f)
    assert (obj.object_type, obj.class_names, obj.measurements) == ("annotation", (), {})


def test_classification_forms() -> None:
    as_string = parse_qupath_geojson(feature(classification="Tumor: Positive"))[0]
    assert as_string.class_names == ("Tumor", "Positive")
    assert as_string.color_rgb is None
    derived = parse_qupath_geojson(feature(classification={"names": ["Tumor", "Positive"], "color": [1, 2, 3]}))[0]
    assert (derived.class_names, derived.color_rgb) == (("Tumor", "Positive"), (1, 2, 3))
    derived_by_name = parse_qupath_geojson(feature(classification={"name": "Tumor: Positive", "color": [1, 2, 3]}))
    assert derived_by_name[0].class_names == ("Tumor", "Positive")
    plain = parse_qupath_geojson(feature(classification={"name": "Stroma", "color": [150, 200, 150]}))[0]
    assert (plain.class_names, plain.color_rgb) == (("Stroma",), (150, 200, 150))


def test_measurement_forms_and_values() -> None:
    legacy = feature(measurements=[{"name": "Area", "value": 12.5}, {"name": "Count", "value": 3}])
    assert parse_qupath_geojson(legacy)[0].measurements == {"Area": 12.5, "Count": 3.0}
    odd = feature(measurements={"a": "NaN", "b": "inf", "c": "0.25", "d": True, "e": None, "f": 2})
    measurements = parse_qupath_geojson(odd)[0].measurements
    assert set(measurements) == {"a", "b", "c", "f"}  # booleans and null are dropped, as QuPath drops them
    assert math.isnan(measurements["a"])
    assert measurements["b"] == math.inf
    assert measurements["c"] == 0.25
    assert measurements["f"] == 2.0
    assert isinstance(measurements["f"], float)


def test_ids_locked_name_metadata() -> None:
    f = feature(name="r1", isLocked=True, metadata={"source": "hq", "n": 3, "nested": {"x": 1}})
    f["id"] = "AAAAAAAA-2222-4333-8444-555555555555"
    [obj] = parse_qupath_geojson(f)
    assert obj.object_id == "aaaaaaaa-2222-4333-8444-555555555555"
    assert obj.is_locked is True
    assert obj.name == "r1"
    assert obj.metadata == {"source": "hq", "n": "3"}
    f["id"] = "PathAnnotationObject"  # not a UUID: QuPath replaces it with a random one
    f["properties"]["isLocked"] = False
    [obj] = parse_qupath_geojson(f)
    assert obj.object_id is None
    assert obj.is_locked is False


def test_z_is_ignored_and_self_intersections_kept() -> None:
    f = feature()
    f["geometry"] = {"type": "Polygon", "coordinates": [[[0, 0, 5], [10, 10, 5], [10, 0, 5], [0, 10, 5], [0, 0, 5]]]}
    [obj] = parse_qupath_geojson(f)
    assert not obj.geometry.has_z
    assert not obj.geometry.is_valid  # a bow-tie: QuPath accepts it as it is, and so do we


def test_children_are_read_where_qupath_reads_them_inside_properties() -> None:
    grandchild = feature(name="grandchild")
    child = feature(name="child", childObjects=[grandchild])
    parent = feature(name="parent", childObjects=[child, feature(name="second")])
    assert [o.name for o in parse_qupath_geojson([parent])] == ["parent", "child", "grandchild", "second"]


def test_feature_level_child_objects_are_refused_because_qupath_drops_them() -> None:
    """QuPath 0.6 ignores ``childObjects`` beside ``properties`` without a word (its children are lost): refused,
    naming the fix, instead of counting children that QuPath would never see."""
    parent = feature(name="parent")
    parent["childObjects"] = [feature(name="child"), feature(name="other")]
    with pytest.raises(InvalidGeoJSONError) as info:
        parse_qupath_geojson(collection(parent), source="tiles.geojson")
    message = str(info.value)
    assert message.startswith("tiles.geojson: feature 0 (id '11111111-2222-4333-8444-555555555555'): ")
    assert "silently drop 2 child object(s)" in message and "zero objects" not in message
    assert 'Fix: put the children inside the parent\'s properties, "properties": {..., "childObjects": [...]}' in (
        message)
    nested = feature(name="inner")
    nested["childObjects"] = [feature(name="lost")]  # also below a properly nested parent
    with pytest.raises(InvalidGeoJSONError, match=r"feature 0/child 0 .*Feature level"):
        parse_qupath_geojson([feature(name="outer", childObjects=[nested])])
    empty = feature(name="parent")
    empty["childObjects"] = []  # nothing to lose
    assert [o.name for o in parse_qupath_geojson([empty])] == ["parent"]


# ---------------------------------------------------------------------------------------------------------------
# What QuPath rejects (all-or-nothing): each trigger in QUPATH.md
# ---------------------------------------------------------------------------------------------------------------


def _break_properties_null(f: dict[str, Any]) -> None:
    f["properties"] = None


def _break_geometry_null(f: dict[str, Any]) -> None:
    f["geometry"] = None


def _break_unclosed_ring(f: dict[str, Any]) -> None:
    f["geometry"]["coordinates"] = [SQUARE[:-1]]


def _break_class_without_colour(f: dict[str, Any]) -> None:
    f["properties"]["classification"] = {"name": "Tumor"}


def _break_hex_colour(f: dict[str, Any]) -> None:
    f["properties"]["classification"] = {"name": "Tumor", "color": "#c80000"}


def _break_non_numeric_measurement(f: dict[str, Any]) -> None:
    f["properties"]["measurements"] = {"Area": "large"}


@pytest.mark.parametrize(
    ("breaker", "expected", "fix"),
    [
        (_break_properties_null, r'"properties" is null', '"properties": {"objectType": "annotation"}'),
        (_break_geometry_null, r'"geometry" is null', 'give the feature a "geometry"'),
        (_break_unclosed_ring, r"ring 0 \(exterior\) is not closed", "repeat the ring's first position"),
        (_break_class_without_colour, r"classification 'Tumor' has no colour", 'add "color": [r, g, b]'),
        (_break_hex_colour, r"hex colour", "write [r, g, b]"),
        (_break_non_numeric_measurement, r"measurement 'Area' is the non-numeric string 'large'", "JSON number"),
    ],
)
def test_qupath_rejection_triggers(breaker: Any, expected: str, fix: str) -> None:
    bad = feature()
    bad["id"] = "99999999-2222-4333-8444-555555555555"
    breaker(bad)
    text = json.dumps(collection(feature(), bad))
    with pytest.raises(InvalidGeoJSONError) as info:
        parse_qupath_geojson(text, source="regions.geojson")
    message = str(info.value)
    assert message.startswith("regions.geojson: feature 1 (id '99999999-2222-4333-8444-555555555555'): ")
    with pytest.raises(InvalidGeoJSONError):  # also alone and already decoded
        parse_qupath_geojson([bad])
    assert re.search(expected, message), message
    assert "zero objects" in message
    assert "Fix: " in message
    assert fix in message.split("Fix: ", 1)[1]


@pytest.mark.parametrize(
    ("geometry", "expected"),
    [
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}, r"ring 0 \(exterior\) has 3 positions"),
        ({"type": "Circle", "coordinates": [0, 0]}, "unknown type 'Circle'"),
        ({"type": "Point", "coordinates": ["a", 0]}, "finite numbers"),
        ({"type": "Point", "coordinates": [True, 0]}, "finite numbers"),  # QuPath fails on booleans
        ({"type": "LineString", "coordinates": [[0, 0]]}, "a line with 1 position"),
        ({"type": "Polygon"}, 'has no "coordinates"'),
        ({"type": "MultiPolygon", "coordinates": [[SQUARE], [SQUARE[:3]]]}, r"polygon 1 ring 0 \(exterior\) has 3"),
        ({"type": "Polygon", "coordinates": [SQUARE, [[2, 2], [3, 2], [3, 3], [2, 3]]]},
         r"ring 1 \(hole\) is not closed"),
    ],
)
def test_other_broken_geometries_are_rejected(geometry: dict[str, Any], expected: str) -> None:
    f = feature()
    f["geometry"] = geometry
    with pytest.raises(InvalidGeoJSONError, match=r"^<input>: feature 0 .*" + expected):
        parse_qupath_geojson([f])


def test_error_without_id_names_the_index_only() -> None:
    f = feature()
    del f["id"]
    f["properties"] = None
    with pytest.raises(InvalidGeoJSONError, match=r"^x: feature 0: "):
        parse_qupath_geojson([f], source="x")


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_extension_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "regions.txt"
    path.write_text(json.dumps([feature()]))
    with pytest.raises(InvalidGeoJSONError) as info:
        read_qupath_geojson(path)
    message = str(info.value)
    assert str(path) in message
    assert "zero objects" in message
    assert "rename it to regions.geojson" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GeoJSONFileNotFoundError) as info:
        read_qupath_geojson(tmp_path / "absent.geojson")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, InvalidGeoJSONError)
    assert "absent.geojson" in str(info.value)


def test_json_gz_and_zip_files(tmp_path: Path) -> None:
    text = json.dumps(collection(feature(name="one"), feature(name="two")))
    (tmp_path / "a.json").write_text(text)
    (tmp_path / "a.geojson.gz").write_bytes(gzip.compress(text.encode()))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("objects.geojson", text)
        archive.writestr("readme.txt", "not objects")
    expected = parse_qupath_geojson(text)
    assert read_qupath_geojson(tmp_path / "a.json") == expected
    assert read_qupath_geojson(str(tmp_path / "a.geojson.gz")) == expected
    assert read_qupath_geojson(tmp_path / "a.zip") == expected


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps([feature(), {**feature(), "properties": None}]))
    with pytest.raises(InvalidGeoJSONError, match=rf"^{path}: feature 1 "):
        read_qupath_geojson(path)
    corrupt = tmp_path / "c.geojson.gz"
    corrupt.write_bytes(b"not gzip")
    with pytest.raises(InvalidGeoJSONError, match="cannot be read"):
        read_qupath_geojson(corrupt)


@needs_testdata
def test_gz_of_a_real_export(tmp_path: Path) -> None:
    path = tmp_path / "export.geojson.gz"
    path.write_bytes(gzip.compress(EXPORT_ARRAY.read_bytes()))
    assert read_qupath_geojson(path) == read_qupath_geojson(EXPORT_ARRAY)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

ROUND_TRIP_OBJECTS = [
    QuPathObject(
        geometry=Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(10, 10), (20, 10), (20, 20), (10, 20)]]),
        class_names=(TUMOUR_REGION.qupath_name,),
        color_rgb=TUMOUR_REGION.color_rgb,
        name="region 1",
        measurements={"Area px": 9900.0, "HQ Tumour %": 12.5},
        object_id="0b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21",
        is_locked=True,
        metadata={"model": "hq-v1"},
    ),
    QuPathObject(
        geometry=Polygon([(224, 0), (448, 0), (448, 224), (224, 224)]),
        object_type="tile",
        class_names=(TISSUE_CLASSES[1].qupath_name,),
        color_rgb=TISSUE_CLASSES[1].color_rgb,
        measurements={f"prob_{c.code}": 1 / 7 for c in TISSUE_CLASSES},
        object_id="1b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21",
    ),
    QuPathObject(
        geometry=MultiPolygon([Polygon([(0, 0), (1.5, 0), (1.5, 1.25)]), Polygon([(5, 5), (6, 5), (6, 6)])]),
        object_type="detection",
        class_names=("Tumor", "Positive"),
        color_rgb=(200, 50, 50),
        object_id="2b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21",
    ),
    QuPathObject(geometry=MultiPoint([(1, 2), (3, 4)]), object_id="3b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21"),
    QuPathObject(
        geometry=LineString([(0, 0), (50.125, 50)]),
        color_rgb=(1, 2, 3),
        object_id="4b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21",
    ),
    QuPathObject(
        geometry=Polygon([(600, 600), (630, 600), (630, 630), (600, 630)]),
        object_type="cell",
        class_names=("Tumor",),
        color_rgb=(200, 0, 0),
        measurements={"Nucleus: Area": 153.9},
        object_id="5b5c7a1e-3f2d-4c1b-9a8e-7d6c5b4a3f21",
    ),
]


@pytest.mark.parametrize("obj", ROUND_TRIP_OBJECTS, ids=lambda o: f"{o.object_type}-{o.geometry.geom_type}")
def test_round_trip(obj: QuPathObject) -> None:
    assert parse_qupath_geojson(to_feature(obj)) == [obj]
    assert parse_qupath_geojson(json.dumps(to_feature(obj))) == [obj]


def test_round_trip_of_a_collection() -> None:
    assert parse_qupath_geojson(dumps_feature_collection(ROUND_TRIP_OBJECTS)) == ROUND_TRIP_OBJECTS


def test_written_feature_shape() -> None:
    f = to_feature(ROUND_TRIP_OBJECTS[0])
    assert f["type"] == "Feature"
    assert f["id"] == ROUND_TRIP_OBJECTS[0].object_id
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "HQ Tumour region", "color": [180, 0, 60]}
    assert props["isLocked"] is True
    assert props["metadata"] == {"model": "hq-v1"}
    derived = to_feature(ROUND_TRIP_OBJECTS[2])["properties"]["classification"]
    assert derived == {"names": ["Tumor", "Positive"], "color": [200, 50, 50]}
    plain = to_feature(QuPathObject(Point(1, 1)))["properties"]
    assert plain == {"objectType": "annotation"}  # no isLocked, metadata, measurements or classification


def test_written_ids_are_uuids_and_rings_closed() -> None:
    objects = [QuPathObject(Polygon([(0, 0), (4, 0), (4, 4)]), object_type=t) for t in OBJECT_TYPES]
    data = feature_collection(objects)
    assert data["type"] == "FeatureCollection"
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == len(ids)
    for feature_id in ids:
        assert uuid.UUID(feature_id).version == 4
        assert str(uuid.UUID(feature_id)) == feature_id
    for f in data["features"]:
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
            assert len(ring) >= 4
    assert [f["properties"]["objectType"] for f in data["features"]] == list(OBJECT_TYPES)


def test_properties_null_never_written() -> None:
    text = dumps_feature_collection([*ROUND_TRIP_OBJECTS, QuPathObject(Point(0, 0))])
    assert '"properties":null' not in text.replace(" ", "")
    assert all(isinstance(f["properties"], dict) for f in json.loads(text)["features"])
    assert "NaN" not in text


def test_coordinates_are_written_as_they_are() -> None:
    """QuPath's coordinates are pixels: never rounded (whole numbers written as ints, as QuPath writes them)."""
    x, y = 1.2345678901234567, -0.0001
    f = to_feature(QuPathObject(Point(x, y)))
    assert f["geometry"]["coordinates"] == [x, y]
    assert json.loads(json.dumps(f))["geometry"]["coordinates"] == [x, y]
    tile = Polygon([(1e5 + 0.0004, 7.0), (1e5 + 150.0004, 7.0), (1e5 + 150.0004, 157.0), (1e5 + 0.0004, 157.0)])
    written = to_feature(QuPathObject(tile))["geometry"]["coordinates"][0]
    assert written[0] == [1e5 + 0.0004, 7] and isinstance(written[0][1], int)
    [back] = parse_qupath_geojson(to_feature(QuPathObject(tile)))
    assert back.geometry.equals_exact(tile, tolerance=0)
    negative_zero = to_feature(QuPathObject(Point(-0.0, 3.0)))["geometry"]["coordinates"]
    assert negative_zero == [0, 3] and json.dumps(negative_zero) == "[0, 3]"


def test_written_features_are_geojson_objects_valid_by_geojson() -> None:
    features = feature_collection(ROUND_TRIP_OBJECTS)
    assert isinstance(features, geojson.FeatureCollection) and features.is_valid
    for f in features["features"]:
        assert isinstance(f, geojson.Feature) and f.is_valid and not f.errors()
        assert isinstance(f["geometry"], (geojson.geometry.Geometry, geojson.GeometryCollection))
    assert geojson.loads(dumps_feature_collection(ROUND_TRIP_OBJECTS)).is_valid


def test_children_are_written_inside_properties() -> None:
    region, tile = ROUND_TRIP_OBJECTS[0], ROUND_TRIP_OBJECTS[1]
    child = to_feature(tile)
    parent = to_feature(region, children=[child])
    assert "childObjects" not in parent and parent["properties"]["childObjects"] == [child]
    assert parse_qupath_geojson(parent) == [region, tile]
    assert "childObjects" not in to_feature(region)["properties"]  # no empty array without children


def test_writing_feature_level_children_is_refused() -> None:
    child = to_feature(ROUND_TRIP_OBJECTS[1])
    wrong = dict(to_feature(ROUND_TRIP_OBJECTS[0]))
    wrong["childObjects"] = [child]  # the form QuPath ignores
    with pytest.raises(InvalidGeoJSONError, match=r"child 0 has \"childObjects\" at the Feature level.*Fix: put"):
        to_feature(ROUND_TRIP_OBJECTS[2], children=[wrong])
    with pytest.raises(InvalidGeoJSONError, match=r"^cannot write feature 1: has \"childObjects\" at the Feature"):
        check_qupath_nesting([child, wrong])
    deep = to_feature(ROUND_TRIP_OBJECTS[2], children=[to_feature(ROUND_TRIP_OBJECTS[5])])
    deep["properties"]["childObjects"][0]["childObjects"] = [child]
    with pytest.raises(InvalidGeoJSONError, match=r"cannot write region 0/child 0: "):
        check_qupath_nesting([deep], what="region")
    check_qupath_nesting([to_feature(ROUND_TRIP_OBJECTS[0], children=[child]), child])  # the right form passes
    with pytest.raises(InvalidGeoJSONError, match="child 0 is not a Feature"):
        to_feature(ROUND_TRIP_OBJECTS[0], children=[{"type": "Polygon"}])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_coordinates_are_refused_on_write(bad: float) -> None:
    with pytest.raises(InvalidGeoJSONError, match="NaN or infinite coordinate"):
        to_feature(QuPathObject(Point(bad, 0), name="p"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None, True])
def test_to_feature_rejects_bad_measurements(bad: Any) -> None:
    obj = QuPathObject(Point(0, 0), measurements={"good": 1.0, "HQ score": bad}, name="r9")
    with pytest.raises(InvalidGeoJSONError, match=r"measurement 'HQ score'") as info:
        to_feature(obj)
    assert "r9" in str(info.value)


def test_to_feature_rejects_class_without_colour() -> None:
    with pytest.raises(InvalidGeoJSONError, match=r"class 'HQ Tumour' has no colour"):
        to_feature(QuPathObject(Point(0, 0), class_names=("HQ Tumour",)))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"object_type": "Annotation"}, "object_type 'Annotation'"),
        ({"object_id": "not-a-uuid"}, "not a UUID"),
        ({"class_names": ("Tumor: Positive",), "color_rgb": (1, 2, 3)}, "contains ':'"),
        ({"class_names": ("Tumor",), "color_rgb": (1, 2, 300)}, "integers 0-255"),
        ({"metadata": {"n": 3}}, "metadata 'n'"),
        ({"geometry": Polygon()}, "geometry is empty"),
    ],
)
def test_to_feature_rejects_what_qupath_would_refuse_or_alter(changes: dict[str, Any], expected: str) -> None:
    fields = {"geometry": Point(0, 0), **changes}
    with pytest.raises(InvalidGeoJSONError, match=expected):
        to_feature(QuPathObject(**fields))


def test_feature_collection_error_names_the_object_index() -> None:
    objects = [QuPathObject(Point(0, 0)), QuPathObject(Point(0, 0), measurements={"x": math.nan})]
    with pytest.raises(InvalidGeoJSONError, match=r"^object 1: "):
        dumps_feature_collection(objects)


def test_invalid_polygon_is_made_valid() -> None:
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bow_tie.is_valid
    [obj] = parse_qupath_geojson(to_feature(QuPathObject(bow_tie, class_names=("A",), color_rgb=(1, 1, 1))))
    assert obj.geometry.is_valid
    assert isinstance(obj.geometry, MultiPolygon)
    assert obj.geometry.area == pytest.approx(50)


def test_polygon_without_area_is_an_error() -> None:
    flat = Polygon([(0, 0), (10, 0), (20, 0), (0, 0)])
    with pytest.raises(InvalidGeoJSONError, match="no area"):
        to_feature(QuPathObject(flat))


def test_parse_of_own_output_does_not_mutate_input() -> None:
    f = to_feature(ROUND_TRIP_OBJECTS[0])
    before = copy.deepcopy(f)
    parse_qupath_geojson(f)
    assert f == before


# ---------------------------------------------------------------------------------------------------------------
# polygonal_part
# ---------------------------------------------------------------------------------------------------------------


def test_polygonal_part() -> None:
    square = Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])
    assert polygonal_part(square) is square
    assert polygonal_part(None) is None
    assert polygonal_part(Polygon()) is None
    assert polygonal_part(LineString([(0, 0), (1, 1)])) is None
    assert polygonal_part(Point(0, 0)) is None
    mixed = GeometryCollection([square, LineString([(5, 5), (6, 6)]), Point(9, 9)])
    assert polygonal_part(mixed).equals(square)
    overlapping = GeometryCollection([square, Polygon([(0.5, 0), (2, 0), (2, 1), (0.5, 1)])])
    merged = polygonal_part(overlapping)
    assert merged.is_valid
    assert merged.area == pytest.approx(2)
    bow_tie = polygonal_part(Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]))
    assert isinstance(bow_tie, MultiPolygon) and bow_tie.is_valid


# ---------------------------------------------------------------------------------------------------------------
# QuPath's own reading (the kit: QuPath 0.6.0's PathIO.readObjects, in a subprocess)
# ---------------------------------------------------------------------------------------------------------------


def test_qupath_reads_the_written_children_and_drops_feature_level_ones(qupath_kit, tmp_path: Path) -> None:
    """What we write nests as QuPath reads it (every child kept, under its parent); the Feature-level form, which
    we refuse to read or write, really loses its children in QuPath."""
    region, tile, detection = ROUND_TRIP_OBJECTS[0], ROUND_TRIP_OBJECTS[1], ROUND_TRIP_OBJECTS[2]
    written = tmp_path / "nested.geojson"
    written.write_text(json.dumps(collection(to_feature(region, children=[to_feature(tile), to_feature(detection)]))))
    ours = parse_qupath_geojson(written.read_text())
    qupath = qupath_kit.read_geojson(written).result
    assert qupath["read"] and qupath["objects"] == 1
    assert qupath["objects_with_children"] == len(ours) == 3
    assert qupath["ids_kept"] == 3 and qupath["measurements_float32"]["compared"] > 0
    wrong = to_feature(region)
    wrong["childObjects"] = [to_feature(tile), to_feature(detection)]
    dropped = tmp_path / "feature-level.geojson"
    dropped.write_text(json.dumps(collection(wrong)))
    qupath = qupath_kit.read_geojson(dropped).result
    assert qupath["read"] and qupath["objects_with_children"] == 1  # QuPath: the parent only, silently
    with pytest.raises(InvalidGeoJSONError, match="would silently drop 2 child object"):
        read_qupath_geojson(dropped)
