"""The one writer for files and folders (issue 18): a reader finds the old content or the new, never half; a
failure leaves nothing behind and puts back what was there; new files get the umask's modes, not mkdtemp's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hepatoquant.atomic_write import staged_folder, write_file_atomic
from hepatoquant.errors import OutputWriteError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_staged_folder_appears_whole_with_the_modes_of_mkdir(tmp_path: Path) -> None:
    dest = tmp_path / "pack"
    with staged_folder(dest) as staging:
        (staging / "a.bin").write_bytes(b"1")
        assert not dest.exists()  # nothing visible until the block ends
    assert (dest / "a.bin").read_bytes() == b"1"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(dest) == 0o777 & ~umask and _mode(dest / "a.bin") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_a_failure_inside_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="model broke"):
        with staged_folder(dest, replace=True) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("model broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert [p.name for p in dest.iterdir()] == ["old.txt"]


def test_replace_swaps_the_old_folder_out_only_when_the_new_one_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "slide"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with staged_folder(dest, replace=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide"]  # the old one is gone, no leftovers


def test_without_replace_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "job"
    dest.mkdir()
    (dest / "kept.txt").write_text("kept")
    with pytest.raises(OSError):
        with staged_folder(dest) as staging:
            (staging / "other.txt").write_text("other")
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_a_file_written_atomically_keeps_the_old_content_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "table.json"
    target.write_text("old")

    def broken(handle) -> None:
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputWriteError, match="table.json.*No space left"):
        write_file_atomic(target, broken, what="table")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.json"]
