"""The HepatoBench protocol, one step per function, all writing into one work folder (``hepatoquant bench ...``).

    WORK/curation/     clean_index.csv, removed.csv, curation_report.json        (curate)
    WORK/split.csv     the partition used, and split_counts.json                 (split)
    WORK/embeddings/   <pack>/<split>/ cached embeddings                         (extract)
    WORK/probes/<pack>/  probe.json, metrics.json, confusion.md, confusion.png   (probe)
    WORK/leaderboard.md, leaderboard.json, leaderboard_<metric>.png              (compare)

Each step reads what the previous one wrote and says so: ``split`` restricts the dataset to the curated index
when ``curate`` ran, uses the dataset's own ``split.csv`` (the official partition) when there is one, and creates
a partition by slide from a metadata table otherwise; ``extract`` and ``probe`` use ``WORK/split.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hepatoquant.bench.dataset import DatasetError, PatchDataset, load_dataset, read_index
from hepatoquant.bench.extract import Embeddings, extract_embeddings
from hepatoquant.bench.probe import ProbeConfig, ProbeResult, train_probe
from hepatoquant.bench.split import (
    PARTITION_NAME,
    SPLITS,
    Partition,
    make_partition,
    read_groups,
    read_partition,
    write_partition,
)
from hepatoquant.model_pack import ModelPack
from hepatoquant.pack_import import write_probe_pack

__all__ = ["ProbeOutcome", "curated_dataset", "run_compare", "run_curate", "run_extract", "run_probe", "run_split",
           "work_partition"]

Log = Callable[[str], object]
ProgressFor = Callable[[str], Callable[[int, int], object]]  # a label -> a (done, total) callback


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)


def run_curate(dataset_root: Path, work: Path, *, config_path: Path | None = None, workers: int = 4,
               log: Log = print) -> dict:
    """Curates the dataset into WORK/curation (the dataset's files are never touched); returns the report."""
    from hepatoquant.bench.curate import CurationConfig, curate

    dataset = load_dataset(dataset_root)
    config = CurationConfig.from_json(config_path) if config_path else CurationConfig()
    result = curate(dataset, config, workers=workers)
    result.write(work / "curation")
    report = json.loads((work / "curation" / "curation_report.json").read_text())
    log(f"curation: kept {len(result.kept)} of {len(dataset.patches)} patches; {len(result.removed)} removed "
        f"(see {work / 'curation' / 'removed.csv'})")
    return report


def curated_dataset(dataset_root: Path, work: Path, log: Log = print) -> PatchDataset:
    """The dataset, restricted to the curated index when ``curate`` wrote one into WORK."""
    dataset = load_dataset(dataset_root)
    for note in dataset.notes:
        log(f"note: {note}")
    index = work / "curation" / "clean_index.csv"
    if index.is_file():
        dataset = read_index(index, dataset)
        log(f"using the curated index {index} ({len(dataset.patches)} patches)")
    return dataset


def run_split(dataset_root: Path, work: Path, *, metadata: Path | None = None, group_column: str = "slide",
              ratios: tuple[int, int, int] = (7, 2, 1), seed: int = 0, log: Log = print) -> Partition:
    """Writes WORK/split.csv: the dataset's official partition, or a new one by slide from ``metadata``."""
    dataset = curated_dataset(dataset_root, work, log)
    official = dataset.root / PARTITION_NAME
    if metadata is not None:
        partition = make_partition(dataset, read_groups(metadata, group_column), ratios=ratios, seed=seed)
        log(f"new partition by {group_column}, {':'.join(map(str, ratios))}, seed {seed}"
            + (f" (the dataset's own {official.name} is not used)" if official.is_file() else ""))
    elif official.is_file():
        partition = read_partition(official, dataset)
        log(f"the dataset's official partition {official}")
    else:
        raise DatasetError(
            f"dataset {str(dataset.root)!r} has no {PARTITION_NAME}; give --metadata, a CSV with relpath and "
            f"{group_column} columns, to create a partition by {group_column}"
        )
    write_partition(partition, work / PARTITION_NAME)
    _write_json(work / "split_counts.json", partition.counts())
    log(partition.counts_table())
    return partition


def work_partition(dataset_root: Path, work: Path, log: Log = print) -> Partition:
    """The partition ``split`` wrote into WORK."""
    path = work / PARTITION_NAME
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; run `hepatoquant bench split` first")
    return read_partition(path, curated_dataset(dataset_root, work, log))


def run_extract(dataset_root: Path, work: Path, pack: ModelPack, *, device: torch.device | None = None,
                batch_size: int = 64, workers: int = 4, splits: Sequence[str] = SPLITS,
                log: Log = print, progress_for: ProgressFor | None = None,
                partition: Partition | None = None) -> dict[str, Embeddings]:
    """Embeddings of every split with ``pack``'s encoder, cached in WORK/embeddings (``partition``: the one
    :func:`work_partition` gives, when the caller has it already)."""
    partition = partition or work_partition(dataset_root, work, log)
    embeddings = {}
    for split in splits:
        patches = partition.patches(split)
        embeddings[split] = extract_embeddings(
            partition.dataset, patches, pack, work / "embeddings", split, device=device, batch_size=batch_size,
            workers=workers, progress=progress_for(f"{pack.name} {split}") if progress_for else None,
        )
        e = embeddings[split]
        rate = f", {e.computed / e.seconds:.1f} patches/s" if e.seconds > 0 else ""
        log(f"{pack.name} {split}: {len(patches)} embeddings ({e.computed} computed, "
            f"{len(patches) - e.computed} from the cache{rate})")
    return embeddings


@dataclass(frozen=True)
class ProbeOutcome:
    pack: ModelPack
    probe: ProbeResult
    metrics: dict
    record: dict  # what probe.json holds
    folder: Path
    classifier: ModelPack | None


def run_probe(dataset_root: Path, work: Path, pack: ModelPack, *, config: ProbeConfig = ProbeConfig(),
              bootstrap: int = 1000, save_pack: str | None = None, models_dir: Path | None = None,
              overwrite: bool = False, device: torch.device | None = None, batch_size: int = 64, workers: int = 4,
              log: Log = print, progress_for: ProgressFor | None = None,
              partition: Partition | None = None) -> ProbeOutcome:
    """Trains the probe on train, chooses its settings on val, scores it on test; optionally saves a pack."""
    from hepatoquant.bench.metrics import classification_metrics, confusion_matrix_table, plot_confusion_matrix

    partition = partition or work_partition(dataset_root, work, log)
    embeddings = run_extract(dataset_root, work, pack, device=device, batch_size=batch_size, workers=workers, log=log,
                             progress_for=progress_for, partition=partition)
    classes = partition.dataset.classes
    train, val, test = (embeddings[s] for s in SPLITS)
    probe = train_probe(train.vectors, train.labels, val.vectors, val.labels, len(classes), config)
    metrics = classification_metrics(test.labels, probe.predict(test.vectors), classes, bootstrap=bootstrap,
                                     seed=config.seed)
    folder = work / "probes" / pack.name
    folder.mkdir(parents=True, exist_ok=True)
    record = {"encoder": pack.encoder_name, "pack": pack.name, "classes": list(classes),
              "embedding_dim": int(train.vectors.shape[1]),
              "counts": {s: int(len(embeddings[s].labels)) for s in SPLITS},
              "extraction": {s: {"seconds": round(embeddings[s].seconds, 3), "computed": embeddings[s].computed}
                             for s in SPLITS},
              "probe": probe.record(config)}
    _write_json(folder / "probe.json", record)
    _write_json(folder / "metrics.json", metrics)
    (folder / "confusion.md").write_text(confusion_matrix_table(metrics) + "\n")
    plot_confusion_matrix(metrics, folder / "confusion.png", title=f"{pack.name}: test split")
    log(f"{pack.name}: test accuracy {metrics['accuracy']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f}, "
        f"macro F1 {metrics['f1_macro']:.3f} ({folder})")
    classifier = None
    if save_pack:
        dataset_name = partition.dataset.meta.get("name") or Path(dataset_root).name
        classifier = write_probe_pack(
            pack, probe.head_state(), name=save_pack, classes=classes, models_dir=models_dir, overwrite=overwrite,
            description=f"linear probe on {pack.name} ({pack.encoder_name}) trained on {dataset_name}; test macro F1 "
                        f"{metrics['f1_macro']:.3f}",
            extra={"dataset": dataset_name, **record, "test_metrics": {k: metrics[k] for k in (
                "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")}},
        )
        log(f"classifier pack {classifier.name!r} written to {classifier.path}; use it with "
            f"`hepatoquant analyze SLIDE --model {classifier.name}`")
    return ProbeOutcome(pack, probe, metrics, record, folder, classifier)


def run_compare(dataset_root: Path, work: Path, packs: Sequence[ModelPack], *, config: ProbeConfig = ProbeConfig(),
                bootstrap: int = 1000, device: torch.device | None = None, batch_size: int = 64, workers: int = 4,
                log: Log = print, progress_for: ProgressFor | None = None) -> dict[str, Path]:
    """Extract, probe and score each encoder; writes the leaderboard (Markdown, JSON, one plot per metric)."""
    from hepatoquant.bench.leaderboard import Entry, write_leaderboard

    if len({p.name for p in packs}) != len(packs):
        raise DatasetError("each --model may be given once")
    partition = work_partition(dataset_root, work, log)  # read once for every encoder
    entries = []
    for pack in packs:
        outcome = run_probe(dataset_root, work, pack, config=config, bootstrap=bootstrap, device=device,
                            batch_size=batch_size, workers=workers, log=log, progress_for=progress_for,
                            partition=partition)
        record = outcome.record
        entries.append(Entry(encoder=pack.encoder_name, pack=pack.name, embedding_dim=record["embedding_dim"],
                             metrics=outcome.metrics, extra={"probe": record["probe"]["chosen"],
                                                             "extraction": record["extraction"]}))
    name = partition.dataset.meta.get("name") or Path(dataset_root).name
    written = write_leaderboard(entries, work, title=f"Linear probes on {name}", dataset_name=name)
    log(f"leaderboard: {written['markdown']}")
    return written
