"""The per-slide ``<slide>.csv``: one row with the client's cohort columns (:func:`hepatoquant_client.cohort.report_row`),
so that the rows of many slides, ``cohort run``'s ``cohort.csv`` and the client's tables concatenate."""

from __future__ import annotations

import csv
from pathlib import Path

from hepatoquant_client.cohort import COHORT_REGION_CLASSES, cohort_columns, report_row

__all__ = ["COHORT_REGION_CLASSES", "cohort_columns", "cohort_row", "write_cohort_row"]


def cohort_row(report: dict) -> dict[str, object]:
    """The cohort row of one report, named by the slide file's stem (no job id: written by the analysis)."""
    return report_row(report, slide=Path(report["slide"]["path"]).stem)


def write_cohort_row(report: dict, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cohort_columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerow(cohort_row(report))
