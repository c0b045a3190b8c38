"""The versioned report JSON: slide, parameters, model, timings, composition, warnings, research-use notice."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from hepatoquant import RESEARCH_USE_NOTICE, __version__
from hepatoquant.analysis import AnalysisResult

__all__ = ["REPORT_SCHEMA_PATH", "REPORT_SCHEMA_VERSION", "build_report", "validate_report", "write_report"]

# The report's JSON Schema, shipped with the package: what programs reading reports may rely on (checked in tests
# on every kind of report the suite writes).
REPORT_SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "report.schema.json"

# Bump the major number when a field changes meaning or disappears; the minor when fields are added.
# 2.0: tiles counted in the region containing their centre (QuPath's rule; was: largest overlap); a region without
# tiles has class_percent null (was: every class 0 %) and says why in no_data; tiles.outside_regions added.
# 2.1: artefacts (area and share of the slide per kind), tiles.excluded, tiles.min_focus, tiles.keep_artefacts.
# 2.2: parameters.backend (torch or openvino), versions.openvino when it ran the classifier.
# 2.3: segmentation.backend (what ran the segmenter's windows); versions.openvino when it ran either model.
# 2.4: parameters.readers (threads or processes: who read the tiles and windows).
REPORT_SCHEMA_VERSION = "2.4"


def _versions(backends: set[str]) -> dict[str, str]:
    versions = {"hepatoquant": __version__, "python": platform.python_version()}
    libraries = ("torch", "timm", "openslide-python", "openslide-bin", "shapely", "numpy", "hepatoquant-client")
    for dist in libraries + (("openvino",) if "openvino" in backends else ()):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def build_report(result: AnalysisResult, *, outputs: dict[str, str]) -> dict:
    """The report as a JSON-ready dict."""
    options = result.options
    return {
        "report_schema_version": REPORT_SCHEMA_VERSION,
        "notice": RESEARCH_USE_NOTICE,
        "model_status": result.model["model_status"],
        "segmenter_model_status": result.segmenter["model_status"] if result.segmenter else None,
        "warnings": list(result.warnings),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions({result.backend, result.segmentation.backend if result.segmentation else "torch"}),
        "slide": dataclasses.asdict(result.slide),
        "parameters": {
            "tile_size_px": options.tile.tile_size_px,
            "tile_spacing_um_px": options.tile.spacing_um_px,
            "tile_size_um": options.tile.tile_size_um,
            "min_tissue_fraction": options.tile.min_tissue_fraction,
            "tissue_detection": dataclasses.asdict(options.tissue),
            "regions_file": str(options.regions_path) if options.regions_path else None,
            "tumour_class_names": list(options.tumour_class_names),
            "batch_size": options.batch_size,
            "num_workers": options.num_workers,
            "device": result.device,
            "precision": result.precision,
            "backend": result.backend,
            "readers": result.readers,
            "tile_object_type": options.tile_object_type,
        },
        "model": result.model,
        "segmenter": result.segmenter,
        "segmentation": None
        if result.segmentation is None
        else {
            "map_spacing_um_px": result.segmentation.spacing_um_px,
            "windows_run": result.segmentation.windows_run,
            "windows_total": result.segmentation.windows_total,
            "precision": result.segmentation.precision,
            "backend": result.segmentation.backend,
            "window_overlap": options.windows.overlap,
        },
        "tissue": {
            "area_mm2": result.tissue.area_um2() / 1e6,
            "saturation_threshold": result.tissue.saturation_threshold,
            "mask_spacing_um_px": result.tissue.spacing_um_px,
        },
        "tiles": {
            "count": len(result.grid),
            "size_level0_px": result.grid.size_level0_px,
            "size_um": options.tile.tile_size_um,
            "area_mm2_each": (options.tile.tile_size_um**2) / 1e6,
            "counted_in": "the region containing the tile's centre (QuPath's nesting rule)",
            "outside_regions": dict(zip(("count", "area_mm2"), result.composition.outside_regions)),
            "excluded": dict(result.excluded_tiles),  # reason (artefact kind, "blur") -> tiles left out
            "min_focus": options.min_focus,
            "keep_artefacts": options.keep_artefacts,
        },
        "artefacts": _artefacts(result),
        "regions_source": result.regions[0].source if result.regions else None,
        "composition": result.composition.to_dict(),
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
        "tiles_per_second": result.tiles_per_second,
        "outputs": outputs,
    }


def _artefacts(result: AnalysisResult) -> dict:
    """Each kind of artefact left out of the tissue (pen, ...): its area and its share of the slide."""
    mm2_per_px = (result.slide.mpp_um_px / 1000) ** 2
    slide_px = result.slide.width_px * result.slide.height_px
    return {
        kind: {"area_mm2": geometry.area * mm2_per_px, "share_of_slide": geometry.area / slide_px if slide_px else 0.0}
        for kind, geometry in result.tissue.artefacts.items()
    }


def validate_report(report: dict) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the field) if ``report`` does not follow the report schema."""
    import jsonschema

    schema = json.loads(REPORT_SCHEMA_PATH.read_text())
    jsonschema.validate(report, schema, format_checker=jsonschema.FormatChecker())


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
