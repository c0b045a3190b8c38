"""The train / validation / test partition of a patch dataset: by slide (or patient), never by patch.

A partition is a CSV, ``relpath,label,split,group`` (``split`` is train, val or test; ``group`` the slide or
patient the patch comes from). :func:`read_partition` checks one against the dataset (every file exists with
its label, no group in two splits); :func:`make_partition` creates one from a metadata table giving each patch's
group, with scikit-learn's ``StratifiedGroupKFold``: the groups are dealt into ``sum(ratios)`` folds balanced by
class as far as the groups allow, and whole folds go to train, val and test (7:2:1 = 7, 2 and 1 folds of 10),
reproducibly from a seed. (The balancing is greedy and deterministic; the seed only orders slides that balance
equally well, so two seeds often give the same partition.)
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hepatoquant.bench.dataset import DatasetError, Patch, PatchDataset

__all__ = ["SPLITS", "Partition", "make_partition", "parse_ratios", "read_partition", "write_partition"]

SPLITS = ("train", "val", "test")
PARTITION_NAME = "split.csv"


@dataclass(frozen=True)
class Partition:
    """Each patch's split and group, for one dataset."""

    dataset: PatchDataset
    split_of: dict[str, str]  # relpath -> split
    group_of: dict[str, str]  # relpath -> slide or patient

    def patches(self, split: str) -> list[Patch]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [p for p in self.dataset.patches if self.split_of.get(p.relpath) == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Patches per class per split, and the number of groups per split (``"groups"``)."""
        table: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            patches = self.patches(split)
            counted = Counter(p.label for p in patches)
            table[split] = {c: counted.get(c, 0) for c in self.dataset.classes}
            table[split]["groups"] = len({self.group_of[p.relpath] for p in patches})
        return table

    def counts_table(self) -> str:
        """The counts as a Markdown table (classes as rows, splits as columns)."""
        counts = self.counts()
        lines = ["| class | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
        for name in (*self.dataset.classes, "groups"):
            lines.append(f"| {name} | " + " | ".join(str(counts[s][name]) for s in SPLITS) + " |")
        return "\n".join(lines)


def parse_ratios(text: str) -> tuple[int, int, int]:
    """``"7:2:1"`` -> (7, 2, 1): whole numbers of folds for train, val and test."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) == 0:
        raise DatasetError(f"ratios {text!r} must be three whole numbers train:val:test, e.g. 7:2:1")
    return int(parts[0]), int(parts[1]), int(parts[2])


def make_partition(dataset: PatchDataset, groups: dict[str, str], *, ratios: tuple[int, int, int] = (7, 2, 1),
                   seed: int = 0) -> Partition:
    """A partition by group, stratified by class, from ``groups`` (relpath -> slide or patient)."""
    missing = [p.relpath for p in dataset.patches if p.relpath not in groups]
    if missing:
        raise DatasetError(
            f"the metadata table gives no slide for {len(missing)} patch(es), e.g. {missing[0]!r}; every patch "
            "needs its slide (or patient) so that no slide is split across train, val and test"
        )
    group_names = sorted({groups[p.relpath] for p in dataset.patches})
    folds = sum(ratios)
    if len(group_names) < folds:
        raise DatasetError(
            f"{len(group_names)} slides cannot be split {':'.join(map(str, ratios))} by slide (that needs at least "
            f"{folds}); use coarser ratios or a dataset with more slides"
        )
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    group_index = {g: i for i, g in enumerate(group_names)}
    labels = np.array([class_index[p.label] for p in dataset.patches])
    group_ids = np.array([group_index[groups[p.relpath]] for p in dataset.patches])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(labels), dtype=int)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, group_ids)):
            fold_of[held_out] = fold
    except ValueError as exc:  # e.g. every class has fewer patches than folds
        raise DatasetError(
            f"cannot split {len(labels)} patches of {len(group_names)} slides {':'.join(map(str, ratios))} "
            f"({exc}); use ratios with fewer folds in all (e.g. 2:1:1) or a larger dataset"
        ) from exc
    boundaries = np.cumsum(ratios)  # folds [0, 7) train, [7, 9) val, [9, 10) test
    split_names = np.array(SPLITS)[np.searchsorted(boundaries, fold_of, side="right")]
    split_of = {p.relpath: str(s) for p, s in zip(dataset.patches, split_names, strict=True)}
    return Partition(dataset, split_of, {p.relpath: groups[p.relpath] for p in dataset.patches})


def read_groups(path: str | Path, column: str = "slide") -> dict[str, str]:
    """relpath -> group from a metadata CSV with a ``relpath`` column and the group column (slide or patient)."""
    rows = _read_csv(path, required=("relpath", column), what="metadata table")
    return {row["relpath"]: row[column] for row in rows}


def read_partition(path: str | Path, dataset: PatchDataset) -> Partition:
    """The partition in ``path``, checked against ``dataset``; patches the file does not name are left out
    (e.g. removed by curation), but a file naming a patch the dataset lacks, or a group in two splits, fails."""
    rows = _read_csv(path, required=("relpath", "label", "split", "group"), what="partition")
    known = {p.relpath: p.label for p in dataset.patches}
    split_of: dict[str, str] = {}
    group_of: dict[str, str] = {}
    splits_of_group: dict[str, set[str]] = {}
    for number, row in enumerate(rows, start=2):
        relpath, label, split, group = row["relpath"], row["label"], row["split"], row["group"]
        if split not in SPLITS:
            raise DatasetError(f"partition {str(path)!r} line {number}: split {split!r} is not one of {', '.join(SPLITS)}")
        if relpath not in known:
            raise DatasetError(
                f"partition {str(path)!r} line {number} names {relpath!r}, which is not a patch of "
                f"{str(dataset.root)!r} (missing file, or a patch removed by curation); fix the file or the dataset"
            )
        if known[relpath] != label:
            raise DatasetError(f"partition {str(path)!r} line {number}: {relpath!r} is labelled {label!r} but lies in "
                               f"class folder {known[relpath]!r}")
        split_of[relpath], group_of[relpath] = split, group
        splits_of_group.setdefault(group, set()).add(split)
    mixed = sorted(g for g, s in splits_of_group.items() if len(s) > 1)
    if mixed:
        raise DatasetError(
            f"partition {str(path)!r} puts slide(s) {', '.join(mixed[:5])} in more than one split; patches of one "
            "slide must stay together (otherwise test scores are inflated)"
        )
    restricted = dataset.restricted(set(split_of))
    return Partition(restricted, split_of, group_of)


def write_partition(partition: Partition, path: str | Path) -> Path:
    """Writes ``relpath,label,split,group`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["relpath", "label", "split", "group"])
        for p in partition.dataset.patches:
            writer.writerow([p.relpath, p.label, partition.split_of[p.relpath], partition.group_of[p.relpath]])
    temporary.replace(path)
    return path


def _read_csv(path: str | Path, *, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    try:
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as exc:
        raise DatasetError(f"{what} {str(path)!r} cannot be read ({exc})") from exc
    absent = [c for c in required if c not in columns]
    if absent:
        raise DatasetError(f"{what} {str(path)!r} lacks the column(s) {', '.join(absent)}; it needs {', '.join(required)}")
    return rows
