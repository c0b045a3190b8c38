"""QuPath GeoJSON of an analysis: region annotations with their composition, tiles as classified detections."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from hepatoquant_client.hepatoquant_objects import (
    FOCUS_MEASUREMENT,
    TISSUE_FRACTION_MEASUREMENT,
    artefact_object,
    region_object,
    tile_object,
)
from hepatoquant_client.qupath_geojson import QuPathObject, to_feature

from hepatoquant.analysis import AnalysisResult

__all__ = ["qupath_objects", "write_qupath_geojson"]


def qupath_objects(result: AnalysisResult, *, include_tiles: bool = True) -> Iterator[QuPathObject]:
    """Regions first, then the artefacts left out (pen, ...), then tiles: QuPath nests tiles under regions after
    ``resolveHierarchy()``; no counted tile has its centre in an artefact (tiles touching one are left out unless
    ``--keep-artefacts``)."""
    for region, composition in zip(result.regions, result.composition.regions):
        if region.geometry.is_empty:
            continue
        yield region_object(
            region.geometry,
            region.region_class,
            region.name,
            tile_count=composition.tile_count,
            tile_area_mm2=composition.tile_area_mm2,
            region_area_mm2=composition.region_area_mm2 or 0.0,
            class_tiles=composition.class_tiles,
            class_percent=composition.class_percent,
            model_status=result.model["model_status"],
            segmenter_status=result.segmenter["model_status"] if result.segmenter else None,
        )
    mm2_per_px = (result.slide.mpp_um_px / 1000) ** 2
    for kind, geometry in result.tissue.artefacts.items():
        if not geometry.is_empty:
            yield artefact_object(geometry, kind, area_mm2=geometry.area * mm2_per_px)
    if not include_tiles:
        return
    grid, classes = result.grid, result.classes
    predicted = result.predicted_class
    focus = result.focus
    for i in range(len(grid)):
        quality = {TISSUE_FRACTION_MEASUREMENT: float(grid.tissue_fraction[i])}
        if focus is not None:
            quality[FOCUS_MEASUREMENT] = float(focus[i])
        yield tile_object(
            float(grid.x_level0_px[i]),
            float(grid.y_level0_px[i]),
            grid.size_level0_px,
            classes[predicted[i]],
            dict(zip(classes, result.probabilities[i].tolist())),
            object_type=result.options.tile_object_type,
            model_status=result.model["model_status"],
            quality=quality,
        )


def write_qupath_geojson(result: AnalysisResult, path: Path, *, include_tiles: bool = True) -> None:
    """A FeatureCollection written feature by feature, so memory does not grow with the number of tiles."""
    with path.open("w") as handle:
        handle.write('{"type":"FeatureCollection","features":[')
        for index, obj in enumerate(qupath_objects(result, include_tiles=include_tiles)):
            if index:
                handle.write(",")
            handle.write(json.dumps(to_feature(obj), separators=(",", ":"), allow_nan=False))
        handle.write("]}\n")
