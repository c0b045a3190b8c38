"""QuPath GeoJSON of an analysis: region annotations with their composition, tiles as classified detections."""

from __future__ import annotations

from pathlib import Path

from hepatoquant_client.hepatoquant_objects import region_object, tile_object
from hepatoquant_client.qupath_geojson import QuPathObject, dumps_feature_collection

from hepatoquant.analysis import AnalysisResult

__all__ = ["qupath_objects", "write_qupath_geojson"]


def qupath_objects(result: AnalysisResult) -> list[QuPathObject]:
    """Regions first, then tiles: QuPath nests tiles under regions after ``resolveHierarchy()``."""
    objects = [
        region_object(
            region.geometry,
            region.region_class,
            region.name,
            tile_count=composition.tile_count,
            tile_area_mm2=composition.tile_area_mm2,
            region_area_mm2=composition.region_area_mm2 or 0.0,
            class_tiles=composition.class_tiles,
            class_percent=composition.class_percent,
        )
        for region, composition in zip(result.regions, result.composition.regions)
        if not region.geometry.is_empty
    ]
    grid, classes = result.grid, result.classes
    predicted = result.predicted_class
    for i in range(len(grid)):
        objects.append(
            tile_object(
                float(grid.x_level0_px[i]),
                float(grid.y_level0_px[i]),
                grid.size_level0_px,
                classes[predicted[i]],
                dict(zip(classes, result.probabilities[i].tolist())),
                object_type=result.options.tile_object_type,
            )
        )
    return objects


def write_qupath_geojson(result: AnalysisResult, path: Path) -> None:
    path.write_text(dumps_feature_collection(qupath_objects(result)))
