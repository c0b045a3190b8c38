"""Analysis regions: where tiles are counted. From a QuPath GeoJSON file, a segmenter, or the whole tissue.

A region is a polygon (or multipolygon) in level-0 pixels with a region class, ``tumour`` or ``non_tumour``
(``tissue`` when the whole tissue is one region). Annotations from a file are mapped by their QuPath class
name: names in ``tumour_class_names`` are tumour, every other polygonal annotation is non-tumour, and the
report records the mapping so nothing is silently reinterpreted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import shapely
from hepatoquant_client.classes import NON_TUMOUR_REGION, TUMOUR_REGION, WHOLE_TISSUE_REGION
from hepatoquant_client.hepatoquant_objects import ARTEFACT_CLASS, is_hepatoquant_object
from hepatoquant_client.qupath_geojson import QuPathObject, polygonal_part, read_qupath_geojson
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from hepatoquant.errors import RegionsError
from hepatoquant.geometry import as_multipolygon

__all__ = [
    "Region",
    "DEFAULT_TUMOUR_CLASS_NAMES",
    "artefacts_from_objects",
    "regions_from_geojson",
    "regions_from_objects",
    "whole_tissue_region",
]

DEFAULT_TUMOUR_CLASS_NAMES: tuple[str, ...] = (
    "Tumor", "Tumour", "Tumor region", "Tumour region", TUMOUR_REGION.qupath_name, "Metastasis", "HCC", "TUM",
)


@dataclass(frozen=True)
class Region:
    """A region in level-0 pixels; ``source`` is ``user``, ``segmenter`` or ``tissue``."""

    name: str
    region_class: str
    geometry: Polygon | MultiPolygon
    source: str
    source_class: str | None = None


def whole_tissue_region(tissue_polygons: MultiPolygon) -> Region:
    """All detected tissue as one region (used when no regions are given)."""
    return Region(name="Whole tissue", region_class=WHOLE_TISSUE_REGION.code, geometry=tissue_polygons, source="tissue")


def regions_from_geojson(
    path: str | Path,
    slide_size_px: tuple[int, int],
    *,
    tumour_class_names: tuple[str, ...] = DEFAULT_TUMOUR_CLASS_NAMES,
) -> tuple[list[Region], list[str]]:
    """Polygonal annotations of a QuPath GeoJSON file as regions, clipped to the slide; and warnings.

    Detections, tiles, cells, points and lines are not regions and are skipped (with a warning). A file with
    no polygonal annotation, or an annotation wholly outside the slide, is an error naming it.
    """
    return regions_from_objects(read_qupath_geojson(path), path, slide_size_px, tumour_class_names=tumour_class_names)


def regions_from_objects(
    objects: Sequence[QuPathObject],
    path: str | Path,
    slide_size_px: tuple[int, int],
    *,
    tumour_class_names: tuple[str, ...] = DEFAULT_TUMOUR_CLASS_NAMES,
) -> tuple[list[Region], list[str]]:
    """:func:`regions_from_geojson` on the objects already read from the file at ``path`` (named in messages)."""
    slide_box = box(0, 0, *slide_size_px)
    tumour_names = {n.casefold() for n in tumour_class_names}
    regions: list[Region] = []
    skipped: dict[str, int] = {}
    clipped: list[str] = []
    repaired: list[str] = []
    for index, obj in enumerate(objects):
        if is_hepatoquant_object(obj):  # our own earlier output, exported back: not the pathologist's regions
            skipped["HepatoQuant object"] = skipped.get("HepatoQuant object", 0) + 1
            continue
        if any(name.endswith("*") for name in obj.class_names):  # QuPath's Ignore*, Region*: not tissue regions
            skipped[f"{': '.join(obj.class_names)} annotation"] = skipped.get(f"{': '.join(obj.class_names)} annotation", 0) + 1
            continue
        geometry = polygonal_part(obj.geometry) if obj.object_type == "annotation" else None
        if geometry is None:
            kind = obj.object_type if obj.object_type != "annotation" else f"{obj.geometry.geom_type} annotation"
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        label = obj.name or (": ".join(obj.class_names) if obj.class_names else f"annotation {index + 1}")
        if not obj.geometry.is_valid:  # e.g. a bow-tie: kept as the areas it encloses, and said so
            repaired.append(_repair_note(index, label, obj.geometry, geometry))
        if not geometry.intersects(slide_box):
            minx, miny, maxx, maxy = (round(v) for v in geometry.bounds)
            raise RegionsError(
                f"regions file {str(path)!r}: annotation {index + 1} ({label!r}) lies outside the slide "
                f"(its bounds x {minx}..{maxx}, y {miny}..{maxy}; the slide is {slide_size_px[0]} x "
                f"{slide_size_px[1]} px): was it exported from another image? Export the annotations of "
                "this slide from QuPath (level-0 pixel coordinates)"
            )
        if not slide_box.contains(geometry):
            geometry = polygonal_part(shapely.intersection(geometry, slide_box))
            clipped.append(label)
            if geometry is None:
                continue
        source_class = ": ".join(obj.class_names) if obj.class_names else None
        is_tumour = source_class is not None and source_class.casefold() in tumour_names
        regions.append(
            Region(
                name=label,
                region_class=TUMOUR_REGION.code if is_tumour else NON_TUMOUR_REGION.code,
                geometry=geometry,
                source="user",
                source_class=source_class,
            )
        )
    regions, overlap_warnings = _tumour_over_non_tumour(regions)
    regions, disjoint_warnings = _disjoint(regions)
    overlap_warnings += disjoint_warnings
    if not regions:
        raise RegionsError(
            f"regions file {str(path)!r} has no polygon annotations ({len(objects)} objects: "
            f"{', '.join(f'{n} {k}' for k, n in skipped.items()) or 'none'}); export area annotations "
            "(not detections, points or lines) from QuPath, or leave out --regions to analyse all tissue"
        )
    warnings = list(overlap_warnings)
    if skipped:
        warnings.append(
            f"regions file {Path(path).name}: skipped objects that are not area annotations: "
            + ", ".join(f"{n} {k}" for k, n in skipped.items())
        )
    if clipped:
        warnings.append(f"regions file {Path(path).name}: clipped to the slide's bounds: {', '.join(clipped[:5])}")
    if repaired:
        warnings.append(f"regions file {Path(path).name}: " + "; ".join(repaired))
    non_tumour_classes = sorted({r.source_class or "(unclassified)" for r in regions if r.region_class != "tumour"})
    if non_tumour_classes:
        warnings.append(
            "annotations counted as non-tumour regions (classes not in the tumour list): "
            + ", ".join(non_tumour_classes)
        )
    return regions, warnings


def _repair_note(index: int, label: str, drawn: BaseGeometry, repaired: BaseGeometry) -> str:
    """Why and how an invalid annotation was repaired. A self-intersecting outline (a bow-tie, a loop drawn
    over itself) is repaired rather than refused, so that one slip of the pen does not stop an analysis: the
    areas its loops enclose are what was outlined. The warning names it so that it can be checked and redrawn."""
    parts = len(getattr(repaired, "geoms", [repaired]))
    return (
        f"annotation {index + 1} ({label!r}) is not a valid polygon ({explain_validity(drawn)}); it was repaired "
        f"into {parts} part{'s' if parts != 1 else ''} covering the areas it encloses ({repaired.area:,.0f} px^2). "
        "Check it in QuPath and redraw it if that is not what was meant"
    )


def _tumour_over_non_tumour(regions: list[Region]) -> tuple[list[Region], list[str]]:
    """Non-tumour regions minus every tumour region: a tumour drawn inside a larger annotation (say, the
    whole section) counts as tumour only, and the non-tumour area excludes it, as in training labels."""
    tumour = [r.geometry for r in regions if r.region_class == TUMOUR_REGION.code]
    if not tumour:
        return regions, []
    tumour_union = shapely.union_all(tumour)
    resolved, emptied = [], []
    for region in regions:
        if region.region_class == TUMOUR_REGION.code or not region.geometry.intersects(tumour_union):
            resolved.append(region)
            continue
        rest = polygonal_part(shapely.difference(region.geometry, tumour_union))
        if rest is None or rest.is_empty:
            emptied.append(region.name)
            continue
        resolved.append(Region(region.name, region.region_class, rest, region.source, region.source_class))
    warnings = []
    if emptied:
        warnings.append(f"non-tumour annotations wholly inside tumour annotations were dropped: {', '.join(emptied[:5])}")
    return resolved, warnings


def _disjoint(regions: list[Region]) -> tuple[list[Region], list[str]]:
    """Regions that no longer overlap: where two overlap, the smaller keeps the overlap (the earlier one when
    their areas are equal) and the larger loses it, so that an annotation drawn inside another becomes a hole in
    it.

    Why: QuPath nests a tile under the annotation containing its centre, but overlapping annotations make that
    ambiguous in a way our counts could not follow from the annotations alone: its ``resolveHierarchy()``
    inserts annotations largest first, so a tile in an annotation nested inside another goes to the inner one,
    while the overlap of two annotations that merely overlap goes to the larger one, and ties of equal area
    depend on QuPath's internal object order (seen with QuPath 0.6.0's own code). Disjoint regions leave QuPath
    no choice, so its nesting and our counts agree.
    """
    order = sorted(range(len(regions)), key=lambda i: (regions[i].geometry.area, i))
    taken = None  # union of the regions already kept, smaller ones first
    kept: dict[int, Region] = {}
    trimmed, emptied = [], []
    for index in order:
        region = regions[index]
        geometry = region.geometry
        if taken is not None and geometry.intersects(taken) and shapely.intersection(geometry, taken).area > 0:
            rest = polygonal_part(shapely.difference(geometry, taken))
            if rest is None or rest.is_empty:
                emptied.append(region.name)
                continue
            trimmed.append(region.name)
            region = Region(region.name, region.region_class, rest, region.source, region.source_class)
        kept[index] = region
        taken = region.geometry if taken is None else shapely.union(taken, region.geometry)
    warnings = []
    if trimmed:
        warnings.append(
            "overlapping annotations: each overlap is counted once, in the smaller annotation; made smaller: "
            + ", ".join(trimmed[:5]) + (" ..." if len(trimmed) > 5 else "")
        )
    if emptied:
        warnings.append(
            "annotations wholly covered by smaller ones were dropped: " + ", ".join(emptied[:5])
            + (" ..." if len(emptied) > 5 else "")
        )
    return [kept[i] for i in range(len(regions)) if i in kept], warnings


def artefacts_from_objects(objects: Sequence[QuPathObject], slide_size_px: tuple[int, int]) -> dict[str, MultiPolygon]:
    """The ``HQ Artefact: <kind>`` annotations among the objects of a regions file (HepatoQuant's own, as a
    pathologist kept, redrew or added them), by kind, clipped to the slide: fed back with ``--regions`` they are
    left out like the artefacts HepatoQuant detects. They are never regions (:func:`regions_from_objects` skips
    them)."""
    slide_box = box(0, 0, *slide_size_px)
    parts: dict[str, list] = {}
    for obj in objects:
        if obj.object_type != "annotation" or obj.class_names[:1] != (ARTEFACT_CLASS,):
            continue
        geometry = polygonal_part(obj.geometry)
        geometry = polygonal_part(shapely.intersection(geometry, slide_box)) if geometry is not None else None
        if geometry is not None:
            kind = obj.class_names[1] if len(obj.class_names) > 1 else "artefact"
            parts.setdefault(kind, []).append(geometry)
    return {kind: as_multipolygon(shapely.union_all(geometries)) for kind, geometries in parts.items()}
