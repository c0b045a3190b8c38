"""A cohort table: one row per slide, from the outcomes of the client's analyses (research use only).

``cohort_rows([(slide_id, outcome), ...])`` gives plain dicts with the columns of :func:`cohort_columns`, always
in that order and always all of them, so that the rows of any cohort concatenate into one table.
``write_cohort(rows, "cohort.csv")`` writes the CSV atomically, and ``cohort.parquet`` next to it when pyarrow is
importable; it says which files it wrote and why any was not. ``summary_table(rows)`` is a short plain-text table.

Cells a slide has no value for (a region class it lacks, a segmenter it did not use) are ``None`` (an empty CSV
cell, a Parquet null). Percentages are of a region class's classified tiles; areas are mm^2.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_files import replace_atomically
from .classes import HEADLINE_INDICATORS
from .errors import HepatoQuantError
from .slide_report import COHORT_REGION_CLASSES, TEXT_COLUMNS, SlideReport, cohort_columns, composition_columns

if TYPE_CHECKING:  # pragma: no cover
    from .results import AnalysisOutcome

__all__ = [
    "COHORT_REGION_CLASSES",
    "CohortFiles",
    "CohortError",
    "cohort_columns",
    "cohort_rows",
    "composition_columns",
    "summary_table",
    "write_cohort",
]


class CohortError(HepatoQuantError, ValueError):
    """Rows that cannot make a cohort table (a duplicate slide id, an unknown column), or a file not written."""


def cohort_rows(outcomes: Iterable[tuple[str, AnalysisOutcome | SlideReport]]) -> list[dict[str, Any]]:
    """One row per ``(slide_id, outcome)`` (an :class:`AnalysisOutcome`, or a :class:`SlideReport` read from an
    output folder), keys in :func:`cohort_columns` order (:meth:`SlideReport.to_row`); a repeated slide id
    raises :class:`CohortError` (two rows for one slide would be counted twice in any statistic)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for slide_id, outcome in outcomes:
        if not isinstance(slide_id, str) or not slide_id:
            raise CohortError(f"slide id {slide_id!r} must be a non-empty string")
        if slide_id in seen:
            raise CohortError(f"slide {slide_id!r} appears twice in the cohort; give each slide one outcome")
        seen.add(slide_id)
        rows.append(outcome.to_row(slide=slide_id))
    return rows


@dataclass(frozen=True)
class CohortFiles:
    """What :func:`write_cohort` did: the files written, and each file not written with the reason."""

    written: tuple[Path, ...]
    not_written: tuple[tuple[Path, str], ...]


def _checked(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = cohort_columns()
    allowed = set(columns)
    for index, row in enumerate(rows):
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise CohortError(f"row {index} has unknown column(s) {', '.join(unknown)}; build rows with cohort_rows")
    return columns


def write_cohort(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> CohortFiles:
    """Write ``rows`` as CSV at ``path`` (header = :func:`cohort_columns`) and as Parquet at ``path`` with the
    suffix ``.parquet`` when pyarrow is importable. Both are written atomically (temporary file, then rename).

    Returns a :class:`CohortFiles`: ``written`` lists the files written; ``not_written`` names the Parquet file
    with the reason when pyarrow is missing. A file that cannot be written raises :class:`CohortError`."""
    target = Path(path)
    columns = _checked(rows)
    if target.suffix.lower() == ".parquet":
        raise CohortError(f"{target}: give the CSV path (the Parquet file is written next to it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})

        replace_atomically(target, lambda temporary: temporary.write_text(text.getvalue(), encoding="utf-8"))
    except OSError as exc:
        raise CohortError(f"cannot write {target}: {exc.strerror or exc}; check the folder and free space") from None
    written = [target]
    not_written: list[tuple[Path, str]] = []
    parquet = target.with_suffix(".parquet")
    try:
        import pyarrow  # noqa: F401  (optional: only for the Parquet copy)
        import pyarrow.parquet as pq
    except ImportError as exc:
        not_written.append((parquet, f"pyarrow is not importable ({exc}); pip install pyarrow to get Parquet"))
    else:
        table = pyarrow.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows],
                                          schema=_arrow_schema(pyarrow, columns))
        try:
            replace_atomically(parquet, lambda temporary: pq.write_table(table, str(temporary)))
        except OSError as exc:
            raise CohortError(f"cannot write {parquet}: {exc.strerror or exc}; check the folder and free space") from None
        written.append(parquet)
    return CohortFiles(written=tuple(written), not_written=tuple(not_written))


def _arrow_schema(pyarrow: Any, columns: list[str]) -> Any:
    """Fixed column types, so that a column that is null in every row still has its type."""
    def kind(column: str) -> Any:
        if column in TEXT_COLUMNS:
            return pyarrow.string()
        if column == "tile_count" or column.endswith("_tiles"):
            return pyarrow.int64()
        return pyarrow.float64()

    return pyarrow.schema([(c, kind(c)) for c in columns])


def _summary_columns() -> list[tuple[str, str]]:
    columns = [("slide", "slide"), ("model_status", "model status"), ("tile_count", "tiles")]
    for region_class, codes in HEADLINE_INDICATORS.items():
        columns += [(f"headline_{region_class}_{code}_pct", f"{region_class} {code} %") for code in codes]
    return columns


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: slide, model status, tile count and the headline indicators, one line per slide
    (percentages with one decimal, ``-`` where a slide has no value)."""
    columns = _summary_columns()

    def cell(value: Any) -> str:
        if value is None or value == "":
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    table = [[title for _, title in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for number, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
