"""Issue 20: a pack's weights are hashed once while the file is unchanged (a UNI backbone is 1.2 GB: 2-4 s of
reading on every segmenter load); any change to the file is hashed again, so a swapped backbone is still caught."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from hepatoquant import weights_digest
from hepatoquant.errors import WeightsMismatchError
from hepatoquant.model_pack import file_sha256
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack, load_segmenter


@pytest.fixture()
def hashed(monkeypatch) -> list[Path]:
    """Every file actually read to hash it."""
    calls: list[Path] = []
    real = weights_digest.file_sha256
    monkeypatch.setattr(weights_digest, "file_sha256", lambda path: (calls.append(Path(path)), real(path))[1])
    return calls


def test_a_file_is_hashed_once_while_unchanged_and_again_after_any_write(tmp_path: Path, hashed) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a" * 4096)
    assert weights_digest.weights_sha256(weights) == file_sha256(weights)
    assert weights_digest.weights_sha256(weights) == file_sha256(weights)
    assert len(hashed) == 1
    before = weights.stat()
    weights.write_bytes(b"b" * 4096)  # same size, and the modification time set back: the change time moves
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights_digest.weights_sha256(weights) == file_sha256(weights) != "a"
    assert len(hashed) == 2


def test_a_damaged_or_unwritable_cache_costs_only_the_hashing(tmp_path: Path, hashed, monkeypatch, caplog) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"c" * 1024)
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(cache))
    cache.mkdir()
    (cache / "weights-sha256.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert weights_digest.weights_sha256(weights) == file_sha256(weights)
    assert "cannot be read" in caplog.text
    assert weights_digest.weights_sha256(weights) == file_sha256(weights) and len(hashed) == 1  # replaced, used
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(blocked / "cache"))  # a folder under a file: cannot be made
    with caplog.at_level(logging.WARNING):
        assert weights_digest.weights_sha256(weights) == file_sha256(weights)
    assert "cannot be written" in caplog.text and "HEPATOQUANT_CACHE_DIR" in caplog.text


def test_a_segmenter_pack_loads_again_without_reading_its_backbone_and_a_swapped_one_is_refused(
        tmp_path: Path, hashed) -> None:
    pack = ensure_demo_segmentation_pack(tmp_path / "models")
    load_segmenter(pack, torch.device("cpu"))
    load_segmenter(pack, torch.device("cpu"))
    assert hashed.count(pack.encoder_weights.resolve()) == 1  # read once, at the first load
    data = bytearray(pack.encoder_weights.read_bytes())
    data[-1] ^= 0xFF
    pack.encoder_weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match="SHA-256"):
        load_segmenter(pack, torch.device("cpu"))
