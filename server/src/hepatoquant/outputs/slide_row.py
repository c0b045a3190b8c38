"""The per-slide ``<slide>.csv``: the slide's cohort row (:meth:`hepatoquant_client.slide_report.SlideReport.to_row`,
the one row definition), so that the rows of many slides, ``cohort run``'s ``cohort.csv`` and the client's tables
concatenate."""

from __future__ import annotations

import csv
from pathlib import Path

from hepatoquant_client.slide_report import SlideReport, cohort_columns

__all__ = ["write_cohort_row"]


def write_cohort_row(report: SlideReport, path: Path) -> None:
    """One header line and one row, named by the slide file's stem (no job id: written by the analysis)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cohort_columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerow(report.to_row(slide=Path(report.report["slide"]["path"]).stem))
