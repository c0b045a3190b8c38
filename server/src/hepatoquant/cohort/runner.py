"""One cohort slide, the same analysis as ``hepatoquant analyze``, and the cohort's tables.

Each slide's outputs go to ``OUT/slides/<slide_id>/``: written into a temporary sibling folder and renamed into
place when complete, so an existing folder means complete outputs and a run that stops half-way leaves only a
temporary folder, which the next run ignores and replaces. Whatever engine runs :func:`analyze_item` (a local
process or a Ray actor), the slide's files are the same.

After the run, ``OUT/cohort.csv`` (and ``cohort.parquet`` with pyarrow) is the client's cohort table
(:mod:`hepatoquant_client.cohort`, one row per completed slide, in cohort order) and ``OUT/failures.csv`` lists each
failed slide with its error.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hepatoquant.cohort.inputs import CohortItem

__all__ = ["AnalysisSettings", "SlideOutcome", "analyze_item", "is_complete", "slide_folder", "write_tables"]


@dataclass(frozen=True)
class AnalysisSettings:
    """What every slide of the cohort is analysed with (plain values: it travels to worker processes)."""

    model: str
    segmenter: str | None
    models_dir: str | None
    device: str = "cpu"
    batch_size: int = 32
    reader_workers: int = 2
    tile_size_px: int | None = None
    tile_spacing_um_px: float | None = None
    min_tissue_fraction: float = 0.5
    tumour_class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlideOutcome:
    slide_id: str
    slide: str
    ok: bool
    skipped: bool = False  # complete outputs were already there
    tiles: int = 0
    seconds: float = 0.0
    error_type: str = ""
    error: str = ""
    details: dict = field(default_factory=dict)


def slide_folder(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "slides" / slide_id


def is_complete(out_dir: Path, slide_id: str) -> bool:
    """A slide's folder exists only once all its outputs are in it (it is renamed into place)."""
    folder = slide_folder(out_dir, slide_id)
    return folder.is_dir() and any(folder.glob("*.report.json"))


def analyze_item(item: CohortItem, settings: AnalysisSettings, out_dir: Path, models=None) -> SlideOutcome:
    """Analyses one slide into its output folder; our errors and any other exception become a failed outcome
    (one slide never stops the cohort). ``models`` (an :class:`hepatoquant.analysis.ModelCache`) keeps the
    models loaded between slides."""
    from hepatoquant.analysis import AnalysisOptions, ModelCache, analyze_slide
    from hepatoquant.model_pack import resolve_model_pack
    from hepatoquant.outputs import write_outputs
    from hepatoquant.regions import DEFAULT_TUMOUR_CLASS_NAMES
    from hepatoquant.tiling import TileSpec

    if is_complete(out_dir, item.slide_id):
        return SlideOutcome(item.slide_id, str(item.slide), ok=True, skipped=True)
    started = time.perf_counter()
    staging = None
    try:
        models_dir = Path(settings.models_dir) if settings.models_dir else None
        pack = resolve_model_pack(settings.model, models_dir)
        segmenter = resolve_model_pack(settings.segmenter, models_dir) if settings.segmenter else None
        options = AnalysisOptions(
            tile=TileSpec(tile_size_px=settings.tile_size_px or pack.tile_size_px,
                          spacing_um_px=settings.tile_spacing_um_px or pack.spacing_um_px,
                          min_tissue_fraction=settings.min_tissue_fraction),
            mpp_override_um_px=item.mpp_um_px,
            regions_path=item.regions,
            tumour_class_names=settings.tumour_class_names or DEFAULT_TUMOUR_CLASS_NAMES,
            batch_size=settings.batch_size,
            num_workers=settings.reader_workers,
            device=settings.device,
        )
        result = analyze_slide(item.slide, pack, options, segmenter=segmenter, models=models or ModelCache())
        target = slide_folder(out_dir, item.slide_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{item.slide_id}.", dir=target.parent))
        write_outputs(result, staging)
        shutil.rmtree(target, ignore_errors=True)  # only an incomplete earlier folder can be here
        os.replace(staging, target)
        staging = None
        return SlideOutcome(item.slide_id, str(item.slide), ok=True, tiles=len(result.grid),
                            seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - recorded in the failures table; the cohort goes on
        from hepatoquant.errors import HepatoQuantError

        return SlideOutcome(
            item.slide_id, str(item.slide), ok=False, seconds=time.perf_counter() - started,
            error_type=type(exc).__name__,
            error=str(exc) if isinstance(exc, HepatoQuantError) else f"{type(exc).__name__}: {exc}",
            details={} if isinstance(exc, HepatoQuantError) else {"traceback": traceback.format_exc(limit=8)},
        )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


FAILURE_COLUMNS = ["slide_id", "slide", "error_type", "error"]


def write_tables(items: list[CohortItem], outcomes: dict[str, SlideOutcome], out_dir: Path) -> dict[str, Path]:
    """``cohort.csv`` (the client's cohort table, completed slides in cohort order) and ``failures.csv``."""
    from hepatoquant_client import AnalysisOutcome
    from hepatoquant_client.cohort import cohort_rows, write_cohort

    from hepatoquant.service.convert import result_to_proto

    out_dir = Path(out_dir)
    completed = [(item.slide_id, AnalysisOutcome.from_proto(result_to_proto("", slide_folder(out_dir, item.slide_id))))
                 for item in items if is_complete(out_dir, item.slide_id)]
    written = {}
    if completed:
        files = write_cohort(cohort_rows(completed), out_dir / "cohort.csv")
        written["cohort"] = files.written[0]
    failures = out_dir / "failures.csv"
    temporary = failures.with_name(".failures.csv.partial")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FAILURE_COLUMNS)
        writer.writeheader()
        for item in items:
            outcome = outcomes.get(item.slide_id)
            if outcome is not None and not outcome.ok:
                writer.writerow({"slide_id": outcome.slide_id, "slide": outcome.slide, "error_type": outcome.error_type,
                                 "error": outcome.error})
    temporary.replace(failures)
    written["failures"] = failures
    return written
