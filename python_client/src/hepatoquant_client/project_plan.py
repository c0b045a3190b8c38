"""What writing HepatoQuant's results into a QuPath project means, without QuPath (research use only).

The paquo layer (:mod:`hepatoquant_client.paquo_project`) only moves objects in and out of QuPath; every
decision is made here, where it can be tested on any machine:

* :func:`map_image_uri`: the path on the server of an image a QuPath project names by URI (``file:/C:/...``),
  through ``FROM=TO`` prefix mappings (:func:`parse_mappings`);
* :func:`plan_replacement`: which objects a re-run removes (only HepatoQuant's) and which it adds;
* :func:`plan_hierarchy` / :func:`nest_tiles` / :func:`nested_features`: tiles (and regions) nested exactly as
  QuPath's ``resolveHierarchy()`` nests them, children written inside ``properties.childObjects``;
* :func:`project_classes`: the project's classes with HepatoQuant's colours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .classes import REGION_CLASSES, TISSUE_CLASSES
from .errors import HepatoQuantError
from .hepatoquant_objects import is_hepatoquant_object
from .qupath_geojson import QuPathObject, to_feature

__all__ = [
    "HierarchyPlan",
    "ReplacementPlan",
    "UriMapping",
    "UriMappingError",
    "map_image_uri",
    "nest_tiles",
    "nested_features",
    "parse_mappings",
    "plan_hierarchy",
    "plan_replacement",
    "project_classes",
    "uri_to_path",
]

_DRIVE = re.compile(r"^/?([A-Za-z]):(/|$)")


class UriMappingError(HepatoQuantError, ValueError):
    """An image URI that no mapping covers, a non-file URI, or a badly written ``FROM=TO`` mapping."""


@dataclass(frozen=True)
class UriMapping:
    """Paths starting with ``prefix_from`` (as the QuPath machine sees them; a ``file:`` URI or a path) start
    with ``prefix_to`` on the server."""

    prefix_from: str
    prefix_to: str

    def __post_init__(self) -> None:
        if not self.prefix_from or not self.prefix_to:
            raise UriMappingError(f"mapping {self.prefix_from!r}={self.prefix_to!r}: both sides must be non-empty")

    @classmethod
    def parse(cls, spec: str) -> UriMapping:
        """``"FROM=TO"`` (split at the first ``=``), e.g. ``"C:/slides=/data/slides"``."""
        prefix_from, sep, prefix_to = spec.partition("=")
        if not sep or not prefix_from.strip() or not prefix_to.strip():
            raise UriMappingError(
                f"mapping {spec!r} is not FROM=TO; write e.g. 'file:/C:/slides=/data/slides' or 'C:/slides=/data/slides'"
            )
        return cls(prefix_from.strip(), prefix_to.strip())


def parse_mappings(specs: Iterable[str]) -> list[UriMapping]:
    """The mappings of ``"FROM=TO"`` strings, in the order given."""
    return [UriMapping.parse(spec) for spec in specs]


def uri_to_path(uri: str) -> str:
    """The file path of a ``file:`` URI (or of a plain path), with ``/`` separators: percent-escapes decoded,
    ``file:/C:/x`` and ``file:///C:/x`` as ``C:/x``, ``file://server/share/x`` as ``//server/share/x``."""
    text = uri.strip()
    if _DRIVE.match(text) or "://" not in text and not text.lower().startswith("file:"):
        return _normal_path(text)  # already a path: C:\x, C:/x, /x
    parts = urlsplit(text)
    if parts.scheme.lower() != "file":
        raise UriMappingError(
            f"image URI {uri!r} is not a file URI ({parts.scheme}:); only images stored as files can be sent to the "
            "server, by path"
        )
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        path = f"//{parts.netloc}{path}"  # a UNC share
    return _normal_path(path)


def _normal_path(path: str) -> str:
    path = path.replace("\\", "/")
    match = _DRIVE.match(path)
    if match:  # /C:/x -> C:/x, and an upper-case drive letter so prefixes compare alike
        path = f"{match.group(1).upper()}:/{path[match.end():]}"
    return path


def _prefix_key(path: str) -> str:
    """The prefix as compared: normalised, without a trailing slash (a bare drive keeps ``C:/``)."""
    path = _normal_path(path)
    stripped = path.rstrip("/")
    return path if not stripped or re.fullmatch(r"[A-Z]:", stripped) else stripped


def _windows(path: str) -> bool:
    return bool(_DRIVE.match(path)) or path.startswith("//")


def map_image_uri(uri: str, mappings: Sequence[UriMapping]) -> str:
    """The server path of the image at ``uri``: the longest matching ``prefix_from`` (compared on whole path
    components, case-insensitively for Windows paths) replaced by its ``prefix_to``. No match raises
    :class:`UriMappingError` naming the URI and the configured prefixes."""
    path = uri_to_path(uri)
    best: tuple[int, UriMapping, str] | None = None
    for mapping in mappings:
        prefix = _prefix_key(uri_to_path(mapping.prefix_from))
        folded_path, folded_prefix = (path.lower(), prefix.lower()) if _windows(path) else (path, prefix)
        if folded_path == folded_prefix:
            rest = ""
        elif folded_path.startswith(folded_prefix if folded_prefix.endswith("/") else folded_prefix + "/"):
            rest = path[len(prefix):].lstrip("/")
        else:
            continue
        if best is None or len(prefix) > best[0]:
            best = (len(prefix), mapping, rest)
    if best is None:
        configured = ", ".join(repr(m.prefix_from) for m in mappings) or "none"
        raise UriMappingError(
            f"image {uri!r} (path {path!r}) lies under none of the mapped prefixes ({configured}); add a mapping "
            f"FROM=TO whose FROM starts this path and whose TO is the same folder as the server sees it"
        )
    _, mapping, rest = best
    target = mapping.prefix_to.replace("\\", "/") if _windows(mapping.prefix_to) else mapping.prefix_to
    if not rest:
        return target
    return f"{target.rstrip('/')}/{rest}" if target.rstrip("/") else f"/{rest}"


class ReplacementPlan(NamedTuple):
    """``to_remove``: HepatoQuant's own objects already there; ``to_add``: the new run's objects."""

    to_remove: list[QuPathObject]
    to_add: list[QuPathObject]


def plan_replacement(existing: Sequence[QuPathObject], new: Sequence[QuPathObject]) -> ReplacementPlan:
    """Replace the previous run's objects by the new ones, leaving every other object (a pathologist's) alone.

    Only objects :func:`is_hepatoquant_object` recognises are removed. Every new object must be recognisable
    too (else a later re-run could not replace it): an unmarked one raises ``ValueError`` naming it."""
    for index, obj in enumerate(new):
        if not is_hepatoquant_object(obj):
            raise ValueError(
                f"new object {index} ({obj.object_type!r}, name {obj.name!r}) carries no HepatoQuant marker; build "
                "it with hepatoquant_objects.tile_object / region_object"
            )
    return ReplacementPlan([o for o in existing if is_hepatoquant_object(o)], list(new))


def _geometry(item: QuPathObject | BaseGeometry) -> BaseGeometry:
    return item if isinstance(item, BaseGeometry) else item.geometry


class HierarchyPlan(NamedTuple):
    """Where QuPath's ``resolveHierarchy()`` puts each object: ``region_parent[i]`` is the index of the region
    that region ``i`` is nested in (None: the root), ``tile_parent[j]`` the region tile ``j`` is nested in
    (None: the root)."""

    region_parent: list[int | None]
    tile_parent: list[int | None]


def plan_hierarchy(
    regions: Sequence[QuPathObject | BaseGeometry], tiles: Sequence[QuPathObject | BaseGeometry]
) -> HierarchyPlan:
    """The hierarchy QuPath 0.6's ``resolveHierarchy()`` makes of these region annotations and tiles (or
    detections), checked against QuPath's own code (tests/test_client_project.py, with the qupath kit).

    QuPath inserts the annotations largest first. Each goes under the smallest annotation already placed that
    covers it (else the root) and takes over, of that parent's children, the tiles whose centre (ROI centroid)
    lies inside it or on its edge. So a tile goes to the smallest of nested regions holding its centre, but where
    two regions merely overlap the LARGER one keeps the tiles in the overlap (the smaller one, not being inside
    the larger, never sees them); tiles whose centre lies in no region stay at the root. Equal areas: QuPath
    orders them by ROI position, class and random id; here the earlier one in ``regions`` is placed first."""
    geometries = [_geometry(r) for r in regions]
    for geometry in geometries:
        shapely.prepare(geometry)
    order = sorted(range(len(regions)), key=lambda i: (-geometries[i].area, i))
    region_parent: list[int | None] = [None] * len(regions)
    placed: list[int] = []
    for index in order:
        covering = [p for p in placed if geometries[p].covers(geometries[index])]
        if covering:  # the smallest covering one; on a tie the deepest, then the later placed
            region_parent[index] = min(covering, key=lambda p: (geometries[p].area, -_depth(p, region_parent),
                                                                -placed.index(p)))
        placed.append(index)
    owner = np.full(len(tiles), -1)
    if len(tiles) and len(regions):
        centres = shapely.centroid(np.array([_geometry(t) for t in tiles], dtype=object))
        xs, ys = shapely.get_x(centres), shapely.get_y(centres)
        for index in order:
            parent = region_parent[index]
            candidates = owner == (-1 if parent is None else parent)
            inside = shapely.intersects_xy(geometries[index], xs, ys)
            owner[candidates & inside] = index
    return HierarchyPlan(region_parent, [None if o < 0 else int(o) for o in owner])


def _depth(index: int, parents: Sequence[int | None]) -> int:
    depth = 0
    while parents[index] is not None:
        index, depth = parents[index], depth + 1  # type: ignore[assignment]
    return depth


def nest_tiles(
    regions: Sequence[QuPathObject | BaseGeometry], tiles: Sequence[QuPathObject | BaseGeometry]
) -> dict[int, list[int]]:
    """Which tiles QuPath nests directly under which region: region index -> tile indices (in input order), by
    :func:`plan_hierarchy` (QuPath's ``resolveHierarchy()``: centre rule; nested regions: the smallest; merely
    overlapping regions: the larger). Tiles in no region appear nowhere (they stay at the root). Every region
    index is a key."""
    nested: dict[int, list[int]] = {index: [] for index in range(len(regions))}
    for tile_index, region_index in enumerate(plan_hierarchy(regions, tiles).tile_parent):
        if region_index is not None:
            nested[region_index].append(tile_index)
    return nested


def nested_features(objects: Sequence[QuPathObject]) -> list[dict[str, Any]]:
    """QuPath GeoJSON features of ``objects`` nested as QuPath's ``resolveHierarchy()`` would nest them
    (:func:`plan_hierarchy`): each detection / tile, and each annotation inside another, in the parent's
    ``properties.childObjects`` (the only place QuPath reads children). Objects QuPath leaves at the root stay at
    the top level; order within each level follows the input.

    QuPath's ``load_geojson`` through paquo fails on ``cell`` objects, so those raise ``ValueError``."""
    cells = [i for i, o in enumerate(objects) if o.object_type == "cell"]
    if cells:
        raise ValueError(f"objects {cells[:5]} are cells, which paquo cannot load; write them as detections")
    region_indices = [i for i, o in enumerate(objects) if o.object_type == "annotation"]
    tile_indices = [i for i, o in enumerate(objects) if o.object_type in ("detection", "tile")]
    plan = plan_hierarchy([objects[i] for i in region_indices], [objects[i] for i in tile_indices])
    parent_of: dict[int, int] = {}
    for position, parent in enumerate(plan.region_parent):
        if parent is not None:
            parent_of[region_indices[position]] = region_indices[parent]
    for position, parent in enumerate(plan.tile_parent):
        if parent is not None:
            parent_of[tile_indices[position]] = region_indices[parent]
    children: dict[int, list[int]] = {}
    for index in range(len(objects)):
        if index in parent_of:
            children.setdefault(parent_of[index], []).append(index)

    def build(index: int) -> dict[str, Any]:
        kids = [build(child) for child in children.get(index, [])]
        return to_feature(objects[index], children=kids)

    return [build(index) for index in range(len(objects)) if index not in parent_of]


def project_classes() -> list[tuple[str, tuple[int, int, int]]]:
    """``(QuPath class name, (r, g, b))`` for the tissue classes, then the region classes."""
    return [(c.qupath_name, c.color_rgb) for c in TISSUE_CLASSES + REGION_CLASSES]
