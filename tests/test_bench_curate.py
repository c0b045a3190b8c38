"""HepatoBench curation: each kind of bad patch is found for the right reason, good ones (synthetic and the team's
32 real H&E patches) are all kept, the outputs are right, the dataset is never touched, and the banded LSH misses
no pair that brute force finds."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hepatoquant.bench.curate import (
    CLEAN_INDEX_NAME,
    REMOVED_NAME,
    REPORT_NAME,
    CurationConfig,
    HammingIndex,
    curate,
)
from hepatoquant.bench.dataset import DatasetError, load_dataset, read_index
from hepatoquant.errors import InvalidParameterError, OutputWriteError

CLASSES = ["FIB", "NOR", "TUM"]
REAL_CLASSES = ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
SIZE_PX = 128


def he_like(rng: np.random.Generator) -> np.ndarray:
    """A textured pink/purple patch: a random smooth eosin field, scattered dark nuclei, fine noise; distinct
    patches get unrelated low frequencies and hence unrelated pHashes."""
    field = cv2.resize(rng.random((6, 6)), (SIZE_PX, SIZE_PX), interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None]
    image = np.array([236.0, 160, 205]) * (1 - field) + np.array([190.0, 95, 165]) * field
    for _ in range(int(rng.integers(20, 40))):
        centre = (int(rng.integers(0, SIZE_PX)), int(rng.integers(0, SIZE_PX)))
        cv2.circle(image, centre, int(rng.integers(3, 7)), (95.0, 50.0, 140.0), -1)
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def save(root: Path, relpath: str, rgb: np.ndarray, **kwargs: object) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kwargs)
    return path


def make_dataset(root: Path, classes: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_meta.json").write_text(json.dumps({"classes": classes}))
    for label in classes:
        (root / label).mkdir(exist_ok=True)
    return root


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, list[str], dict[str, tuple[str, str]]]:
    """A dataset with 5 good patches per class and one patch of each problem; returns the root, the good
    relpaths, and for each bad relpath its expected (reason kind, reason text start)."""
    rng = np.random.default_rng(7)
    root = make_dataset(tmp_path / "ds", CLASSES)
    good = []
    for label in CLASSES:
        for i in range(5):
            good.append(save(root, f"{label}/{label.lower()}{i}.png", he_like(rng)).relative_to(root).as_posix())
    source = np.asarray(Image.open(root / "FIB/fib0.png"))
    shutil.copyfile(root / "NOR/nor1.png", root / "NOR/nor1_copy.png")
    save(root, "FIB/fib0_reencoded.jpg", source, quality=90)
    brighter = (source.astype(np.int16) + 6 + rng.integers(-2, 3, source.shape)).clip(0, 255).astype(np.uint8)
    save(root, "TUM/tum_from_fib0.png", brighter)
    save(root, "NOR/nor_blurred.png", cv2.GaussianBlur(he_like(rng), (0, 0), 4))
    blank = (245 + rng.normal(0, 3, (SIZE_PX, SIZE_PX, 3))).clip(0, 255).astype(np.uint8)
    blank[:20, :20] = he_like(rng)[:20, :20]
    save(root, "NOR/nor_blank.png", blank)
    green = np.zeros((SIZE_PX, SIZE_PX, 3), np.uint8)
    green[..., 1] = rng.integers(120, 256, (SIZE_PX, SIZE_PX))
    save(root, "TUM/tum_green.png", green)
    (root / "TUM/tum_broken.png").write_bytes(b"\x89PNG not really" + bytes(range(200)))
    save(root, "FIB/fib_grey.png", he_like(rng)[..., 0])
    expected = {
        "NOR/nor1_copy.png": ("duplicate", "duplicate of NOR/nor1.png"),
        "FIB/fib0_reencoded.jpg": ("near_duplicate", "near-duplicate of FIB/fib0.png (distance "),
        "TUM/tum_from_fib0.png": ("near_duplicate", "near-duplicate of FIB/fib0.png (distance "),
        "NOR/nor_blurred.png": ("blurred", "blurred (laplacian variance "),
        "NOR/nor_blank.png": ("background", "mostly background ("),
        "TUM/tum_green.png": ("colour", "extreme colour ("),
        "TUM/tum_broken.png": ("unreadable", "unreadable: cannot be decoded as an image"),
        "FIB/fib_grey.png": ("unreadable", "unreadable: image mode is L, not 8-bit RGB"),
    }
    return root, good, expected


def test_each_problem_is_removed_for_its_reason_and_good_patches_are_kept(messy) -> None:
    root, good, expected = messy
    result = curate(root, workers=3)
    removed = {r.patch.relpath: r for r in result.removed}
    assert set(removed) == set(expected)
    for relpath, (kind, start) in expected.items():
        assert removed[relpath].kinds == (kind,), (relpath, removed[relpath].reasons)
        assert removed[relpath].reasons[0].text.startswith(start), removed[relpath].reasons[0].text
    assert sorted(p.relpath for p in result.kept) == sorted(good)
    cross = removed["TUM/tum_from_fib0.png"].reasons[0].text
    assert "TUM" in cross and "FIB" in cross and "cross-class" in cross
    assert "cross-class" not in removed["FIB/fib0_reencoded.jpg"].reasons[0].text
    [conflict] = result.label_conflicts
    assert (conflict.relpath, conflict.kept_relpath, conflict.label, conflict.kept_label) == \
        ("TUM/tum_from_fib0.png", "FIB/fib0.png", "TUM", "FIB")
    assert result.removed_by_kind() == {"unreadable": 2, "duplicate": 1, "near_duplicate": 2, "blurred": 1,
                                        "background": 1, "colour": 1}


def test_the_first_in_relpath_order_is_kept_and_a_blurred_copy_does_not_displace_the_sharp_one(tmp_path) -> None:
    rng = np.random.default_rng(3)
    root = make_dataset(tmp_path / "ds", ["NOR"])
    sharp = he_like(rng)
    save(root, "NOR/a_blurred.png", cv2.GaussianBlur(sharp, (0, 0), 1.5))  # first in order, fails quality
    save(root, "NOR/b_sharp.png", sharp)
    save(root, "NOR/c_sharp_again.png", (sharp.astype(np.int16) + 3).clip(0, 255).astype(np.uint8))
    twin = cv2.GaussianBlur(he_like(rng), (0, 0), 4)  # two removed patches are never "near-duplicates" of each other
    save(root, "NOR/d_blurred_twin.png", twin)
    save(root, "NOR/e_blurred_twin.png", (twin.astype(np.int16) + 3).clip(0, 255).astype(np.uint8))
    for i in range(3):
        save(root, f"NOR/other{i}.png", he_like(rng))
    result = curate(root, CurationConfig(blur_min_laplacian_var=150), workers=2)
    removed = {r.patch.relpath: [x.text for x in r.reasons] for r in result.removed}
    assert set(removed) == {"NOR/a_blurred.png", "NOR/c_sharp_again.png", "NOR/d_blurred_twin.png",
                            "NOR/e_blurred_twin.png"}
    assert [len(removed[f"NOR/{name}_blurred_twin.png"]) for name in "de"] == [1, 1]
    assert removed["NOR/c_sharp_again.png"][0].startswith("near-duplicate of NOR/b_sharp.png (distance ")
    assert removed["NOR/a_blurred.png"][0].startswith("blurred (laplacian variance ")
    assert removed["NOR/a_blurred.png"][1].startswith("near-duplicate of NOR/b_sharp.png (distance ")


def test_duplicate_bytes_across_classes_name_both_labels_and_share_quality_reasons(tmp_path) -> None:
    rng = np.random.default_rng(5)
    root = make_dataset(tmp_path / "ds", CLASSES)
    for label in CLASSES:
        save(root, f"{label}/{label.lower()}.png", he_like(rng))
    save(root, "FIB/blurred.png", cv2.GaussianBlur(he_like(rng), (0, 0), 4))
    shutil.copyfile(root / "FIB/blurred.png", root / "TUM/blurred_copy.png")
    removed = {r.patch.relpath: [x.text for x in r.reasons] for r in curate(root).removed}
    assert removed["TUM/blurred_copy.png"][0] == \
        "duplicate of FIB/blurred.png; cross-class: labelled TUM here, FIB there"
    assert removed["TUM/blurred_copy.png"][1].startswith("blurred")
    assert set(removed) == {"FIB/blurred.png", "TUM/blurred_copy.png"}


@pytest.fixture
def real_patches(testdata: Path, tmp_path: Path) -> Path:
    source = testdata / "patches" / "crc-val-he-7k"
    if not source.is_dir():
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"the real H&E patches {source} are absent")
    root = tmp_path / "crc"
    shutil.copytree(source, root)
    (root / "dataset_meta.json").write_text(json.dumps({"classes": REAL_CLASSES}))
    return root


def test_real_he_patches_are_all_kept_with_the_defaults(real_patches: Path) -> None:
    result = curate(real_patches)
    assert len(result.dataset.patches) == 32
    assert result.removed == ()
    assert result.counts_after() == {c: 4 for c in REAL_CLASSES}
    # the margins the defaults are documented with
    config = CurationConfig()
    measured = [m.stats for m in result.measurements.values() if m.stats is not None]
    assert len(measured) == 32
    assert min(m.laplacian_var for m in measured) > 5 * config.blur_min_laplacian_var
    assert max(m.background_fraction for m in measured) < config.background_max_fraction - 0.1
    assert result.colour_reference["limit_delta_e"] > 100


def test_copies_and_damage_of_real_patches_are_found(real_patches: Path) -> None:
    rgb = np.asarray(Image.open(real_patches / "TUM/TUM-TCGA-GALLTCWV.png"))
    save(real_patches, "TUM/TUM-zz-reencoded.jpg", rgb, quality=85)
    save(real_patches, "STR/STR-zz-blurred.png", cv2.GaussianBlur(np.asarray(Image.open(
        real_patches / "STR/STR-TCGA-QRKEEQKW.png")), (0, 0), 3))
    removed = {r.patch.relpath: r.kinds for r in curate(real_patches).removed}
    assert removed == {"TUM/TUM-zz-reencoded.jpg": ("near_duplicate",),
                       "STR/STR-zz-blurred.png": ("blurred", "near_duplicate")}


def test_outputs_match_the_result_and_the_dataset_is_untouched(messy, tmp_path: Path) -> None:
    root, good, expected = messy

    def listing() -> dict[str, tuple[int, int, str]]:
        return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                                 hashlib.md5(p.read_bytes()).hexdigest())
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = listing()
    result = curate(root)
    paths = result.write(tmp_path / "out")
    assert listing() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([CLEAN_INDEX_NAME, REMOVED_NAME, REPORT_NAME])

    clean = read_index(paths["clean_index"], load_dataset(root))
    assert clean.patches == result.kept and len(clean.patches) == len(good)
    with paths["removed"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["relpath"] for r in rows} == set(expected)
    assert {(r["relpath"], r["label"]) for r in rows} == {(p, p.split("/")[0]) for p in expected}
    assert all(r["reason"] for r in rows)

    report = json.loads(paths["report"].read_text())
    assert report["patches"] == {"before": len(good) + len(expected), "kept": len(good), "removed": len(expected)}
    assert report["counts_after"] == {"FIB": 5, "NOR": 5, "TUM": 5}
    assert report["counts_before"] == {"FIB": 7, "NOR": 8, "TUM": 8}
    assert report["removed_by_kind"]["unreadable"] == 2
    assert report["config"] == CurationConfig().to_dict()
    assert report["dataset_root"] == str(root.resolve())
    assert report["created_by"].startswith("hepatoquant ")


def test_a_failed_write_leaves_nothing_behind(messy, tmp_path: Path, monkeypatch) -> None:
    result = curate(messy[0])
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hepatoquant.bench.curate.json.dumps", full_disk)
    with pytest.raises(OutputWriteError, match="No space left"):
        result.write(out)
    assert list(out.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.undo()
    with pytest.raises(OutputWriteError, match="a_file"):
        result.write(blocker)


def test_workers_and_progress_do_not_change_the_result(messy) -> None:
    calls: list[tuple[int, int]] = []
    one = curate(messy[0], workers=1)
    many = curate(messy[0], workers=6, progress=lambda done, total: calls.append((done, total)))
    assert one.kept == many.kept and one.removed == many.removed
    total = len(one.dataset.patches)
    assert calls[0] == (0, total) and calls[-1] == (total, total) and len(calls) == total + 1
    with pytest.raises(InvalidParameterError, match="workers"):
        curate(messy[0], workers=0)


def test_a_folder_that_is_not_a_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        curate(tmp_path / "nowhere")
    root = make_dataset(tmp_path / "empty", CLASSES)
    with pytest.raises(DatasetError, match="no images"):
        curate(root)


def test_config_from_json(tmp_path: Path) -> None:
    path = tmp_path / "curation.json"
    path.write_text(json.dumps({"blur_min_laplacian_var": 50, "colour_max_mad": None}))
    config = CurationConfig.from_json(path)
    assert config.blur_min_laplacian_var == 50.0 and config.colour_max_mad is None
    assert config.near_duplicate_max_distance_bits == 4

    path.write_text(json.dumps({"blur_threshold": 50}))
    with pytest.raises(InvalidParameterError) as caught:
        CurationConfig.from_json(path)
    message = str(caught.value)
    assert "'blur_threshold'" in message and str(path) in message
    assert all(name in message for name in CurationConfig().to_dict())

    for bad, field in [({"near_duplicate_max_distance_bits": 64}, "near_duplicate_max_distance_bits"),
                       ({"background_max_fraction": 1.5}, "background_max_fraction"),
                       ({"blur_min_laplacian_var": "high"}, "blur_min_laplacian_var"),
                       ({"phash_size": True}, "phash_size")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidParameterError, match=field):
            CurationConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(InvalidParameterError, match="JSON object"):
        CurationConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(InvalidParameterError, match="not valid JSON"):
        CurationConfig.from_json(path)


def test_filters_can_be_turned_off(messy) -> None:
    config = CurationConfig(near_duplicate_max_distance_bits=None, blur_min_laplacian_var=0,
                            background_max_fraction=1.0, colour_max_mad=None)
    kinds = {kind for r in curate(messy[0], config).removed for kind in r.kinds}
    assert kinds == {"duplicate", "unreadable"}


@pytest.mark.parametrize(("nbits", "max_distance"), [(64, 0), (64, 1), (64, 4), (64, 9), (25, 3)])
def test_hamming_index_finds_every_pair_brute_force_finds(nbits: int, max_distance: int) -> None:
    rand = random.Random(1234 + nbits * 100 + max_distance)
    hashes = [rand.getrandbits(nbits) for _ in range(150)]
    for base in list(hashes[:100]):  # plant neighbours at, just past and well past the threshold
        for flips in (0, 1, max_distance, max_distance + 1, max_distance + 2):
            value = base
            for bit in rand.sample(range(nbits), min(flips, nbits)):
                value ^= 1 << bit
            hashes.append(value)
    index = HammingIndex(nbits, max_distance)
    for i, value in enumerate(hashes):
        index.add(value, i)
    found_pairs = 0
    for value in hashes:
        brute = sorted(((value ^ other).bit_count(), j) for j, other in enumerate(hashes)
                       if (value ^ other).bit_count() <= max_distance)
        assert index.query(value) == brute
        found_pairs += len(brute) - 1
    assert found_pairs >= 200  # each base and its unchanged copy, both ways: the planted pairs were found


def test_hamming_index_rejects_impossible_settings() -> None:
    with pytest.raises(InvalidParameterError, match="max_distance"):
        HammingIndex(64, 64)
    with pytest.raises(InvalidParameterError, match="64 bits"):
        HammingIndex(64, 4).add(1 << 64, "x")


def test_jpeg_reencoding_moves_the_phash_by_at_most_a_few_bits() -> None:
    """The premise of the default threshold, checked on our synthetic texture."""
    import imagehash

    rgb = he_like(np.random.default_rng(11))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=75)
    reencoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert imagehash.phash(Image.fromarray(rgb)) - imagehash.phash(reencoded) <= 2


def test_truncated_and_rgba_files_are_recorded_not_fatal(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    root = make_dataset(tmp_path / "ds", ["NOR"])
    for i in range(3):
        save(root, f"NOR/n{i}.png", he_like(rng))
    whole = (root / "NOR/n0.png").read_bytes()
    (root / "NOR/truncated.png").write_bytes(whole[: len(whole) // 2])
    save(root, "NOR/rgba.png", np.dstack([he_like(rng), np.full((SIZE_PX, SIZE_PX, 1), 255, np.uint8)]))
    removed = {r.patch.relpath: [x.text for x in r.reasons] for r in curate(root).removed}
    assert removed == {"NOR/truncated.png": ["unreadable: cannot be decoded as an image (image file is truncated)"],
                       "NOR/rgba.png": ["unreadable: image mode is RGBA, not 8-bit RGB; convert it to RGB"]}
