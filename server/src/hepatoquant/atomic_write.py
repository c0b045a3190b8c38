"""Writing one output file so that a reader never sees it half-written and a failure leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hepatoquant.errors import OutputWriteError

__all__ = ["write_file_atomic", "new_file_mode", "open_up_like_umask"]


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(*, directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder here: 0666 / 0777 less the umask.
    Temporary files and folders are made private (0600 / 0700); what is renamed into place gets this."""
    return (0o777 if directory else 0o666) & ~_umask()


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
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, then rename it into place.

    The parent folder is created; a failure removes the temporary file and raises :class:`OutputWriteError`
    naming ``what`` and the path.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
            "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
        try:
            with handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(handle.name, new_file_mode())  # NamedTemporaryFile is private; results are shared
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the {what} {str(path)!r} ({exc}); check that the folder is writable and the disk "
            "has space, or choose another output folder"
        ) from exc
