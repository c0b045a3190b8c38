"""HepatoBench end to end: `hepatoquant bench curate | split | extract | probe | compare` on a generated dataset
with learnable classes (a probe must clearly beat chance) and on the 32 real H&E patches of ../shared/testdata
(colorectal classes: plumbing on real pixels, no accuracy claim); the probe's pack runs in `hepatoquant analyze`;
bad datasets, partitions and caches fail clearly."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from hepatoquant.bench.dataset import DatasetError, load_dataset, read_rgb
from hepatoquant.bench.extract import SHARD_SIZE, CacheMismatchError, extract_embeddings
from hepatoquant.bench.probe import ProbeConfig, train_probe
from hepatoquant.bench.split import make_partition, read_groups, read_partition, write_partition
from hepatoquant.bench.synthetic import write_synthetic_patch_dataset
from hepatoquant.cli import main
from hepatoquant.model_pack import file_sha256, load_model_pack
from hepatoquant.pack_import import add_model_pack

CRC_CLASSES = ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_patch_dataset(tmp_path_factory.mktemp("bench") / "patches", per_class=24, slides=12)


@pytest.fixture(scope="module")
def encoder_packs(tmp_path_factory: pytest.TempPathFactory, build_tiny_encoder) -> Path:
    """Two encoder packs (tiny ViTs with pixel-dependent embeddings) in a models folder of their own."""
    base = tmp_path_factory.mktemp("bench_models")
    for name, encoder in (("micro", "test_vit_micro"), ("micro-reg", "test_vit_micro_reg")):
        weights = base / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in build_tiny_encoder(encoder).backbone.state_dict().items()}, str(weights))
        add_model_pack(weights, encoder=encoder, name=name, models_dir=base / "models")
    return base / "models"


def _bench(*args: str, models: Path | None = None) -> int:
    return main([*(["--models-dir", str(models)] if models else []), "bench", *args])


def test_the_whole_protocol_on_generated_patches(generated: Path, encoder_packs: Path, tmp_path: Path,
                                                 synthetic_slide: Path, capsys) -> None:
    work = tmp_path / "work"
    assert _bench("curate", str(generated), "--work", str(work)) == 0
    report = json.loads((work / "curation" / "curation_report.json").read_text())
    assert sum(report["counts_after"].values()) == 7 * 24  # generated patches are distinct and of good quality

    assert _bench("split", str(generated), "--work", str(work), "--metadata", str(generated / "metadata.csv")) == 0
    counts = json.loads((work / "split_counts.json").read_text())
    assert sum(counts[s][c] for s in counts for c in counts[s] if c != "groups") == 7 * 24
    assert counts["train"]["groups"] > counts["val"]["groups"] >= counts["test"]["groups"] >= 1
    assert "| TUM |" in capsys.readouterr().out  # per-class counts per split, printed

    assert _bench("probe", str(generated), "--work", str(work), "--model", "micro", "--save-pack", "micro-probe",
                  "--bootstrap", "200", models=encoder_packs) == 0
    metrics = json.loads((work / "probes" / "micro" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5 and metrics["balanced_accuracy"] > 0.5  # chance is 1/7
    assert (work / "probes" / "micro" / "confusion.png").stat().st_size > 1000
    pack = load_model_pack(encoder_packs / "micro-probe")
    assert pack.kind == "classifier" and pack.model_status == "trained" and pack.classes == tuple(
        json.loads((generated / "dataset_meta.json").read_text())["classes"])
    assert pack.manifest["encoder"]["sha256"] == file_sha256(load_model_pack(encoder_packs / "micro").encoder_weights)

    out = tmp_path / "analysis"
    assert main(["--models-dir", str(encoder_packs), "analyze", str(synthetic_slide), "--model", "micro-probe",
                 "--out", str(out), "--device", "cpu"]) == 0
    analysis = json.loads((out / "synthetic.report.json").read_text())
    assert analysis["model_status"] == "trained" and analysis["tiles"]["count"] > 0

    assert _bench("compare", str(generated), "--work", str(work), "--model", "micro", "--model", "micro-reg",
                  "--bootstrap", "200", models=encoder_packs) == 0
    board = json.loads((work / "leaderboard.json").read_text())
    assert sorted(e["pack"] for e in board["entries"]) == ["micro", "micro-reg"]
    assert (work / "leaderboard.md").read_text().count("micro") >= 2
    assert list(work.glob("leaderboard_*.png"))


def test_the_protocol_runs_on_real_he_patches(testdata: Path, encoder_packs: Path, tmp_path: Path) -> None:
    """Real pixels through every step (colorectal classes: this checks plumbing, not liver accuracy)."""
    dataset = tmp_path / "crc"
    shutil.copytree(testdata / "patches" / "crc-val-he-7k", dataset)
    (dataset / "dataset_meta.json").write_text(json.dumps({"name": "crc-val-he-7k sample", "classes": CRC_CLASSES}))
    with (tmp_path / "metadata.csv").open("w", newline="") as handle:  # each patch its own slide (TCGA ids)
        writer = csv.writer(handle)
        writer.writerow(["relpath", "slide"])
        for png in sorted(dataset.rglob("*.png")):
            writer.writerow([png.relative_to(dataset).as_posix(), png.stem])
    work = tmp_path / "work"
    assert _bench("curate", str(dataset), "--work", str(work)) == 0
    assert _bench("split", str(dataset), "--work", str(work), "--metadata", str(tmp_path / "metadata.csv"),
                  "--ratios", "2:1:1") == 0  # 4 patches per class: 2 train, 1 val, 1 test
    assert _bench("compare", str(dataset), "--work", str(work), "--model", "micro", "--method", "lbfgs",
                  "--bootstrap", "100", models=encoder_packs) == 0
    metrics = json.loads((work / "probes" / "micro" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(CRC_CLASSES)
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == json.loads(
        (work / "split_counts.json").read_text())["test"]["groups"]  # one patch per slide here


def test_partition_is_by_slide_reproducible_and_checked(generated: Path, tmp_path: Path) -> None:
    dataset = load_dataset(generated)
    groups = read_groups(generated / "metadata.csv")
    first = make_partition(dataset, groups, seed=3)
    assert make_partition(dataset, groups, seed=3).split_of == first.split_of
    for slide in set(groups.values()):
        assert len({first.split_of[r] for r, g in groups.items() if g == slide}) == 1  # never split across
    path = write_partition(first, tmp_path / "split.csv")
    assert read_partition(path, dataset).split_of == first.split_of

    rows = list(csv.DictReader(path.open()))
    rows[0]["relpath"] = "TUM/missing.png"
    _write_rows(tmp_path / "missing.csv", rows)
    with pytest.raises(DatasetError, match="missing.png"):
        read_partition(tmp_path / "missing.csv", dataset)
    rows = list(csv.DictReader(path.open()))
    other = next(r for r in rows if r["group"] == rows[0]["group"] and r is not rows[0])
    other["split"] = next(s for s in ("train", "val", "test") if s != rows[0]["split"])
    _write_rows(tmp_path / "mixed.csv", rows)
    with pytest.raises(DatasetError, match="more than one split"):
        read_partition(tmp_path / "mixed.csv", dataset)
    with pytest.raises(DatasetError, match="at least 10"):
        make_partition(dataset, {r: "slide-" + str(i % 5) for i, r in enumerate(groups)})


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_bad_datasets_fail_clearly(tmp_path: Path) -> None:
    root = write_synthetic_patch_dataset(tmp_path / "d", classes=("TUM", "FIB"), per_class=2)
    (root / "XYZ").mkdir()
    with pytest.raises(DatasetError, match="XYZ are not classes"):
        load_dataset(root)
    (root / "XYZ").rmdir()
    shutil.rmtree(root / "FIB")
    with pytest.raises(DatasetError, match="FIB are missing"):
        load_dataset(root)
    grey = tmp_path / "grey.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(grey)
    with pytest.raises(DatasetError, match="not 8-bit RGB"):
        read_rgb(grey)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot be read"):
        read_rgb(broken)


def test_embedding_cache_resumes_and_refuses_another_encoder(generated: Path, encoder_packs: Path,
                                                             tmp_path: Path, build_tiny_encoder) -> None:
    dataset = load_dataset(generated)
    patches = list(dataset.patches)
    pack = load_model_pack(encoder_packs / "micro")
    cache = tmp_path / "cache"
    first = extract_embeddings(dataset, patches, pack, cache, "all", batch_size=16)
    assert first.computed == len(patches) and first.vectors.shape == (len(patches), 32)
    again = extract_embeddings(dataset, patches, pack, cache, "all")
    assert again.computed == 0 and again.seconds == 0 and np.array_equal(again.vectors, first.vectors)

    bigger = patches * 7  # more than one shard: drop the last and only it is recomputed
    full = extract_embeddings(dataset, bigger, pack, tmp_path / "cache2", "all", batch_size=64)
    last = sorted((tmp_path / "cache2" / "micro" / "all").glob("shard-*.npy"))[-1]
    last.unlink()
    resumed = extract_embeddings(dataset, bigger, pack, tmp_path / "cache2", "all", batch_size=64)
    assert resumed.computed == len(bigger) - SHARD_SIZE and np.allclose(resumed.vectors, full.vectors, atol=1e-5)

    weights = tmp_path / "other.safetensors"  # same pack name, other weights: the cache must not be reused
    save_file({k: v.contiguous() for k, v in build_tiny_encoder("test_vit_micro", seed=1).backbone.state_dict().items()},
              str(weights))
    other = add_model_pack(weights, encoder="test_vit_micro", name="micro", models_dir=tmp_path / "models")
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        extract_embeddings(dataset, patches, other, cache, "all")
    with pytest.raises(CacheMismatchError, match="patch_list_sha256"):
        extract_embeddings(dataset, patches[:-1], pack, cache, "all")


def test_probe_learns_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 16))
    def sample(n):
        y = rng.integers(0, 4, n)
        return (centres[y] + rng.normal(0, 1, (n, 16))).astype(np.float32) * 50 + 7, y
    (tx, ty), (vx, vy), (sx, sy) = sample(400), sample(100), sample(200)
    for method in ("adamw", "lbfgs"):
        config = ProbeConfig(method=method)
        result = train_probe(tx, ty, vx, vy, 4, config)
        assert (result.predict(sx) == sy).mean() > 0.9  # raw (unstandardised) inputs: the folding is right
        again = train_probe(tx, ty, vx, vy, 4, config)
        assert np.array_equal(again.weight, result.weight) and again.chosen == result.chosen
        assert len(result.trials) == (4 if method == "adamw" else 3)
    with pytest.raises(ValueError, match="NaN"):
        train_probe(np.full((4, 2), np.nan, np.float32), np.zeros(4, int), vx[:, :2], vy, 4)
