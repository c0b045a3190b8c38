"""Tests of the HepatoBench encoder leaderboard: ranking by macro F1 (ties by accuracy), bold best per column, CI
formatting, JSON round trip, the bar plots, and refusal of empty, repeated or malformed entries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hepatoquant.bench.leaderboard import (
    COLUMNS,
    Entry,
    LeaderboardError,
    format_with_ci,
    leaderboard_markdown,
    rank_entries,
    read_leaderboard,
    write_leaderboard,
)
from hepatoquant.bench.metrics import classification_metrics
from hepatoquant.errors import InvalidParameterError, OutputWriteError

CLASSES = ["TUM", "FIB", "INF", "NOR"]


def scored(correct: float, seed: int, n: int = 400) -> dict:
    """Real classification_metrics output for a probe right about ``correct`` of the time."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(CLASSES), size=n)
    predicted = np.where(rng.random(n) < correct, truth, rng.integers(0, len(CLASSES), size=n))
    return classification_metrics(truth, predicted, CLASSES, bootstrap=200, seed=0)


def entry(name: str, metrics: dict, **overrides: float) -> Entry:
    """An entry whose metrics are ``metrics`` with some scores replaced (to force ties and orders)."""
    return Entry(name, f"{name}-hepatobench", 1024, {**metrics, **overrides},
                 {"probe": {"C": 0.1, "epochs": 100, "train_seconds": 2.5},
                  "extraction": {"seconds": 12.0, "patches_per_second": 812.345}})


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return [entry("gigapath", scored(0.8, 1)), entry("uni", scored(0.95, 2)), entry("virchow2", scored(0.6, 3))]


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Rank")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


# --- ranking and table ------------------------------------------------------------------------------------------


def test_ranked_by_macro_f1_then_accuracy_then_name(entries: list[Entry]) -> None:
    assert [e.encoder for e in rank_entries(entries)] == ["uni", "gigapath", "virchow2"]
    base = entries[0].metrics
    tied = [
        entry("b", base, f1_macro=0.9, accuracy=0.91),
        entry("a", base, f1_macro=0.9, accuracy=0.91),
        entry("c", base, f1_macro=0.9, accuracy=0.95),
        entry("d", base, f1_macro=0.95, accuracy=0.5),
    ]
    assert [e.encoder for e in rank_entries(tied)] == ["d", "c", "a", "b"]


def test_markdown_table_ranks_formats_and_bolds_the_best_per_column(entries: list[Entry]) -> None:
    base = entries[1].metrics
    # "second" has the better balanced accuracy although the lower macro F1: bold goes per column, not per row.
    rows_in = [entry("first", base, f1_macro=0.9, balanced_accuracy=0.80),
               entry("second", base, f1_macro=0.8, balanced_accuracy=0.85)]
    markdown = leaderboard_markdown(rows_in, title="HepatoBench", dataset_name="HepatoBench v1")
    assert markdown.startswith("# HepatoBench\n\nDataset: HepatoBench v1. Ranked by macro F1")
    assert "95% bootstrap confidence interval, percentile method, 200 resamples" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| Rank"))
    assert header == ("| Rank | Encoder | Model pack | Dim | Accuracy | Balanced accuracy | Macro precision | "
                      "Macro recall | Macro F1 | Weighted F1 |")
    first, second = table_rows(markdown)
    assert first[:4] == ["1", "first", "first-hepatobench", "1024"]
    assert second[:2] == ["2", "second"]
    ci = base["ci"]["balanced_accuracy"]
    assert first[5] == f"0.800 ({ci[0]:.3f}-{ci[1]:.3f})"
    assert second[5] == f"**0.850 ({ci[0]:.3f}-{ci[1]:.3f})**"
    assert first[8].startswith("**0.900 (") and not second[8].startswith("**")
    # Columns where both have the same value: both bold (a tie at the shown precision).
    assert first[4].startswith("**") and second[4].startswith("**")


def test_best_value_compared_at_the_shown_precision(entries: list[Entry]) -> None:
    base = entries[0].metrics
    markdown = leaderboard_markdown(
        [entry("a", base, accuracy=0.91234, f1_macro=0.9), entry("b", base, accuracy=0.91199, f1_macro=0.8),
         entry("c", base, accuracy=0.9114, f1_macro=0.7)],
        title="t", dataset_name="d",
    )
    accuracy = [row[4] for row in table_rows(markdown)]
    assert [cell.startswith("**0.912 (") for cell in accuracy] == [True, True, False]


def test_ci_formatting() -> None:
    assert format_with_ci(0.91234, [0.90111, 0.92349]) == "0.912 (0.901-0.923)"
    assert format_with_ci(1.0, [1.0, 1.0]) == "1.000 (1.000-1.000)"
    assert format_with_ci(0.5, None) == "0.500"


def test_entries_without_intervals_show_values_alone(entries: list[Entry]) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=50)
    plain = Entry("plain", "p", 768, classification_metrics(truth, truth, CLASSES, bootstrap=0))
    markdown = leaderboard_markdown([plain], title="t", dataset_name="d")
    assert table_rows(markdown)[0][4:] == ["**1.000**"] * len(COLUMNS)
    assert "No confidence intervals were computed" in markdown


def test_run_details_and_comparability_notes(entries: list[Entry]) -> None:
    other_size = entry("small-test", scored(0.9, 4, n=100))
    markdown = leaderboard_markdown([*entries, other_size], title="t", dataset_name="d")
    assert "- **uni-hepatobench** (uni): probe.C = 0.1, probe.epochs = 100, probe.train_seconds = 2.5, extraction.seconds = 12, " \
           "extraction.patches_per_second = 812.3" in markdown
    assert "Note: the encoders were scored on test sets of different sizes" in markdown
    assert "Note:" not in leaderboard_markdown(entries, title="t", dataset_name="d")


def test_pipes_in_names_do_not_break_the_table(entries: list[Entry]) -> None:
    piped = Entry("uni|lora", "pack|1", 1024, entries[0].metrics)
    markdown = leaderboard_markdown([piped], title="t", dataset_name="d")
    line = next(line for line in markdown.splitlines() if line.startswith("| 1 |"))
    cells = re.split(r"(?<!\\)\|", line.strip("|"))
    assert [cell.strip() for cell in cells[1:3]] == ["uni\\|lora", "pack\\|1"]
    assert len(cells) == 4 + len(COLUMNS)


# --- files ------------------------------------------------------------------------------------------------------


def test_write_then_read_round_trips(entries: list[Entry], tmp_path: Path) -> None:
    out = tmp_path / "run"
    paths = write_leaderboard(entries, out, title="HepatoBench linear probes", dataset_name="HepatoBench v1")
    assert set(paths) == {"markdown", "json", *(f"plot_{key}" for key, _ in COLUMNS)}
    assert paths["markdown"] == out / "leaderboard.md" and paths["json"] == out / "leaderboard.json"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # no temporary files

    document = json.loads(paths["json"].read_text())
    assert document["format_version"] == 1
    assert document["dataset"] == "HepatoBench v1"
    assert document["title"] == "HepatoBench linear probes"
    assert [(e["rank"], e["encoder"]) for e in document["entries"]] == [(1, "uni"), (2, "gigapath"), (3, "virchow2")]
    assert set(document["entries"][0]) == {"rank", "encoder", "pack", "embedding_dim", "metrics", "extra"}

    read = read_leaderboard(paths["json"])
    assert read == rank_entries(entries)  # equal dataclasses: every field, metrics and extra included
    assert read_leaderboard(out) == read  # the folder works too
    # Reading back and writing again (e.g. merging runs) gives the same files.
    again = write_leaderboard(read, tmp_path / "again", title="HepatoBench linear probes",
                              dataset_name="HepatoBench v1")
    assert again["json"].read_text() == paths["json"].read_text()
    assert again["markdown"].read_text() == paths["markdown"].read_text()


def test_plots_are_pngs_with_one_bar_per_encoder(entries: list[Entry], tmp_path: Path) -> None:
    paths = write_leaderboard(entries, tmp_path, title="t", dataset_name="d")
    for key, _ in COLUMNS:
        path = paths[f"plot_{key}"]
        assert path.name == f"leaderboard_{key}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.load()
        assert 400 <= width <= 2000 and 300 <= height <= 1200
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        bar_blue = (np.abs(pixels - np.array([0x4C, 0x72, 0xB0])).sum(axis=2) < 30).any(axis=0)
        runs = np.count_nonzero(np.diff(bar_blue.astype(int)) == 1) + int(bar_blue[0])
        assert runs == len(entries), key  # three separate bars across the width


def test_percentile_interval_not_containing_the_estimate_still_plots(entries: list[Entry], tmp_path: Path) -> None:
    odd = {**entries[0].metrics, "ci": {**entries[0].metrics["ci"], "accuracy": [0.95, 0.97]}, "accuracy": 0.9}
    paths = write_leaderboard([Entry("odd", "p", 8, odd)], tmp_path, title="t", dataset_name="d")
    assert paths["plot_accuracy"].stat().st_size > 1000


# --- errors -----------------------------------------------------------------------------------------------------


def test_empty_and_repeated_entries_are_refused(entries: list[Entry], tmp_path: Path) -> None:
    with pytest.raises(LeaderboardError, match="no entries to rank"):
        write_leaderboard([], tmp_path, title="t", dataset_name="d")
    with pytest.raises(LeaderboardError, match=r"model packs \['[\w-]+'\] appear more than once"):
        write_leaderboard([*entries, entries[1]], tmp_path, title="t", dataset_name="d")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(InvalidParameterError):  # LeaderboardError is an InvalidParameterError (and a ValueError)
        write_leaderboard([], tmp_path, title="t", dataset_name="d")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics": {"accuracy": 0.5}}, r"metrics\['balanced_accuracy'\] is None, not a score in \[0, 1\]"),
        ({"metrics_update": {"f1_macro": float("nan")}}, r"metrics\['f1_macro'\] is nan"),
        ({"metrics_update": {"ci": {"accuracy": [0.9]}}}, r"metrics\['ci'\]\['accuracy'\] is \[0.9\]"),
        ({"extra": {"path": Path("/x")}}, "not JSON-ready"),
        ({"embedding_dim": 0}, "embedding_dim must be a positive integer"),
        ({"encoder": " "}, "the encoder name must be a non-empty string"),
    ],
)
def test_malformed_entries_are_refused(entries: list[Entry], tmp_path: Path, change: dict, message: str) -> None:
    fields = entries[0].to_json()
    fields["metrics"] = {**fields["metrics"], **change.pop("metrics_update", {})}
    fields |= change
    with pytest.raises(LeaderboardError, match=message):
        write_leaderboard([Entry(**fields)], tmp_path, title="t", dataset_name="d")


def test_reading_refuses_missing_foreign_and_newer_files(entries: list[Entry], tmp_path: Path) -> None:
    with pytest.raises(LeaderboardError, match="cannot be read"):
        read_leaderboard(tmp_path / "absent.json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"entries": []}')
    with pytest.raises(LeaderboardError, match="has no format_version"):
        read_leaderboard(foreign)
    paths = write_leaderboard(entries, tmp_path / "run", title="t", dataset_name="d")
    document = json.loads(paths["json"].read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**document, "format_version": 2}))
    with pytest.raises(LeaderboardError, match="has format_version 2; this HepatoQuant reads version 1"):
        read_leaderboard(newer)
    del document["entries"][1]["metrics"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    with pytest.raises(LeaderboardError, match="entry 1 of .* is not a leaderboard entry"):
        read_leaderboard(broken)


def test_unwritable_output_folder_is_reported(entries: list[Entry], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputWriteError, match="could not write the"):
        write_leaderboard(entries, blocker / "out", title="t", dataset_name="d")
