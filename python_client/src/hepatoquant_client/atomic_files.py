"""Replacing a file so that a reader never sees half of it: the one writer the client and the server share.

The new content goes into a temporary file beside the target (same folder, so the rename is atomic), is flushed
to disk, gets the mode a plain ``open()`` would have given it (temporary files are private), and is renamed onto
the target; on any failure the temporary file is removed and the error raised as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["new_file_mode", "replace_atomically"]


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
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder here: 0666 / 0777 less the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def replace_atomically(target: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Write ``target`` through ``write(temporary_path)`` and rename it into place (see the module's docstring)."""
    target = Path(target)
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
