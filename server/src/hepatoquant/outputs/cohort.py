"""One CSV row per slide, with a fixed set of columns so that rows of a cohort concatenate into one table."""

from __future__ import annotations

import csv
from pathlib import Path

from hepatoquant_client.cohort import COHORT_REGION_CLASSES, composition_columns

__all__ = ["COHORT_REGION_CLASSES", "cohort_columns", "cohort_row", "write_cohort_row"]


def cohort_columns() -> list[str]:
    """Column names, the same for every slide: slide, models, pixel size and tissue, then the composition
    columns shared with the client's cohort table (:func:`hepatoquant_client.cohort.composition_columns`)."""
    leading = ["slide", "slide_path", "model", "model_status", "segmenter", "segmenter_status", "mpp_um_px",
               "tissue_area_mm2", "tile_count"]
    return [*leading, *composition_columns()]


def cohort_row(report: dict) -> dict[str, object]:
    """The cohort row of one report; cells of region classes the slide lacks, and percentages of region classes
    without tiles (no data, not 0 %), stay empty."""
    row: dict[str, object] = {column: "" for column in cohort_columns()}
    row.update(
        slide=Path(report["slide"]["path"]).stem,
        slide_path=report["slide"]["path"],
        model=report["model"]["name"],
        model_status=report["model_status"],
        segmenter=(report.get("segmenter") or {}).get("name", ""),
        segmenter_status=(report.get("segmenter") or {}).get("model_status", ""),
        mpp_um_px=report["slide"]["mpp_um_px"],
        tissue_area_mm2=round(report["tissue"]["area_mm2"], 6),
        tile_count=report["tiles"]["count"],
    )
    for entry in report["composition"]["region_classes"]:
        prefix = entry["region_class"]
        if entry["region_area_mm2"] is not None:
            row[f"{prefix}_region_area_mm2"] = round(entry["region_area_mm2"], 6)
        row[f"{prefix}_tiles"] = entry["tile_count"]
        row[f"{prefix}_tile_area_mm2"] = round(entry["tile_area_mm2"], 6)
        for code, percent in (entry["class_percent"] or {}).items():  # null: no tiles, so empty cells
            if f"{prefix}_{code}_pct" in row:
                row[f"{prefix}_{code}_pct"] = round(percent, 4)
    for region_class, values in report["composition"]["headline_indicators_percent"].items():
        for code, percent in values.items():
            if percent is not None:
                row[f"headline_{region_class}_{code}_pct"] = round(percent, 4)
    return row


def write_cohort_row(report: dict, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cohort_columns())
        writer.writeheader()
        writer.writerow(cohort_row(report))
