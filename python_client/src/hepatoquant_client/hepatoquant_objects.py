"""HepatoQuant's results as QuPath objects: tile detections and region annotations, and how to recognise them.

The names of measurements and the markers that make our objects recognisable live here, so that the server
that writes them and the clients that import or replace them (paquo, Groovy) agree. Every object we write
carries ``metadata["hepatoquant"]``; region annotations also have a name starting with ``HepatoQuant:``.
A re-run removes only objects that carry these markers, never a pathologist's own.
"""

from __future__ import annotations

from collections.abc import Mapping

from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from hepatoquant_client.classes import REGION_CLASSES, tissue_class
from hepatoquant_client.qupath_geojson import QuPathObject

__all__ = [
    "METADATA_KEY",
    "REGION_NAME_PREFIX",
    "probability_measurement",
    "percent_measurement",
    "tiles_measurement",
    "tile_object",
    "region_object",
    "artefact_object",
    "is_hepatoquant_object",
]

METADATA_KEY = "hepatoquant"
REGION_NAME_PREFIX = "HepatoQuant: "
TILE_COUNT_MEASUREMENT = "HQ tiles"
TILE_AREA_MEASUREMENT = "HQ tile area mm^2"
REGION_AREA_MEASUREMENT = "HQ region area mm^2"
FOCUS_MEASUREMENT = "HQ focus"  # the tile's focus score (variance of the Laplacian)
TISSUE_FRACTION_MEASUREMENT = "HQ tissue fraction"  # share of the tile on detected tissue, 0-1
ARTEFACT_CLASS = "HQ Artefact"
ARTEFACT_COLOUR = (40, 40, 40)
ARTEFACT_AREA_MEASUREMENT = "HQ artefact area mm^2"


def probability_measurement(code: str) -> str:
    """Tile measurement holding the probability of tissue class ``code`` (e.g. ``prob_TUM``)."""
    return f"prob_{code}"


def percent_measurement(code: str) -> str:
    """Region measurement: percentage of the region's tiles classified ``code`` (e.g. ``TUM %``)."""
    return f"{code} %"


def tiles_measurement(code: str) -> str:
    """Region measurement: number of the region's tiles classified ``code`` (e.g. ``TUM tiles``)."""
    return f"{code} tiles"


def tile_object(
    x_level0_px: float,
    y_level0_px: float,
    size_level0_px: float,
    predicted_code: str,
    probabilities: Mapping[str, float],
    *,
    object_type: str = "detection",
    model_status: str | None = None,
    quality: Mapping[str, float] | None = None,
) -> QuPathObject:
    """A square tile as a QuPath detection (or ``tile``) classified by its most probable tissue class.

    ``quality``: the tile's quality measurements (``HQ focus``, ``HQ tissue fraction``), shown beside its
    probabilities."""
    if object_type not in ("detection", "tile"):
        raise ValueError(f"tile object type must be 'detection' or 'tile', not {object_type!r}")
    cls = tissue_class(predicted_code)
    return QuPathObject(
        geometry=box(x_level0_px, y_level0_px, x_level0_px + size_level0_px, y_level0_px + size_level0_px),
        object_type=object_type,
        class_names=(cls.qupath_name,),
        color_rgb=cls.color_rgb,
        measurements={
            **{probability_measurement(code): float(p) for code, p in probabilities.items()},
            **{name: float(value) for name, value in (quality or {}).items()},
        },
        metadata=_metadata("tile", model_status=model_status),
    )


def artefact_object(geometry: BaseGeometry, kind: str, *, area_mm2: float) -> QuPathObject:
    """An area HepatoQuant left out as an artefact (pen ink, a fold, ...), as an annotation of the derived class
    ``HQ Artefact: <kind>`` that a pathologist can see, edit or delete. It is ours (a re-run replaces it) and it
    is not a region: it carries no composition."""
    return QuPathObject(
        geometry=geometry,
        object_type="annotation",
        class_names=(ARTEFACT_CLASS, kind),
        color_rgb=ARTEFACT_COLOUR,
        name=f"{REGION_NAME_PREFIX}{kind} artefact",
        measurements={ARTEFACT_AREA_MEASUREMENT: float(area_mm2)},
        metadata=_metadata("artefact"),
    )


def region_object(
    geometry: BaseGeometry,
    region_class_code: str,
    name: str,
    *,
    tile_count: int,
    tile_area_mm2: float,
    region_area_mm2: float,
    class_tiles: Mapping[str, int],
    class_percent: Mapping[str, float] | None,
    model_status: str | None = None,
    segmenter_status: str | None = None,
) -> QuPathObject:
    """A region annotation whose measurement table shows its composition.

    ``class_percent`` is ``None`` for a region without tiles: it then has no ``<CODE> %`` measurement at all
    (QuPath shows an empty cell), because no data is not 0 %; its ``HQ tiles`` is 0."""
    cls = next((c for c in REGION_CLASSES if c.code == region_class_code), None)
    if cls is None:
        raise ValueError(f"unknown region class {region_class_code!r}")
    measurements: dict[str, float] = {
        REGION_AREA_MEASUREMENT: float(region_area_mm2),
        TILE_COUNT_MEASUREMENT: float(tile_count),
        TILE_AREA_MEASUREMENT: float(tile_area_mm2),
    }
    for code, percent in (class_percent or {}).items():
        measurements[percent_measurement(code)] = float(percent)
    for code, count in class_tiles.items():
        measurements[tiles_measurement(code)] = float(count)
    return QuPathObject(
        geometry=geometry,
        object_type="annotation",
        class_names=(cls.qupath_name,),
        color_rgb=cls.color_rgb,
        name=REGION_NAME_PREFIX + name,
        measurements=measurements,
        metadata=_metadata("region", model_status=model_status, segmenter_status=segmenter_status),
    )


def _metadata(kind: str, **statuses: str | None) -> dict[str, str]:
    """Our marker, plus the models' status (``untrained-demo`` must travel with every object it labelled)."""
    return {METADATA_KEY: kind, **{key: value for key, value in statuses.items() if value}}


def is_hepatoquant_object(obj: QuPathObject) -> bool:
    """True for objects HepatoQuant wrote (safe to replace on a re-run); False for everything else."""
    return METADATA_KEY in obj.metadata or (obj.name or "").startswith(REGION_NAME_PREFIX)
