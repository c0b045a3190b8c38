"""The files an analysis produces, written atomically into an output folder.

QuPath GeoJSON (``<slide>.geojson``), the report (``<slide>.report.json``), a one-row cohort table
(``<slide>.csv``), an overlay picture (``<slide>.overlay.png``), the tile-class map and the region mask as
rasters with previews (``<slide>.tissue-map.tif`` / ``.png``, ``<slide>.region-mask.tif`` / ``.png``: see
:mod:`hepatoquant.outputs.rasters`) and, on request, the tile embeddings
(``<slide>.embeddings.npz``, and the same in CLAM / TRIDENT's HDF5 layout, ``<slide>.features.h5``). All are
first written into a temporary folder beside them and renamed into place only when every one is complete, so a
failed run leaves no partial output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hepatoquant_client.slide_report import SlideReport

from hepatoquant.atomic_write import staged_files
from hepatoquant.analysis import AnalysisResult
from hepatoquant.errors import OutputWriteError
from hepatoquant.outputs.slide_row import write_cohort_row
from hepatoquant.outputs.features_h5 import write_features_h5
from hepatoquant.outputs.geojson import write_qupath_geojson
from hepatoquant.outputs.overlay import write_overlay
from hepatoquant.outputs.rasters import region_mask, tile_class_map, write_label_raster
from hepatoquant.outputs.report import build_report, write_report

__all__ = ["OutputPaths", "write_outputs"]


@dataclass(frozen=True)
class OutputPaths:
    geojson: Path
    report: Path
    cohort_csv: Path
    overlay_png: Path
    embeddings: Path | None
    features_h5: Path | None = None  # the embeddings in CLAM / TRIDENT's HDF5 layout, written with them
    tissue_map: Path | None = None  # tile-class map, pyramidal TIFF (hepatoquant.outputs.rasters), and preview
    tissue_map_png: Path | None = None
    region_mask: Path | None = None  # region mask, pyramidal TIFF, and preview
    region_mask_png: Path | None = None


def write_outputs(result: AnalysisResult, out_dir: str | Path, *, include_tiles: bool = True) -> OutputPaths:
    """Write every output of ``result`` into ``out_dir`` (created if needed); all or nothing.

    ``include_tiles=False`` leaves the tile objects out of the GeoJSON (region annotations only).
    """
    out_dir = Path(out_dir)
    try:
        return _write_all(result, out_dir, include_tiles)
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the outputs into {str(out_dir)!r} ({exc}); check that the folder is writable and "
            "the disk has space, or choose another --out (nothing partial was left there)"
        ) from exc


def _write_all(result: AnalysisResult, out_dir: Path, include_tiles: bool) -> OutputPaths:
    stem = Path(result.slide.path).stem
    names = {
        "geojson": f"{stem}.geojson",
        "report": f"{stem}.report.json",
        "cohort_csv": f"{stem}.csv",
        "overlay_png": f"{stem}.overlay.png",
        "tissue_map": f"{stem}.tissue-map.tif",
        "tissue_map_png": f"{stem}.tissue-map.png",
        "region_mask": f"{stem}.region-mask.tif",
        "region_mask_png": f"{stem}.region-mask.png",
    }
    embedding_files = {"npz": ("embeddings", f"{stem}.embeddings.npz"),
                       "h5": ("features_h5", f"{stem}.features.h5")}  # the same embeddings as MIL tools read them
    formats = result.options.embeddings_formats if result.embeddings is not None else ()
    names.update(embedding_files[fmt] for fmt in formats)
    clock = result.clock  # each output is a stage of the run: the report's timings include them
    with staged_files(out_dir, names.values(), prefix=f".{stem}.") as staging:
        with clock.stage("write_geojson"):
            write_qupath_geojson(result, staging / names["geojson"], include_tiles=include_tiles)
        with clock.stage("write_overlay"):
            write_overlay(result, staging / names["overlay_png"])
        with clock.stage("write_rasters"):
            write_label_raster(*tile_class_map(result), "tile-class map", staging / names["tissue_map"],
                               staging / names["tissue_map_png"])
            write_label_raster(*region_mask(result), "region mask", staging / names["region_mask"],
                               staging / names["region_mask_png"])
        if "embeddings" in names:
            with clock.stage("write_embeddings"):
                np.savez_compressed(
                    staging / names["embeddings"],
                    x_level0_px=result.grid.x_level0_px,
                    y_level0_px=result.grid.y_level0_px,
                    size_level0_px=np.float64(result.grid.size_level0_px),
                    embeddings=result.embeddings,
                    probabilities=result.probabilities,
                    classes=np.array(result.classes),
                    encoder=np.array(result.model["encoder"]),
                )
        if "features_h5" in names:
            with clock.stage("write_features_h5"):
                write_features_h5(result, staging / names["features_h5"])
        report = build_report(result, outputs=names)
        write_cohort_row(SlideReport.from_report(report), staging / names["cohort_csv"])
        write_report(report, staging / names["report"])
    for key, name in embedding_files.values():  # an earlier run's embeddings would not match these results
        if key not in names:
            (out_dir / name).unlink(missing_ok=True)
    paths = {key: out_dir / name for key, name in names.items()}
    return OutputPaths(embeddings=paths.pop("embeddings", None), features_h5=paths.pop("features_h5", None), **paths)
