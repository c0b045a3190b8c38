"""Issue 21: `hepatoquant bench fetch --to DIR` takes HepatoBench from the Hugging Face Hub (through huggingface_hub,
against the local stand-in for the hub in tests/fake_hub.py: no network), verifies the archives, lays the patches
out as `bench` reads them, and a given partition becomes the dataset's official split, on which `bench split` and
`bench compare` run. The archives are made by the test in the hub's published layout (01_TUM.zip ... 07_STE.zip
of PNGs named like 02_FIB_3355.png; that one is 0 bytes in the published archive)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fake_hub import FakeHub, hub_environment, serving
from safetensors.torch import save_file

from hepatoquant.bench.dataset import load_dataset
from hepatoquant.bench.fetch import ARCHIVES, HEPATOBENCH_REPO
from hepatoquant.bench.synthetic import write_synthetic_patch_dataset
from hepatoquant.cli import main
from hepatoquant.pack_import import add_model_pack


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], list[list[str]]]:
    """The seven archives as the hub serves them, and a partition by slide in bench's format (its relpaths are
    where fetch puts the patches: CODE/<archive member's file name>)."""
    source = write_synthetic_patch_dataset(tmp_path_factory.mktemp("source"), per_class=8, slides=6)
    slide_of = dict(csv.reader((source / "metadata.csv").open()))
    archives, partition = {}, [["relpath", "label", "split", "group"]]
    folder = tmp_path_factory.mktemp("archives")
    for code, name in ARCHIVES.items():
        number = name[:2]
        with zipfile.ZipFile(folder / name, "w") as archive:
            for index, png in enumerate(sorted((source / code).glob("*.png"))):
                member = f"{number}_{code}_{index}.png"
                archive.write(png, f"{number}_{code}/{member}" if code == "STE" else member)  # one in a folder
                slide = slide_of[f"{code}/{png.name}"]
                split = {"slide-00": "test", "slide-01": "val"}.get(slide, "train")
                partition.append([f"{code}/{member}", code, split, slide])
            if code == "FIB":
                archive.writestr("02_FIB_3355.png", b"")  # as published: an empty patch
                archive.writestr("__MACOSX/._02_FIB_0.png", b"\x00\x05\x16\x07")  # a Mac archiver's resource fork
        archives[name] = (folder / name).read_bytes()
    return archives, partition


@pytest.fixture()
def hub(published):
    FakeHub.files, FakeHub.gated, FakeHub.requests = {HEPATOBENCH_REPO: dict(published[0])}, set(), []
    with serving() as endpoint:
        yield endpoint


def _fetch(tmp_path: Path, endpoint: str, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hepatoquant.cli", "bench", "fetch", *args], capture_output=True,
                          text=True, env=hub_environment(tmp_path, endpoint, offline=offline), timeout=300)


def _write_partition(rows: list[list[str]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_fetch_lays_hepatobench_out_for_bench_and_the_cache_serves_it_offline(
        hub: str, published, tmp_path: Path, build_tiny_encoder) -> None:
    partition = _write_partition(published[1], tmp_path / "official-partition.csv")
    dataset = tmp_path / "HepatoBench"
    run = _fetch(tmp_path, hub, "--to", str(dataset), "--partition", str(partition))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "56 patches" in run.stdout and "1 left out" in run.stdout
    assert sorted(r.split()[1].split("/")[-1] for r in FakeHub.requests if r.startswith("GET")) == sorted(ARCHIVES.values())
    assert all(r.split()[1].startswith(f"/datasets/{HEPATOBENCH_REPO}/resolve/") for r in FakeHub.requests)
    loaded = load_dataset(dataset)
    assert loaded.counts() == {code: 8 for code in ARCHIVES} and loaded.notes == ()
    assert (dataset / "STE" / "07_STE_0.png").is_file() and not (dataset / "FIB" / "02_FIB_3355.png").exists()
    meta = json.loads((dataset / "dataset_meta.json").read_text())
    assert meta["source"]["repository"] == HEPATOBENCH_REPO and len(meta["source"]["archives_sha256"]) == 7
    assert meta["skipped"] == ["02_FIB.zip/02_FIB_3355.png: empty"]

    # bench runs on it with the official partition
    models = tmp_path / "models"
    weights = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_encoder("test_vit_micro").backbone.state_dict().items()},
              str(weights))
    add_model_pack(weights, encoder="test_vit_micro", name="micro", models_dir=models)
    work = tmp_path / "work"
    assert main(["bench", "split", str(dataset), "--work", str(work)]) == 0
    counts = json.loads((work / "split_counts.json").read_text())
    expected_test = sum(1 for row in published[1][1:] if row[2] == "test")
    assert sum(n for key, n in counts["test"].items() if key != "groups") == expected_test > 0
    assert main(["--models-dir", str(models), "bench", "compare", str(dataset), "--work", str(work), "--model",
                 "micro", "--method", "lbfgs", "--bootstrap", "20"]) == 0
    metrics = json.loads((work / "probes" / "micro" / "metrics.json").read_text())
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == expected_test

    # offline, from the hub's cache: no request reaches the hub
    FakeHub.requests.clear()
    again = _fetch(tmp_path, "http://127.0.0.1:9", "--to", str(tmp_path / "again"), offline=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert FakeHub.requests == [] and "no partition: the hub publishes none" in again.stdout
    assert load_dataset(tmp_path / "again").counts() == loaded.counts()


def test_a_damaged_download_a_missing_archive_and_a_wrong_partition_leave_nothing(
        hub: str, published, tmp_path: Path) -> None:
    dataset = tmp_path / "HepatoBench"
    wrong = _write_partition(published[1] + [["TUM/01_TUM_99.png", "TUM", "test", "slide-09"]], tmp_path / "p.csv")
    refused = _fetch(tmp_path, hub, "--to", str(dataset), "--partition", str(wrong))
    assert refused.returncode != 0 and "01_TUM_99.png" in refused.stderr and not dataset.exists()
    assert "Traceback" not in refused.stderr

    blob = next((tmp_path / "hub-cache").glob("datasets--xtxx--HepatoBench/snapshots/*/03_INF.zip")).resolve()
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")  # the cached file damaged
    damaged = _fetch(tmp_path, hub, "--to", str(dataset), offline=True)
    assert damaged.returncode != 0 and "03_INF.zip: SHA-256" in damaged.stderr and "fetch again" in damaged.stderr
    assert not dataset.exists() and not list(tmp_path.glob(".HepatoBench.*"))

    del FakeHub.files[HEPATOBENCH_REPO]["05_NOR.zip"]
    missing = _fetch(tmp_path / "fresh", hub, "--to", str(dataset))
    assert missing.returncode != 0 and "has no file '05_NOR.zip'" in missing.stderr and not dataset.exists()

    (dataset / "x").mkdir(parents=True)
    occupied = _fetch(tmp_path, hub, "--to", str(dataset))
    assert occupied.returncode != 0 and "is not an empty folder" in occupied.stderr
