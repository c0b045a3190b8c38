"""The slides of a cohort: a CSV (``slide`` and optional ``slide_id``, ``mpp``, ``regions`` columns) or a folder.

Relative paths in the CSV are relative to the CSV's folder. Slide ids name each slide's output folder and its
row in the cohort table, so they must be unique; by default they are the file names without extension.
Problems with one slide (a missing file) are that slide's failure at run time, not the cohort's; problems with
the table itself (no ``slide`` column, a repeated id, an MPP that is not a number) stop before anything runs.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from hepatoquant.errors import InvalidParameterError

__all__ = ["SLIDE_SUFFIXES", "CohortItem", "read_cohort"]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".bif", ".vms", ".vmu", ".svslide")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CohortItem:
    slide_id: str
    slide: Path
    mpp_um_px: float | None = None
    regions: Path | None = None


def read_cohort(source: str | Path) -> list[CohortItem]:
    """The cohort's slides from a CSV file or a folder of slide files (sorted by name)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        if not files:
            raise InvalidParameterError(f"folder {str(source)!r} holds no slide files ({', '.join(SLIDE_SUFFIXES)})")
        return _checked([CohortItem(p.stem, p) for p in files], str(source))
    if not source.is_file():
        raise InvalidParameterError(f"cohort {str(source)!r} does not exist; give a CSV with a 'slide' column or a folder")
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "slide" not in columns:
        raise InvalidParameterError(f"cohort table {str(source)!r} has no 'slide' column (columns: {', '.join(columns)})")
    items = []
    for number, row in enumerate(rows, start=2):
        if not (row.get("slide") or "").strip():
            raise InvalidParameterError(f"cohort table {str(source)!r} line {number}: the slide path is empty")
        slide = _resolve(source, row["slide"].strip())
        mpp = (row.get("mpp") or "").strip()
        try:
            mpp_value = float(mpp) if mpp else None
        except ValueError:
            mpp_value = -1.0
        if mpp_value is not None and not mpp_value > 0:
            raise InvalidParameterError(f"cohort table {str(source)!r} line {number}: mpp {mpp!r} is not a positive "
                                        "number of micrometres per pixel")
        regions = (row.get("regions") or "").strip()
        items.append(CohortItem((row.get("slide_id") or "").strip() or slide.stem, slide, mpp_value,
                                _resolve(source, regions) if regions else None))
    if not items:
        raise InvalidParameterError(f"cohort table {str(source)!r} lists no slides")
    return _checked(items, str(source))


def _resolve(table: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (table.parent / path)


def _checked(items: list[CohortItem], source: str) -> list[CohortItem]:
    seen: set[str] = set()
    for item in items:
        if not _ID.match(item.slide_id):
            raise InvalidParameterError(
                f"cohort {source!r}: slide id {item.slide_id!r} is not usable as a folder name; use letters, digits, "
                "'.', '_' and '-' (set a slide_id column)"
            )
        if item.slide_id in seen:
            raise InvalidParameterError(
                f"cohort {source!r}: slide id {item.slide_id!r} appears twice; give each slide its own slide_id"
            )
        seen.add(item.slide_id)
    return items
