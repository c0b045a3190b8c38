"""One cohort slide, the same analysis as ``hepatoquant analyze``, and the cohort's tables.

Each slide's outputs go to ``OUT/slides/<slide_id>/`` (OUT a folder or an fsspec URL: :mod:`.storage`), and only
complete outputs count: a run that stops half-way leaves nothing the next run mistakes for a result. Whatever
engine runs :func:`analyze_item` (a local process or a Ray actor), the slide's files are the same.

After the run, ``OUT/cohort.csv`` (and ``cohort.parquet`` with pyarrow) is the client's cohort table
(:mod:`hepatoquant_client.cohort`, one row per completed slide, in cohort order) and ``OUT/failures.csv`` lists each
failed slide with its error.
"""

from __future__ import annotations

import csv
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hepatoquant.analysis_request import AnalysisRequest, Runtime
from hepatoquant.cohort.inputs import CohortItem
from hepatoquant.cohort.storage import OutputStore

__all__ = ["CohortSettings", "SlideOutcome", "analyze_item", "is_complete", "slide_folder", "write_tables"]


@dataclass(frozen=True)
class CohortSettings:
    """What every slide of the cohort is analysed with: the ``AnalysisRequest`` the ``cohort run`` flags ask
    for (its slide, MPP and regions come from each CSV row) and this machine's :class:`Runtime`. Plain,
    picklable values: it travels to worker processes."""

    request: AnalysisRequest
    models_dir: str | None = None
    runtime: Runtime = field(default_factory=lambda: Runtime(device="cpu"))

    def for_item(self, item: CohortItem) -> AnalysisRequest:
        """The request for one slide of the cohort."""
        request = AnalysisRequest()
        request.CopyFrom(self.request)
        request.slide = str(item.slide)
        if item.mpp_um_px is not None:
            request.mpp_um_px = item.mpp_um_px
        return request


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
    """A slide's output folder in a folder store."""
    return Path(out_dir) / "slides" / slide_id


def is_complete(out: str | Path, slide_id: str) -> bool:
    return OutputStore(out).is_complete(slide_id)


def analyze_item(item: CohortItem, settings: CohortSettings, out: str | Path, models=None) -> SlideOutcome:
    """Analyses one slide into its output folder; our errors and any other exception become a failed outcome
    (one slide never stops the cohort). ``models`` (an :class:`hepatoquant.analysis.ModelCache`) keeps the
    models loaded between slides."""
    from hepatoquant.analysis import ModelCache, analyze_slide
    from hepatoquant.analysis_request import resolve_options
    from hepatoquant.pack_lookup import resolve_model_pack
    from hepatoquant.outputs import write_outputs

    store = OutputStore(out)
    if store.is_complete(item.slide_id):
        return SlideOutcome(item.slide_id, str(item.slide), ok=True, skipped=True)
    started = time.perf_counter()
    try:
        models_dir = Path(settings.models_dir) if settings.models_dir else None
        request = settings.for_item(item)
        pack = resolve_model_pack(request.model, models_dir)
        segmenter = None if request.segmenter_model in ("", "none") else resolve_model_pack(request.segmenter_model, models_dir)
        options = resolve_options(request, pack, settings.runtime, regions_path=item.regions)
        result = analyze_slide(item.slide, pack, options, segmenter=segmenter, models=models or ModelCache())
        with store.slide_outputs(item.slide_id) as staging:  # replaces only an incomplete earlier attempt
            write_outputs(result, staging, include_tiles=not request.omit_tiles)
        return SlideOutcome(item.slide_id, str(item.slide), ok=True, tiles=len(result.grid),
                            seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - recorded in the failures table; the cohort goes on
        from hepatoquant.errors import HepatoQuantError, MissingMPPError

        if isinstance(exc, MissingMPPError):  # the fix in a cohort is the CSV's column, not a flag
            exc = exc.with_fix("give it in the mpp column of the cohort CSV (micrometres per pixel, e.g. 0.25 for "
                               "a 40x scan, 0.5 for 20x)")

        return SlideOutcome(
            item.slide_id, str(item.slide), ok=False, seconds=time.perf_counter() - started,
            error_type=type(exc).__name__,
            error=str(exc) if isinstance(exc, HepatoQuantError) else f"{type(exc).__name__}: {exc}",
            details={} if isinstance(exc, HepatoQuantError) else {"traceback": traceback.format_exc(limit=8)},
        )


FAILURE_COLUMNS = ["slide_id", "slide", "error_type", "error"]


def write_tables(items: list[CohortItem], outcomes: dict[str, SlideOutcome], out: str | Path) -> dict[str, str]:
    """``cohort.csv`` (the client's cohort table, completed slides in cohort order) and ``failures.csv``."""
    from hepatoquant_client.cohort import cohort_rows, write_cohort

    store = OutputStore(out)
    complete = [item.slide_id for item in items if store.is_complete(item.slide_id)]

    written: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hepatoquant-tables-") as temporary:
        local = Path(temporary)
        if complete:
            rows = cohort_rows((slide_id, store.report(slide_id)) for slide_id in complete)  # one report at a time
            for file in write_cohort(rows, local / "cohort.csv").written:
                written.setdefault("cohort", store.put(file, file.name))
        with (local / "failures.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FAILURE_COLUMNS)
            writer.writeheader()
            for item in items:
                outcome = outcomes.get(item.slide_id)
                if outcome is not None and not outcome.ok:
                    writer.writerow({"slide_id": outcome.slide_id, "slide": outcome.slide,
                                     "error_type": outcome.error_type, "error": outcome.error})
        written["failures"] = store.put(local / "failures.csv", "failures.csv")
    return written
