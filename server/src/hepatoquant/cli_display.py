"""Terminal display for the command line: the progress bar and the closing summary table (rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hepatoquant.analysis import AnalysisResult, ProgressCallback

__all__ = ["progress_bar", "composition_table"]


@contextlib.contextmanager
def progress_bar(console: Console, *, disabled: bool = False) -> Iterator[ProgressCallback]:
    """A callback for :func:`analyze_slide` that drives a bar: tiles done / total and tiles per second."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disabled,
    )
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            label = {"tissue": "Tissue detection", "windows": "Segmenting", "tiles": "Classifying tiles"}.get(stage, stage)
            tasks[stage] = progress.add_task(label, total=total, rate="")
        task_id = tasks[stage]
        progress.update(task_id, completed=done, total=total)
        speed = progress.tasks[task_id].speed
        if speed:
            progress.update(task_id, rate=f"{speed:.1f} {'windows' if stage == 'windows' else 'tiles'}/s")

    with progress:
        yield on_progress


def composition_table(result: AnalysisResult) -> Table:
    """Composition per region class (rows) and tissue class (columns, % of the region's tiles)."""
    status = " (UNTRAINED DEMO MODEL)" if result.model["model_status"] == "untrained-demo" else ""
    table = Table(
        title=f"{Path(result.slide.path).name}: {len(result.grid)} tiles, model {result.model['name']}{status}",
        caption_justify="left",
    )
    table.add_column("region", no_wrap=True)
    table.add_column("tiles", justify="right")
    table.add_column("mm^2", justify="right")
    for code in result.classes:  # % of the region's tiles
        table.add_column(f"{code}%", justify="right")
    for entry in result.composition.region_classes:
        table.add_row(
            entry.name,
            str(entry.tile_count),
            f"{entry.tile_area_mm2:.3f}",
            *(f"{entry.class_percent[code]:.1f}" if entry.class_percent is not None else "-" for code in result.classes),
        )
    seconds = result.timings_s["total"]
    table.caption = (
        f"Columns CODE% are percentages of the region's tiles (- where it has none). {seconds:.1f} s in all, "
        f"{result.tiles_per_second:.1f} tiles/s classification."
    )
    return table
