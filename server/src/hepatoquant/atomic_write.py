"""Writing one output file so that a reader never sees it half-written and a failure leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hepatoquant.errors import OutputWriteError

__all__ = ["write_file_atomic"]


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
            os.chmod(handle.name, 0o644)  # NamedTemporaryFile is private; results are shared like any output
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the {what} {str(path)!r} ({exc}); check that the folder is writable and the disk "
            "has space, or choose another output folder"
        ) from exc
