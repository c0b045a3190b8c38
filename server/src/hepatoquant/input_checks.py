"""Checks of paths and numbers that every entry point runs before it loads anything heavy.

A mistyped slide path, a pixel size of 0 or an output folder that cannot be written must fail in well under a
second, before torch, timm, peft or OpenSlide are imported and long before a slide is analysed; so this module
imports nothing but the standard library and our errors. Each message names the input and the fix.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from hepatoquant.errors import InvalidParameterError, OutputWriteError, SlideNotFoundError

__all__ = [
    "MPP_RANGE_UM_PX",
    "validate_mpp",
    "require_slide_file",
    "require_input_file",
    "require_folder",
    "require_writable_folder",
    "require_positive",
]

# Pixel sizes outside this range are not microscope scans at any usual magnification (1.25x to 100x+).
MPP_RANGE_UM_PX = (0.05, 20.0)


def validate_mpp(mpp_um_px: float, *, what: str) -> float:
    """Return ``mpp_um_px`` if it is a plausible microscope pixel size, else raise naming ``what``."""
    low, high = MPP_RANGE_UM_PX
    if not (isinstance(mpp_um_px, (int, float)) and math.isfinite(mpp_um_px) and low <= mpp_um_px <= high):
        raise InvalidParameterError(
            f"{what} = {mpp_um_px!r} um/px is outside the plausible range {low}..{high} um/px; "
            "give the slide's pixel size in micrometres per pixel (about 0.25 at 40x, 0.5 at 20x)"
        )
    return float(mpp_um_px)


def require_slide_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if it is an existing file; else :class:`SlideNotFoundError` saying what to fix."""
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"slide {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise SlideNotFoundError(f"slide {str(path)!r} is a directory, not a slide file; give the file itself")
    return path


def require_input_file(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` if it is an existing, readable file; ``what`` names it in the message (e.g. ``--regions``)."""
    path = Path(path)
    if not path.exists():
        raise InvalidParameterError(f"{what} {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise InvalidParameterError(f"{what} {str(path)!r} is a directory; give the file itself")
    if not os.access(path, os.R_OK):
        raise InvalidParameterError(f"{what} {str(path)!r} cannot be read (permissions); make it readable")
    return path


def require_folder(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` if it is an existing folder."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise InvalidParameterError(f"{what} {str(path)!r} {state}; check the path")
    return path


def require_writable_folder(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` if it is a folder this process can create files in, or can create. Tried for real (an empty
    folder made and removed at once in ``path`` or its nearest existing parent): permission bits do not tell a
    read-only mount, a full quota or a file system refusing root, and a refused run must leave no trace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputWriteError(f"{what} {str(path)!r} is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputWriteError(
            f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file; choose another folder"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hepatoquant-write-check-", dir=existing))
    except OSError as exc:
        where = "" if existing == path else f" (in {str(existing)!r}, its nearest existing folder)"
        raise OutputWriteError(
            f"{what} {str(path)!r} cannot be written{where}: {exc.strerror or exc}; choose a folder you can "
            "write to, or fix its permissions"
        ) from None
    return path


def require_positive(value: float | None, *, what: str, integer: bool = False) -> None:
    """An explicitly given number must be > 0 (and finite); ``None`` means "not given" and passes. Zero is
    refused, never read as "use the default"."""
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (integer and value != int(value)):
        kind = "a whole number" if integer else "a number"
        raise InvalidParameterError(f"{what} {value!r} must be {kind} above 0 (leave it out to use the default)")
