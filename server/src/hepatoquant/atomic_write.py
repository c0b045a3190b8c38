"""Writing outputs so that a reader never sees them half-written and a failure leaves nothing behind.

One file: :func:`write_file_atomic` (on the client's ``replace_atomically``: the one file writer of the
project). Several files that belong together in a folder others also write to (a slide's outputs, a curation):
:func:`staged_files`. A whole folder (a model pack, a job's results, a cohort slide's outputs):
:func:`staged_folder`. Files and folders get the modes a plain ``open`` / ``mkdir`` would give them under the
umask (:func:`open_up_like_umask`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from hepatoquant_client.atomic_files import new_file_mode, replace_atomically

from hepatoquant.errors import OutputWriteError

__all__ = ["write_file_atomic", "new_file_mode", "open_up_like_umask", "staged_files", "staged_folder"]


def open_up_like_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would have given them
    (``mkdtemp`` and some writers, safetensors among them, create private files; a models folder is shared
    with a server account)."""
    folder.chmod(new_file_mode(directory=True))
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), new_file_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(root, name), new_file_mode())


def write_file_atomic(path: Path, write: Callable[[IO[bytes]], object], *, what: str) -> None:
    """Write ``path`` through ``write(handle)``, atomically; the parent folder is created. A failure leaves
    nothing and raises :class:`OutputWriteError` naming ``what`` and the path."""

    def through_handle(temporary: Path) -> None:
        with temporary.open("wb") as handle:
            write(handle)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, through_handle)
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the {what} {str(path)!r} ({exc}); check that the folder is writable and the disk "
            "has space, or choose another output folder"
        ) from exc


@contextlib.contextmanager
def staged_files(out_dir: Path, names: Iterable[str], *, prefix: str) -> Iterator[Path]:
    """A private folder inside ``out_dir`` (created if needed) to write the files ``names`` into. When the block
    ends without an error each is renamed into ``out_dir`` (a reader finds the old files or the new ones, never
    half-written ones); the folder is removed either way, so a failure leaves nothing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        yield staging
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(dest: Path, *, replace: bool = False) -> Iterator[Path]:
    """A new folder beside ``dest`` to fill; when the block ends without an error it gets the umask's modes and
    is renamed to ``dest`` (a reader finds the old folder or the new one, never half of one). With ``replace`` an
    existing ``dest`` is swapped out only then, and put back if the rename fails; without it an existing
    non-empty ``dest`` makes the rename fail (``OSError``). Any failure removes the new folder and is raised."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    old = dest.parent / f"{staging.name}.old"
    try:
        yield staging
        open_up_like_umask(staging)  # mkdtemp (and safetensors) make private files; results are shared
        if replace and dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
