"""The QuPath GeoJSON dialect: the one place that builds and parses QuPath GeoJSON.

QuPath reads a GeoJSON file all-or-nothing: one feature it dislikes (``"properties": null``, a null geometry, an
unclosed ring, a classification without a colour, a hex colour, a non-numeric measurement string) and the whole
file imports zero objects, often with nothing more than a log line. Files with another extension than
``.geojson`` / ``.json`` (also ``.gz``, ``.zip``) import zero objects silently. So this module

* parses what QuPath parses, with QuPath's rules (``parse_qupath_geojson``, ``read_qupath_geojson``), and rejects
  what QuPath would reject with an :class:`InvalidGeoJSONError` that names the source, the feature and the fix;
* writes only features that QuPath imports without loss (``to_feature``, ``feature_collection``,
  ``dumps_feature_collection``), children nested where QuPath reads them: ``properties.childObjects``.

Plain GeoJSON is the ``geojson`` package's: written Features, FeatureCollections and geometries are its objects,
and geometries (written and read) are checked with its ``errors()``; QuPath's own rules sit on top, here.
The facts this module follows are those in ``shared/QUPATH.md`` (observed with QuPath 0.5.1 / 0.6.0).

Coordinates are level-0 pixels, x to the right, y down, as QuPath stores them, and are written as they are (no
rounding); z is ignored.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import numbers
import os
import re
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geojson
import numpy as np
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity, make_valid

from .errors import InvalidGeoJSONError

__all__ = [
    "CHILD_OBJECTS",
    "OBJECT_TYPES",
    "GeoJSONFileNotFoundError",
    "QuPathObject",
    "check_qupath_nesting",
    "dumps_feature_collection",
    "feature_collection",
    "parse_qupath_geojson",
    "polygonal_part",
    "read_qupath_geojson",
    "to_feature",
]

_log = logging.getLogger(__name__)

#: The ``properties.objectType`` values QuPath maps to its object kinds (lower case, as QuPath writes them).
OBJECT_TYPES: tuple[str, ...] = ("annotation", "detection", "tile", "cell")

# Extensions from which QuPath imports objects; any other one silently imports zero objects.
_JSON_SUFFIXES = (".geojson", ".json")
# Canonical UUID text, the only id form QuPath keeps (java.util.UUID.fromString); other ids are replaced.
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
#: The key under which QuPath nests child objects: read only inside a Feature's ``properties`` (QuPath 0.6
#: silently ignores it beside ``properties``, and the children are lost).
CHILD_OBJECTS = "childObjects"
_CHILDREN_FIX = (f'put the children inside the parent\'s properties, "properties": {{..., "{CHILD_OBJECTS}": [...]}} '
                 "(to_feature(parent, children=[...]) writes them there)")
_ALL_OR_NOTHING = "QuPath rejects the whole file when one feature is bad (it imports zero objects)"


class GeoJSONFileNotFoundError(InvalidGeoJSONError, FileNotFoundError):
    """The GeoJSON file to read does not exist (catch it as ours or as the builtin FileNotFoundError)."""


@dataclass(frozen=True)
class QuPathObject:
    """One QuPath object as Python values.

    ``geometry`` is a shapely geometry in level-0 pixel coordinates (x right, y down). ``object_type`` is one of
    :data:`OBJECT_TYPES`. ``class_names`` is ``()`` for an unclassified object, one name for a plain class and
    several for a derived class (``("Tumor", "Positive")`` is QuPath's ``Tumor: Positive``). ``color_rgb``
    (0-255) is the classification's colour, which QuPath requires whenever a class is written; on an
    unclassified object it is the object's own display colour. ``object_id`` is a UUID string or ``None`` (a
    new one is made when writing). ``measurements`` are numbers by name; QuPath stores them as float32.
    """

    geometry: BaseGeometry
    object_type: str = "annotation"
    class_names: tuple[str, ...] = ()
    color_rgb: tuple[int, int, int] | None = None
    name: str | None = None
    measurements: Mapping[str, float] = field(default_factory=dict)
    object_id: str | None = None
    is_locked: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (a common slip) so that equality and writing behave the same.
        names = self.class_names
        object.__setattr__(self, "class_names", (names,) if isinstance(names, str) else tuple(names))
        if self.color_rgb is not None:
            object.__setattr__(self, "color_rgb", tuple(self.color_rgb))


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class _Problem(Exception):
    """What is wrong with one feature and how to fix it; turned into an InvalidGeoJSONError with its context.

    ``consequence`` says what QuPath would do with the file (by default: import nothing from it)."""

    def __init__(self, problem: str, fix: str, consequence: str = _ALL_OR_NOTHING) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.consequence = consequence


def _feature_error(source: str, label: str, feature: Any, problem: _Problem) -> InvalidGeoJSONError:
    """An error naming the source, the feature (index and id) and the fix, so the user can find and mend it."""
    feature_id = feature.get("id") if isinstance(feature, dict) else None
    where = f"feature {label}" + (f" (id {feature_id!r})" if feature_id is not None else "")
    return InvalidGeoJSONError(f"{source}: {where}: {problem.problem}. {problem.consequence}. Fix: {problem.fix}.")


def _file_error(source: str, problem: str, fix: str) -> InvalidGeoJSONError:
    """An error about the input as a whole (not JSON, not a Feature container, unreadable file)."""
    return InvalidGeoJSONError(f"{source}: {problem}. Fix: {fix}.")


# --------------------------------------------------------------------------------------------------------------
# Parsing: JSON text -> features
# --------------------------------------------------------------------------------------------------------------


def parse_qupath_geojson(data: bytes | str | object, *, source: str = "<input>") -> list[QuPathObject]:
    """Parse QuPath GeoJSON into :class:`QuPathObject` s, applying the rules QuPath applies on import.

    ``data`` is JSON text (``bytes`` or ``str``) or an already-decoded JSON value: a FeatureCollection, a bare
    array of Features (QuPath's default export form) or a single Feature. ``source`` names the input in error
    messages (a path, a request name). Anything QuPath would reject raises :class:`InvalidGeoJSONError` naming
    ``source``, the feature index (and id) and the fix, because QuPath itself would import nothing from it.
    Measurements keep the values written in the file (QuPath would round them to float32).

    Children nested in ``properties.childObjects`` follow their parent in the list (depth first). A non-empty
    ``childObjects`` beside ``properties`` (at the Feature level) is refused: QuPath would read the parent and
    silently drop those children.
    """
    value = _decode_json(data, source) if isinstance(data, (bytes, bytearray, str)) else data
    objects: list[QuPathObject] = []
    for label, feature in _labelled_features(_top_level_features(value, source)):
        try:
            _check_no_feature_level_children(feature)
            objects.append(_object_from_feature(feature))
        except _Problem as problem:
            raise _feature_error(source, label, feature, problem) from None
    return objects


def _decode_json(data: bytes | bytearray | str, source: str) -> Any:
    """Decode JSON text; bytes may be UTF-8 (with or without BOM), UTF-16 or UTF-32 as json detects."""
    try:
        if isinstance(data, str):
            return json.loads(data.removeprefix("\ufeff"))
        return json.loads(bytes(data))
    except json.JSONDecodeError as exc:
        raise _file_error(
            source,
            f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); QuPath would import nothing",
            "export the objects again from QuPath, or repair the JSON syntax at that position",
        ) from None
    except UnicodeDecodeError as exc:
        raise _file_error(source, f"not UTF-8 text ({exc.reason})", "save the file as UTF-8 JSON") from None


def _top_level_features(value: Any, source: str) -> list[Any]:
    """The features of the three containers QuPath reads: FeatureCollection, bare array, single Feature."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "FeatureCollection" or (kind is None and "features" in value):
            features = value.get("features")
            if not isinstance(features, list):
                raise _file_error(
                    source,
                    'a FeatureCollection whose "features" is not an array; QuPath would import zero objects',
                    'write "features": [ ...Feature objects... ]',
                )
            return features
        if kind == "Feature" or (kind is None and "geometry" in value):
            return [value]
        raise _file_error(
            source,
            f"the top-level JSON object has type {kind!r}, not a FeatureCollection, an array of Features or "
            "a Feature; QuPath would import nothing",
            'wrap a bare geometry in {"type": "Feature", "geometry": ..., "properties": {"objectType": "annotation"}}',
        )
    raise _file_error(
        source,
        f"the top-level JSON value is {_json_kind(value)}, not a FeatureCollection, an array of Features or a "
        "Feature; QuPath would import nothing",
        'write a FeatureCollection {"type": "FeatureCollection", "features": [...]}',
    )


def _labelled_features(features: list[Any]) -> Iterator[tuple[str, Any]]:
    """Each feature with its index label; children nested in ``properties.childObjects`` follow their parent
    (labelled ``3/child 0``), flattened so that none is dropped."""
    for index, feature in enumerate(features):
        yield from _with_children(str(index), feature)


def _with_children(label: str, feature: Any) -> Iterator[tuple[str, Any]]:
    """The feature, then its children depth-first, read where QuPath reads them: ``properties.childObjects``."""
    yield label, feature
    if not isinstance(feature, dict):
        return
    properties = feature.get("properties")
    children = properties.get(CHILD_OBJECTS) if isinstance(properties, dict) else None
    if isinstance(children, list):
        for index, child in enumerate(children):
            yield from _with_children(f"{label}/child {index}", child)


def _check_no_feature_level_children(feature: Any) -> None:
    """A non-empty ``childObjects`` beside ``properties`` is a _Problem: QuPath ignores it without a word, so the
    children would be lost in QuPath while a reader that accepted them would count them."""
    if not isinstance(feature, Mapping):
        return
    children = feature.get(CHILD_OBJECTS)
    if children is None or children == []:
        return
    count = f"{len(children)} child object(s)" if isinstance(children, list) else "its child objects"
    raise _Problem(
        f'has "{CHILD_OBJECTS}" at the Feature level, beside "properties"; QuPath reads "{CHILD_OBJECTS}" only '
        f"inside \"properties\" and would silently drop {count}",
        _CHILDREN_FIX,
        consequence="QuPath would import the parent without them",
    )


def _json_kind(value: Any) -> str:
    """A JSON type name for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------------------------
# Parsing: one feature -> QuPathObject
# --------------------------------------------------------------------------------------------------------------


def _object_from_feature(feature: Any) -> QuPathObject:
    """One Feature as QuPath reads it; raises _Problem for what QuPath would reject."""
    if not isinstance(feature, dict):
        raise _Problem(f"is {_json_kind(feature)}, not a Feature object", 'write {"type": "Feature", ...}')
    if feature.get("type", "Feature") != "Feature":
        raise _Problem(f"has type {feature.get('type')!r}, not 'Feature'", 'set "type": "Feature"')
    properties = _properties_of(feature)
    geometry = _geometry_from_json(feature.get("geometry"), "geometry")
    class_names, class_color = _classification_from_json(properties.get("classification"))
    color = class_color if class_names else _object_color(properties.get("color"))
    return QuPathObject(
        geometry=geometry,
        object_type=_object_type(properties.get("objectType")),
        class_names=class_names,
        color_rgb=color,
        name=_name_from_json(properties.get("name")),
        measurements=_measurements_from_json(properties.get("measurements")),
        object_id=_id_from_json(feature.get("id")),
        is_locked=_locked_from_json(properties.get("isLocked")),
        metadata=_metadata_from_json(properties.get("metadata")),
    )


def _properties_of(feature: dict[str, Any]) -> dict[str, Any]:
    """The properties object; QuPath fails on ``"properties": null`` (legal GeoJSON) or a non-object."""
    if "properties" not in feature:
        return {}
    properties = feature["properties"]
    if properties is None:
        raise _Problem(
            '"properties" is null (legal GeoJSON, but QuPath cannot read it)',
            'write "properties": {"objectType": "annotation"} (at least an empty object {})',
        )
    if not isinstance(properties, dict):
        raise _Problem(f'"properties" is {_json_kind(properties)}, not an object', 'write "properties": {...}')
    return properties


def _object_type(value: Any) -> str:
    """QuPath's rule: only the lower-case names are recognised; anything else (capitalised, missing) is an
    annotation."""
    return value if isinstance(value, str) and value in OBJECT_TYPES else "annotation"


def _id_from_json(value: Any) -> str | None:
    """A UUID id is kept (normalised to lower case, as QuPath writes it); QuPath replaces anything else."""
    if isinstance(value, str) and _UUID_RE.match(value):
        return str(uuid.UUID(value))
    if value is not None:
        _log.warning("GeoJSON feature id %r is not a UUID; QuPath replaces it with a random one", value)
    return None


def _name_from_json(value: Any) -> str | None:
    """The object's name (a string)."""
    if value is None or isinstance(value, str):
        return value
    raise _Problem(f'"name" is {_json_kind(value)}, not a string', "write the name as a JSON string")


def _locked_from_json(value: Any) -> bool:
    """QuPath's Gson rule: true, or a string equal to "true" ignoring case; anything else is unlocked."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _metadata_from_json(value: Any) -> dict[str, str]:
    """String metadata; QuPath keeps primitive values as their text and skips objects, arrays and null."""
    if not isinstance(value, dict):
        return {}
    return {key: _primitive_text(item) for key, item in value.items() if _is_primitive(item)}


def _is_primitive(value: Any) -> bool:
    """A JSON string, number or boolean (not null, array or object)."""
    return isinstance(value, (str, bool, int, float))


def _primitive_text(value: Any) -> str:
    """A primitive as Gson's getAsString writes it (booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _object_color(value: Any) -> tuple[int, int, int] | None:
    """An unclassified object's display colour: ``[r, g, b]`` or QuPath's packed RGB integer; else none."""
    if isinstance(value, list):
        try:
            return _rgb(value)
        except _Problem:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    return None


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------


def _classification_from_json(value: Any) -> tuple[tuple[str, ...], tuple[int, int, int] | None]:
    """Class names and colour from ``{"name", "color"}``, ``{"names": [...], "color"}`` or a plain string.

    A plain string takes QuPath's ``"Tumor: Positive"`` notation for derived classes and has no colour (QuPath
    picks one). An object must carry ``"color": [r, g, b]``: QuPath fails the whole file otherwise.
    """
    if value is None:
        return (), None
    if isinstance(value, str):
        return _names_from_text(value), None
    if not isinstance(value, dict):
        raise _Problem(
            f'"classification" is {_json_kind(value)}', 'write {"name": "...", "color": [r, g, b]} or a string'
        )
    names = _class_names_of(value)
    if "color" not in value:
        raise _Problem(
            f"classification {_class_label(names)!r} has no colour (QuPath fails the whole file on this)",
            'add "color": [r, g, b] with integers 0-255 to the classification',
        )
    return names, _rgb(value["color"], what=f"colour of classification {_class_label(names)!r}")


def _names_from_text(text: str) -> tuple[str, ...]:
    """QuPath's class notation: ``"Tumor: Positive"`` is the class Tumor derived by Positive."""
    return tuple(part.strip() for part in text.split(":") if part.strip())


def _class_names_of(classification: dict[str, Any]) -> tuple[str, ...]:
    """The names of a classification object (``names`` for a derived class, else ``name``)."""
    names = classification.get("names")
    if names is not None:
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
            raise _Problem('classification "names" is not a non-empty array of strings', 'write "names": ["A", "B"]')
        return tuple(names)
    name = classification.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Problem("classification has no name", 'write {"name": "...", "color": [r, g, b]}')
    return _names_from_text(name)


def _class_label(names: tuple[str, ...]) -> str:
    """QuPath's display form of a class (``Tumor: Positive``)."""
    return ": ".join(names)


def _rgb(value: Any, *, what: str = "colour") -> tuple[int, int, int]:
    """An ``[r, g, b]`` colour of integers 0-255; a hex string (which QuPath cannot read) or anything else is an
    error."""
    if isinstance(value, str):
        raise _Problem(f"{what} is the string {value!r} (QuPath fails on hex colours)", "write [r, g, b], 0-255")
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_byte(c) for c in value)):
        raise _Problem(f"{what} is {value!r}, not [r, g, b] with integers 0-255", "write [r, g, b], 0-255")
    r, g, b = (int(c) for c in value)
    return r, g, b


def _is_byte(value: Any) -> bool:
    """An integer (or integral number) in 0-255."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    number = float(value)
    return number.is_integer() and 0 <= number <= 255


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


def _measurements_from_json(value: Any) -> dict[str, float]:
    """Measurements from ``{name: number}`` or the old ``[{"name", "value"}]`` form; other forms are ignored,
    as QuPath ignores them."""
    if isinstance(value, dict):
        entries: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        entries = [_legacy_measurement(entry) for entry in value]
    else:
        return {}
    measurements: dict[str, float] = {}
    for name, raw in entries:
        number = _measurement_value(str(name), raw)
        if number is not None:
            measurements[str(name)] = number
    return measurements


def _legacy_measurement(entry: Any) -> tuple[str, Any]:
    """One ``{"name": ..., "value": ...}`` entry of the pre-0.4 list form."""
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and "value" in entry):
        raise _Problem(
            f'measurement list entry {entry!r} is not {{"name": ..., "value": ...}}',
            'write measurements as an object {"name": number, ...}',
        )
    return entry["name"], entry["value"]


def _measurement_value(name: str, raw: Any) -> float | None:
    """A measurement as a float; QuPath drops booleans and null (with a warning) and fails on non-numeric
    strings, while it reads numeric strings, ``"NaN"`` and ``"inf"``."""
    if raw is None or isinstance(raw, bool):
        _log.warning("measurement %r has value %r; QuPath drops it", name, raw)
        return None
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        return _float_from_text(name, raw)
    raise _Problem(f"measurement {name!r} is {_json_kind(raw)}, not a number", f"write {name!r} as a JSON number")


def _float_from_text(name: str, text: str) -> float:
    """A numeric string (``"0.5"``, ``"NaN"``, ``"inf"``) as a float; anything else fails QuPath's import."""
    try:
        if "_" in text:  # Python's float() accepts digit separators, QuPath does not
            raise ValueError(text)
        return float(text.strip())
    except ValueError:
        raise _Problem(
            f"measurement {name!r} is the non-numeric string {text!r} (QuPath fails the whole file on this)",
            f"write {name!r} as a JSON number, or drop it",
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Geometry from JSON
# --------------------------------------------------------------------------------------------------------------

_SIMPLE_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon")
# The geojson package's geometry types (plain GeoJSON, with their validity checks), by GeoJSON type name.
_PLAIN_GEOMETRIES: dict[str, type[geojson.geometry.Geometry]] = {
    "Point": geojson.Point,
    "MultiPoint": geojson.MultiPoint,
    "LineString": geojson.LineString,
    "MultiLineString": geojson.MultiLineString,
    "Polygon": geojson.Polygon,
    "MultiPolygon": geojson.MultiPolygon,
}


def _plain_geometry(kind: str, coordinates: list[Any]) -> geojson.geometry.Geometry:
    """The geojson package's geometry object of this type, holding ``coordinates`` exactly as given.

    The coordinates are set after construction: geojson's constructor would round each one (to 6 decimals by
    default) in a pure-Python walk, which changes pixel coordinates and costs more than the rest of a tile.
    """
    plain = _PLAIN_GEOMETRIES[kind]()
    plain["coordinates"] = coordinates
    return plain


def _geometry_from_json(value: Any, where: str) -> BaseGeometry:
    """A 2-D shapely geometry from GeoJSON, checked as QuPath's JTS reader checks it (z is dropped).

    Self-intersecting polygons are kept as they are, as QuPath keeps them.
    """
    return shape(_clean_geometry(value, where))


def _clean_geometry(value: Any, where: str) -> geojson.geometry.Geometry | geojson.GeometryCollection:
    """The geometry as a geojson object with 2-D coordinates, after the checks that would make QuPath fail:
    QuPath's rules on positions here, GeoJSON's structure (closed rings of 4 positions or more, lines of 2 or
    more) by geojson's ``errors()``."""
    if value is None:
        raise _Problem(f'"{where}" is null or missing', f'give the feature a "{where}" (e.g. a Polygon)')
    if not isinstance(value, dict):
        raise _Problem(f'"{where}" is {_json_kind(value)}, not a geometry object', "write a GeoJSON geometry")
    kind = value.get("type")
    if kind == "GeometryCollection":
        parts = value.get("geometries")
        if not isinstance(parts, list):
            raise _Problem(f'{where} GeometryCollection has no "geometries" array', 'write "geometries": [...]')
        return geojson.GeometryCollection([_clean_geometry(p, f"{where} part {i}") for i, p in enumerate(parts)])
    if kind not in _SIMPLE_GEOMETRY_TYPES:
        raise _Problem(f"{where} has unknown type {kind!r}", f"use one of {', '.join(_SIMPLE_GEOMETRY_TYPES)}")
    if "coordinates" not in value:
        raise _Problem(f'{where} ({kind}) has no "coordinates"', 'add the "coordinates" array')
    plain = _plain_geometry(kind, _clean_coordinates(kind, value["coordinates"], where))
    errors = plain.errors()
    if errors:
        raise _structure_problem(kind, plain["coordinates"], where, errors)
    return plain


def _clean_coordinates(kind: str, coords: Any, where: str) -> Any:
    """2-D coordinates of one simple geometry type, nested as GeoJSON nests them (lists all the way down)."""
    if kind == "Point":
        return _position(coords, where)
    if kind in ("MultiPoint", "LineString"):
        return _positions(coords, where)
    if kind == "MultiLineString":
        return [_positions(line, f"{where} line {i}") for i, line in enumerate(_array(coords, where))]
    if kind == "Polygon":
        return _rings(coords, where)
    return [_rings(poly, f"{where} polygon {i}") for i, poly in enumerate(_array(coords, where))]


def _array(value: Any, where: str) -> Sequence[Any]:
    """A JSON array, or a _Problem naming where."""
    if not isinstance(value, (list, tuple)):
        raise _Problem(f"{where} coordinates contain {_json_kind(value)} where an array is needed", "fix the nesting")
    return value


def _position(value: Any, where: str) -> list[float]:
    """An ``[x, y]`` or ``[x, y, z]`` position as ``[x, y]``; z is ignored, as in QuPath, and x, y must be finite
    numbers (QuPath fails on text or booleans; JSON has no NaN)."""
    if not (
        isinstance(value, (list, tuple))
        and len(value) >= 2
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in value[:2])
    ):
        raise _Problem(f"{where} has the position {value!r}, not [x, y] with finite numbers", "write [x, y]")
    return [float(value[0]), float(value[1])]


def _positions(coords: Any, where: str) -> list[list[float]]:
    """An array of positions (a line, a ring, a MultiPoint)."""
    return [_position(p, where) for p in _array(coords, where)]


def _rings(coords: Any, where: str) -> list[list[list[float]]]:
    """A Polygon's rings."""
    return [_positions(ring, _ring_label(where, i)) for i, ring in enumerate(_array(coords, where))]


def _ring_label(where: str, index: int) -> str:
    return f"{where} ring {index} ({'exterior' if index == 0 else 'hole'})"


def _structure_problem(kind: str, coords: Any, where: str, errors: Any) -> _Problem:
    """What geojson's ``errors()`` found, told for the first ring or line at fault (JTS inside QuPath fails on
    the same: a ring must be closed with at least 4 positions, a line needs at least 2)."""
    if kind in ("Polygon", "MultiPolygon"):
        polygons = [(where, coords)] if kind == "Polygon" else [
            (f"{where} polygon {i}", poly) for i, poly in enumerate(coords)]
        for label, rings in polygons:
            for index, ring in enumerate(rings):
                ring_label = _ring_label(label, index)
                if len(ring) < 4:
                    return _Problem(
                        f"{ring_label} has {len(ring)} positions; a closed ring needs at least 4",
                        "list at least 3 distinct corners and repeat the first position at the end",
                    )
                if ring[0] != ring[-1]:
                    return _Problem(
                        f"{ring_label} is not closed: it starts at {tuple(ring[0])} and ends at {tuple(ring[-1])}",
                        "repeat the ring's first position as its last position",
                    )
    if kind in ("LineString", "MultiLineString"):
        lines = [(where, coords)] if kind == "LineString" else [
            (f"{where} line {i}", line) for i, line in enumerate(coords)]
        for label, line in lines:
            if len(line) < 2:
                return _Problem(f"{label} is a line with {len(line)} position(s)", "give a line at least 2 positions")
    return _Problem(f"{where} ({kind}) is not valid GeoJSON: {errors}", "fix the geometry's coordinates")


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


def read_qupath_geojson(path: str | os.PathLike[str]) -> list[QuPathObject]:
    """Read a QuPath GeoJSON file: ``.geojson`` / ``.json``, also gzip-compressed (``.gz``) or zipped (``.zip``,
    every ``.geojson`` / ``.json`` member in name order).

    Another extension raises :class:`InvalidGeoJSONError`: QuPath would silently import zero objects from it, so
    we refuse it rather than let a file work here and not there. A missing file raises
    :class:`GeoJSONFileNotFoundError`.
    """
    file = Path(path)
    kind = _file_kind(file)
    try:
        if kind == "zip":
            return _read_zip(file)
        raw = gzip.decompress(file.read_bytes()) if kind == "gz" else file.read_bytes()
    except FileNotFoundError:
        relative = "" if file.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise GeoJSONFileNotFoundError(f"{file}: no such file. Fix: check the path{relative}.") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise _file_error(str(file), f"cannot be read ({exc})", "check that it is a complete, readable file") from None
    return parse_qupath_geojson(raw, source=str(file))


def _file_kind(file: Path) -> str:
    """``json``, ``gz`` or ``zip`` from the file name; any other extension is refused with the reason."""
    name = file.name.lower()
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(".gz"):
        return "gz"
    if name.endswith(".zip"):
        return "zip"
    raise _file_error(
        str(file),
        f"the extension {file.suffix or '(none)'!r} is not one QuPath reads objects from; QuPath would silently "
        "import zero objects from this file",
        f"rename it to {file.stem}.geojson (or .json; .gz and .zip for compressed files)",
    )


def _read_zip(file: Path) -> list[QuPathObject]:
    """All objects of the ``.geojson`` / ``.json`` members of a zip archive."""
    with zipfile.ZipFile(file) as archive:
        members = sorted(n for n in archive.namelist() if n.lower().endswith(_JSON_SUFFIXES))
        if not members:
            raise _file_error(str(file), "the zip archive holds no .geojson or .json file", "zip the .geojson file")
        objects: list[QuPathObject] = []
        for member in members:
            objects.extend(parse_qupath_geojson(archive.read(member), source=f"{file}!{member}"))
        return objects


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def to_feature(obj: QuPathObject, *, children: Sequence[Mapping[str, Any]] = ()) -> geojson.Feature:
    """A GeoJSON Feature (the ``geojson`` package's) that QuPath imports without loss.

    The Feature carries a UUID ``id`` (a new uuid4 when ``obj.object_id`` is None), lower-case ``objectType``,
    a classification that always has its colour, finite float measurements, ``isLocked`` only when locked,
    metadata only when present, and a valid GeoJSON geometry (checked with geojson's ``errors()``): closed,
    valid rings (an invalid polygon is repaired with ``make_valid`` keeping its polygonal part), finite
    coordinates written as they are (level-0 pixels, no rounding; whole numbers as integers, as QuPath writes
    them). ``children`` (Features, e.g. from ``to_feature``) are nested in ``properties.childObjects``, the only
    place QuPath reads them. Anything QuPath would reject, alter or drop raises :class:`InvalidGeoJSONError`
    naming the object.
    """
    try:
        properties = _properties_for(obj)
        geometry = _geometry_for(obj.geometry)
        feature_id = _id_for(obj.object_id)
        if children:
            properties[CHILD_OBJECTS] = _children_for(children)
    except _Problem as problem:
        message = f"cannot write {_object_label(obj)}: {problem.problem}. Fix: {problem.fix}."
        raise InvalidGeoJSONError(message) from None
    return geojson.Feature(id=feature_id, geometry=geometry, properties=properties)


def feature_collection(objects: Iterable[QuPathObject]) -> geojson.FeatureCollection:
    """``{"type": "FeatureCollection", "features": [...]}`` (geojson's); an error names the index of the bad
    object."""
    features = []
    for index, obj in enumerate(objects):
        try:
            features.append(to_feature(obj))
        except InvalidGeoJSONError as exc:
            raise InvalidGeoJSONError(f"object {index}: {exc}") from None
    return geojson.FeatureCollection(features)


def check_qupath_nesting(features: Iterable[Mapping[str, Any]], *, what: str = "feature") -> None:
    """Refuse features that QuPath would read with loss of their children: a ``childObjects`` beside
    ``properties`` (at the Feature level, where QuPath 0.6 ignores it silently), at any depth. Raises
    :class:`InvalidGeoJSONError` naming the feature (``what`` and its index path) and the fix."""
    for label, feature in _labelled_features(list(features)):
        try:
            _check_no_feature_level_children(feature)
        except _Problem as problem:
            raise InvalidGeoJSONError(f"cannot write {what} {label}: {problem.problem}. Fix: {problem.fix}.") from None


def _children_for(children: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Child Features as QuPath nests them; a child carrying its own children beside its properties is refused."""
    result = []
    for index, child in enumerate(children):
        if not (isinstance(child, Mapping) and child.get("type") == "Feature"
                and isinstance(child.get("properties"), Mapping)):
            raise _Problem(f"child {index} is not a Feature with properties", "build children with to_feature")
        try:
            _check_no_feature_level_children(child)
        except _Problem as problem:
            raise _Problem(f"child {index} {problem.problem}", problem.fix) from None
        result.append(child)
    return result


def dumps_feature_collection(objects: Iterable[QuPathObject]) -> str:
    """The FeatureCollection as compact JSON text (UTF-8 characters kept, never NaN or Infinity)."""
    return json.dumps(feature_collection(objects), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _object_label(obj: QuPathObject) -> str:
    """How an object is named in error messages: its type, name and id where it has them."""
    label = f"{obj.object_type!r} object"
    if obj.name is not None:
        label += f" named {obj.name!r}"
    if obj.object_id is not None:
        label += f" (id {obj.object_id!r})"
    return label


def _id_for(object_id: str | None) -> str:
    """The Feature id: the object's UUID, or a new one; QuPath would replace a non-UUID id silently."""
    if object_id is None:
        return str(uuid.uuid4())
    if not (isinstance(object_id, str) and _UUID_RE.match(object_id)):
        raise _Problem(f"object_id {object_id!r} is not a UUID (QuPath would replace it)", "use str(uuid.uuid4())")
    return str(uuid.UUID(object_id))


def _properties_for(obj: QuPathObject) -> dict[str, Any]:
    """The properties object, with only the members QuPath reads back to the same values."""
    if obj.object_type not in OBJECT_TYPES:
        raise _Problem(f"object_type {obj.object_type!r} is not one of {OBJECT_TYPES}", "use a lower-case type")
    properties: dict[str, Any] = {"objectType": obj.object_type}
    if obj.name is not None:
        if not isinstance(obj.name, str):
            raise _Problem(f"name {obj.name!r} is not a string", "give a str name or None")
        properties["name"] = obj.name
    if obj.class_names:
        properties["classification"] = _classification_for(obj.class_names, obj.color_rgb)
    elif obj.color_rgb is not None:
        properties["color"] = list(_rgb(obj.color_rgb, what="color_rgb"))
    if obj.is_locked:
        properties["isLocked"] = True
    if obj.measurements:
        properties["measurements"] = _measurements_for(obj.measurements)
    if obj.metadata:
        properties["metadata"] = _metadata_for(obj.metadata)
    return properties


def _classification_for(names: tuple[str, ...], color: tuple[int, int, int] | None) -> dict[str, Any]:
    """``{"name", "color"}`` for one class, ``{"names", "color"}`` for a derived one; never without colour."""
    for name in names:
        if not isinstance(name, str) or not name.strip() or ":" in name or "\n" in name:
            raise _Problem(
                f"class name {name!r} is empty or contains ':' or a newline (QuPath reads ':' as a derived class)",
                'give each part separately: class_names=("Tumor", "Positive")',
            )
    if color is None:
        raise _Problem(
            f"class {_class_label(names)!r} has no colour; QuPath fails the whole file on a class without colour",
            "set color_rgb=(r, g, b) (see hepatoquant_client.classes for the project's colours)",
        )
    rgb = list(_rgb(color, what=f"color_rgb of class {_class_label(names)!r}"))
    if len(names) == 1:
        return {"name": names[0], "color": rgb}
    return {"names": list(names), "color": rgb}


def _measurements_for(measurements: Mapping[str, float]) -> dict[str, float]:
    """Finite floats by name; NaN, infinities and non-numbers are refused, naming the measurement."""
    result: dict[str, float] = {}
    for name, value in measurements.items():
        if not isinstance(name, str) or not name:
            raise _Problem(f"measurement name {name!r} is not a non-empty string", "name measurements with str")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Problem(f"measurement {name!r} is {value!r}, not a number", f"give {name!r} a float value")
        number = float(value)
        if not math.isfinite(number):
            raise _Problem(f"measurement {name!r} is {number} (not finite)", f"drop {name!r} or give it a finite value")
        result[name] = number
    return result


def _metadata_for(metadata: Mapping[str, str]) -> dict[str, str]:
    """String-to-string metadata, which is all QuPath keeps."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _Problem(f"metadata {key!r}: {value!r} is not a string pair", "convert metadata values with str()")
    return dict(metadata)


# --------------------------------------------------------------------------------------------------------------
# Geometry to JSON
# --------------------------------------------------------------------------------------------------------------


def polygonal_part(geometry: BaseGeometry | None) -> Polygon | MultiPolygon | None:
    """The polygonal part of any geometry (for regions: areas, not lines or points), or None when it has none.

    An invalid polygonal geometry is first repaired with ``make_valid``; polygons gathered from a collection
    are merged when they overlap, so that the result is a valid Polygon or MultiPolygon.
    """
    if geometry is None or geometry.is_empty:
        return None
    if not geometry.is_valid:
        geometry = make_valid(geometry)
    polygons = [p for p in _polygons_in(geometry) if not p.is_empty]
    if not polygons:
        return None
    if len(polygons) == 1:
        return polygons[0]
    merged = MultiPolygon(polygons)
    if merged.is_valid:
        return merged
    union = shapely.union_all(polygons)
    return polygonal_part(union) if isinstance(union, GeometryCollection) else union


def _polygons_in(geometry: BaseGeometry) -> Iterator[Polygon]:
    """Every Polygon within the geometry, collections and MultiPolygons opened."""
    if isinstance(geometry, Polygon):
        yield geometry
    elif isinstance(geometry, (MultiPolygon, GeometryCollection)):
        for part in geometry.geoms:
            yield from _polygons_in(part)


def _geometry_for(geometry: BaseGeometry) -> geojson.geometry.Geometry | geojson.GeometryCollection:
    """GeoJSON geometry (geojson's object) QuPath reads as intended: 2-D, finite, polygons valid with closed
    rings, coordinates not rounded."""
    if not isinstance(geometry, BaseGeometry):
        raise _Problem(f"geometry is {type(geometry).__name__}, not a shapely geometry", "pass a shapely geometry")
    if geometry.is_empty:
        raise _Problem("geometry is empty", "give the object a non-empty geometry")
    if isinstance(geometry, (Polygon, MultiPolygon)) and not geometry.is_valid:
        geometry = _repaired_polygonal(geometry)
    elif isinstance(geometry, GeometryCollection) and not geometry.is_valid:
        geometry = make_valid(geometry)
    plain = _plain_geometry_for(geometry)
    errors = plain.errors()
    if errors:
        raise _Problem(f"the geometry is not valid GeoJSON ({errors})", "give the object a valid geometry")
    return plain


def _plain_geometry_for(geometry: BaseGeometry) -> geojson.geometry.Geometry | geojson.GeometryCollection:
    """geojson's object for a shapely geometry, 2-D coordinates as they are (z dropped)."""
    if isinstance(geometry, Polygon):
        return _plain_geometry("Polygon", _polygon_coordinates(geometry))
    if isinstance(geometry, MultiPolygon):
        return _plain_geometry("MultiPolygon", [_polygon_coordinates(p) for p in geometry.geoms])
    if isinstance(geometry, GeometryCollection):
        return geojson.GeometryCollection([_plain_geometry_for(g) for g in geometry.geoms if not g.is_empty])
    if geometry.geom_type == "Point":
        return _plain_geometry("Point", _json_positions(geometry)[0])
    if geometry.geom_type in ("LineString", "LinearRing"):
        return _plain_geometry("LineString", _json_positions(geometry))
    if geometry.geom_type == "MultiPoint":
        return _plain_geometry("MultiPoint", _json_positions(geometry))
    if geometry.geom_type == "MultiLineString":
        return _plain_geometry("MultiLineString", [_json_positions(line) for line in geometry.geoms])
    raise _Problem(f"geometry type {geometry.geom_type} has no GeoJSON form", "give a Polygon or another GeoJSON type")


def _polygon_coordinates(polygon: Polygon) -> list[list[list[float]]]:
    """A polygon's rings (exterior first) as GeoJSON positions."""
    if not shapely.get_num_interior_rings(polygon):  # a tile: one ring, read in one call
        return [_json_positions(polygon)]
    return [_json_positions(polygon.exterior), *(_json_positions(ring) for ring in polygon.interiors)]


def _json_positions(geometry: BaseGeometry) -> list[list[float]]:
    """The geometry's 2-D positions as ``[x, y]`` lists, whole numbers as ints (compact, as QuPath writes them;
    -0.0 becomes 0). Values are never rounded: QuPath's coordinates are pixels, kept as they are. A NaN or an
    infinity (which JSON cannot hold) is a _Problem."""
    xy = shapely.get_coordinates(geometry)
    if not np.isfinite(xy).all():
        raise _Problem("geometry has a NaN or infinite coordinate", "give the object finite pixel coordinates")
    return [[int(x) if x.is_integer() else x, int(y) if y.is_integer() else y] for x, y in xy.tolist()]


def _repaired_polygonal(geometry: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    """A valid version of an invalid polygon, keeping only its area; an empty result is an error."""
    reason = explain_validity(geometry)
    repaired = polygonal_part(make_valid(geometry))
    if repaired is None or repaired.is_empty:
        raise _Problem(
            f"the polygon is invalid ({reason}) and has no area once repaired",
            "draw the region as a polygon that encloses an area",
        )
    return repaired
