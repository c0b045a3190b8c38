"""Writing outputs so that a reader never sees them half-written and a failure leaves nothing behind.

One file: :func:`write_file_atomic` (on the client's ``replace_atomically``: the one file writer of the
project). Several files that belong together (a slide's outputs, a curation): :func:`staged_files`. Files and
folders get the modes a plain ``open`` / ``mkdir`` would give them under the umask (:func:`open_up_like_umask`).
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

__all__ = ["write_file_atomic", "new_file_mode", "open_up_like_umask", "staged_files"]


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
