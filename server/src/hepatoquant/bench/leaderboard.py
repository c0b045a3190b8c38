"""The encoder comparison of a HepatoBench run: one row per encoder, its linear probe's test-split scores.

Written like the paper's Figure 2 table: ranked by macro F1 (ties by accuracy, then encoder name so the order is
fully determined), each score as ``0.912 (0.901-0.923)`` with its bootstrap confidence interval, the best value of
each column in bold. ``leaderboard.json`` holds everything the table was made from, so runs can be read back and
merged (:func:`read_leaderboard`) and the table redrawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hepatoquant.atomic_write import write_file_atomic
from hepatoquant.errors import InvalidParameterError

__all__ = [
    "COLUMNS",
    "FORMAT_VERSION",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "Entry",
    "LeaderboardError",
    "format_with_ci",
    "leaderboard_markdown",
    "rank_entries",
    "read_leaderboard",
    "write_leaderboard",
]

FORMAT_VERSION = 1
JSON_NAME = "leaderboard.json"
MARKDOWN_NAME = "leaderboard.md"
#: Table columns: (key in the metrics dict of classification_metrics, heading). Each gets a bar plot.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("precision_macro", "Macro precision"),
    ("recall_macro", "Macro recall"),
    ("f1_macro", "Macro F1"),
    ("f1_weighted", "Weighted F1"),
)
_DECIMALS = 3


class LeaderboardError(InvalidParameterError):
    """Entries that cannot make a leaderboard, or a leaderboard file that cannot be read; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One encoder's result on the test split.

    ``metrics`` is the output of :func:`hepatoquant.bench.metrics.classification_metrics`. ``extra`` is free,
    JSON-ready run information shown under the table, by convention ``{"probe": {"lr", "weight_decay" or "C",
    "epochs", "train_seconds"}, "extraction": {"seconds", "patches_per_second"}}``.
    """

    encoder: str
    pack: str
    embedding_dim: int
    metrics: dict
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "encoder": self.encoder,
            "pack": self.pack,
            "embedding_dim": self.embedding_dim,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: object, *, source: str) -> Entry:
        """The entry a ``to_json`` dict describes; ``source`` names where it came from in errors."""
        keys = ("encoder", "pack", "embedding_dim", "metrics")
        if not isinstance(data, dict) or not all(key in data for key in keys):
            raise LeaderboardError(f"{source} is not a leaderboard entry: it needs the keys {', '.join(keys)}")
        entry = cls(data["encoder"], data["pack"], data["embedding_dim"], data["metrics"], data.get("extra", {}))
        _check_entry(entry, source)
        return entry


def rank_entries(entries: list[Entry]) -> list[Entry]:
    """Entries in table order: macro F1 descending, then accuracy descending, then encoder name."""
    return sorted(entries, key=lambda e: (-e.metrics["f1_macro"], -e.metrics["accuracy"], e.encoder))


def write_leaderboard(entries: list[Entry], out_dir: str | Path, *, title: str, dataset_name: str) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.json`` and ``leaderboard_<metric>.png`` (one per column) into
    ``out_dir`` (created if needed), each atomically; returns their paths keyed ``markdown``, ``json`` and
    ``plot_<metric>``.

    Refuses an empty list, repeated model packs (two packs may share an encoder: two checkpoints of UNI) and entries whose metrics lack a column or are not JSON-ready.
    """
    entries = list(entries)
    if not entries:
        raise LeaderboardError("no entries to rank; score at least one encoder before writing a leaderboard")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Entry):
            raise LeaderboardError(f"entry {index} is a {type(entry).__name__}, not a leaderboard Entry")
        _check_entry(entry, f"entry {index} ({entry.encoder!r})")
    names = [e.pack for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LeaderboardError(
            f"model packs {repeated} appear more than once; keep one result per pack"
        )
    for name, value in (("title", title), ("dataset_name", dataset_name)):
        if not isinstance(value, str) or not value.strip():
            raise LeaderboardError(f"{name} must be a non-empty string, not {value!r}")

    ranked = rank_entries(entries)
    out_dir = Path(out_dir)
    document = {
        "format_version": FORMAT_VERSION,
        "title": title,
        "dataset": dataset_name,
        "ranked_by": ["f1_macro", "accuracy"],
        "columns": [key for key, _ in COLUMNS],
        "entries": [{"rank": rank, **entry.to_json()} for rank, entry in enumerate(ranked, start=1)],
    }
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    paths: dict[str, Path] = {}
    for key, heading in COLUMNS:
        path = out_dir / f"leaderboard_{key}.png"
        _plot_column(ranked, key, heading, path, title=title, dataset_name=dataset_name)
        paths[f"plot_{key}"] = path
    paths["json"] = out_dir / JSON_NAME
    write_file_atomic(paths["json"], lambda handle: handle.write(json_text.encode()), what="leaderboard JSON")
    markdown = leaderboard_markdown(ranked, title=title, dataset_name=dataset_name)
    paths["markdown"] = out_dir / MARKDOWN_NAME
    write_file_atomic(paths["markdown"], lambda handle: handle.write(markdown.encode()), what="leaderboard table")
    return paths


def read_leaderboard(path: str | Path) -> list[Entry]:
    """The entries of a ``leaderboard.json`` (or of the one in the folder ``path``), in rank order."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeaderboardError(
            f"leaderboard {str(path)!r} cannot be read ({exc}); give the {JSON_NAME} a benchmark run wrote"
        ) from exc
    if not isinstance(document, dict) or "format_version" not in document:
        raise LeaderboardError(f"{str(path)!r} is not a leaderboard: it has no format_version")
    if document["format_version"] != FORMAT_VERSION:
        raise LeaderboardError(
            f"leaderboard {str(path)!r} has format_version {document['format_version']!r}; this HepatoQuant reads "
            f"version {FORMAT_VERSION} (a newer file needs a newer HepatoQuant)"
        )
    rows = document.get("entries")
    if not isinstance(rows, list) or not rows:
        raise LeaderboardError(f"leaderboard {str(path)!r} has no entries")
    return [Entry.from_json(row, source=f"entry {i} of {str(path)!r}") for i, row in enumerate(rows)]


def leaderboard_markdown(entries: list[Entry], *, title: str, dataset_name: str) -> str:
    """The Markdown table of (validated) entries in rank order, best value per column in bold, run details below."""
    ranked = rank_entries(entries)
    best = {key: max(_rounded(e.metrics[key]) for e in ranked) for key, _ in COLUMNS}
    header = ["Rank", "Encoder", "Model pack", "Dim", *(heading for _, heading in COLUMNS)]
    lines = [
        f"# {title}",
        "",
        f"Dataset: {dataset_name}. {_caption(ranked)}",
        "",
        "| " + " | ".join(header) + " |",
        "|---:|---|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for rank, entry in enumerate(ranked, start=1):
        cells = [str(rank), _escape(entry.encoder), _escape(entry.pack), str(entry.embedding_dim)]
        for key, _ in COLUMNS:
            text = format_with_ci(entry.metrics[key], entry.metrics.get("ci", {}).get(key))
            cells.append(f"**{text}**" if _rounded(entry.metrics[key]) == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    for note in _comparability_notes(ranked):
        lines += ["", f"Note: {note}"]
    details = [(e, _flatten(e.extra)) for e in ranked]
    if any(flat for _, flat in details):
        lines += ["", "## Run details", ""]
        for entry, flat in details:
            text = ", ".join(f"{key} = {_detail(value)}" for key, value in flat) or "none recorded"
            lines.append(f"- **{_escape(entry.pack)}** ({_escape(entry.encoder)}): {text}")
    return "\n".join(lines) + "\n"


def format_with_ci(value: float, ci: list[float] | None) -> str:
    """``0.912 (0.901-0.923)``; the value alone when there is no interval."""
    if not ci:
        return f"{value:.{_DECIMALS}f}"
    return f"{value:.{_DECIMALS}f} ({ci[0]:.{_DECIMALS}f}-{ci[1]:.{_DECIMALS}f})"


# --- helpers ----------------------------------------------------------------------------------------------------


def _check_entry(entry: Entry, source: str) -> None:
    if not isinstance(entry.encoder, str) or not entry.encoder.strip():
        raise LeaderboardError(f"{source}: the encoder name must be a non-empty string, not {entry.encoder!r}")
    if not isinstance(entry.pack, str):
        raise LeaderboardError(f"{source}: pack must be the model pack's name, not {entry.pack!r}")
    if isinstance(entry.embedding_dim, bool) or not isinstance(entry.embedding_dim, int) or entry.embedding_dim < 1:
        raise LeaderboardError(f"{source}: embedding_dim must be a positive integer, not {entry.embedding_dim!r}")
    if not isinstance(entry.metrics, dict) or not isinstance(entry.extra, dict):
        raise LeaderboardError(f"{source}: metrics and extra must be dicts (metrics from classification_metrics)")
    intervals = entry.metrics.get("ci", {})
    if not isinstance(intervals, dict):
        raise LeaderboardError(f"{source}: metrics['ci'] is {intervals!r}, not a dict of [low, high] intervals")
    for key, _ in COLUMNS:
        value = entry.metrics.get(key)
        if not _is_score(value):
            raise LeaderboardError(
                f"{source}: metrics[{key!r}] is {value!r}, not a score in [0, 1]; pass the dict "
                "classification_metrics returned for the test split"
            )
        ci = intervals.get(key)
        if ci is not None and not (isinstance(ci, list | tuple) and len(ci) == 2 and all(map(_is_score, ci))):
            raise LeaderboardError(f"{source}: metrics['ci'][{key!r}] is {ci!r}, not a [low, high] pair in [0, 1]")
    try:
        json.dumps(entry.to_json(), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LeaderboardError(
            f"{source}: its metrics or extra are not JSON-ready ({exc}); convert paths, arrays and NumPy numbers "
            "to str, list, int or float"
        ) from exc


def _is_score(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    )


def _rounded(value: float) -> float:
    return round(value, _DECIMALS)


def _caption(ranked: list[Entry]) -> str:
    settings = {
        (e.metrics.get("bootstrap", {}).get("confidence"), e.metrics.get("bootstrap", {}).get("resamples"))
        for e in ranked
        if e.metrics.get("ci")
    }
    order = "Ranked by macro F1 (ties by accuracy); best value per column in bold."
    if not settings:
        return f"{order} No confidence intervals were computed."
    if len(settings) == 1:
        confidence, resamples = next(iter(settings))
        interval = f"{confidence * 100:g}% bootstrap confidence interval, percentile method, {resamples} resamples"
        return f"{order} Each score: point estimate ({interval} of the test split)."
    return f"{order} Each score: point estimate (bootstrap confidence interval; settings differ, see {JSON_NAME})."


def _comparability_notes(ranked: list[Entry]) -> list[str]:
    notes = []
    sizes = {e.encoder: e.metrics.get("n_samples") for e in ranked}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        notes.append(f"the encoders were scored on test sets of different sizes ({listed}); compare with care.")
    class_lists = {tuple(e.metrics.get("classes", ())) for e in ranked}
    if len(class_lists) > 1:
        notes.append("the encoders were scored on different class lists; compare with care.")
    return notes


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    flat: list[tuple[str, object]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat += _flatten(value, f"{name}.")
        else:
            flat.append((name, value))
    return flat


def _detail(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(str(value))


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _plot_column(ranked: list[Entry], key: str, heading: str, path: Path, *, title: str, dataset_name: str) -> None:
    """A bar per encoder (table order) with its CI as an error bar, on a bare Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [e.metrics[key] for e in ranked]
    below, above = [], []
    for entry, value in zip(ranked, values, strict=True):
        ci = entry.metrics.get("ci", {}).get(key)
        # A percentile interval need not contain its point estimate; matplotlib refuses negative error lengths.
        below.append(max(0.0, value - ci[0]) if ci else 0.0)
        above.append(max(0.0, ci[1] - value) if ci else 0.0)
    figure = Figure(figsize=(max(4.5, 1.5 + 0.9 * len(ranked)), 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(ranked))
    axes.bar(positions, values, yerr=[below, above], capsize=4, color="#4C72B0", ecolor="black")
    for position, value, error in zip(positions, values, above, strict=True):
        axes.text(position, value + error + 0.01, f"{value:.{_DECIMALS}f}", ha="center", va="bottom", fontsize=8)
    many = len(ranked) > 4
    axes.set_xticks(positions, [e.encoder for e in ranked], rotation=30 if many else 0,
                    ha="right" if many else "center")
    axes.set_ylim(0.0, 1.1)
    axes.set_ylabel(heading)
    axes.set_title(f"{title}: {heading}\n{dataset_name}", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    write_file_atomic(path, lambda handle: figure.savefig(handle, format="png"), what=f"{heading} plot")
