"""What a request may touch: slides only under the configured roots, and the bearer token.

Paths are resolved (symlinks followed, ``..`` collapsed) before the check, so a link or a relative path cannot
escape a root. Error messages repeat only what the caller sent, never a resolved path outside the roots.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from hepatoquant.errors import (
    InvalidParameterError,
    SlideAccessDeniedError,
    SlideNotFoundError,
    UnauthenticatedError,
    shown,
)

__all__ = ["SlideAccessDeniedError", "UnauthenticatedError", "check_bearer_token", "resolve_slide_reference"]


# Longest slide reference taken (Linux's PATH_MAX) and longest file or folder name in it (NAME_MAX): longer
# ones cannot name a file, and the operating system's own error for them would name the server's paths.
MAX_REFERENCE_CHARS = 4096
MAX_NAME_BYTES = 255


def _check_reference(reference: str) -> None:
    if not reference.strip():
        raise InvalidParameterError("the request names no slide: set `slide` to a path under a slide root")
    if len(reference) > MAX_REFERENCE_CHARS:
        raise InvalidParameterError(
            f"slide {shown(reference)} is longer than {MAX_REFERENCE_CHARS} characters; give a path under a slide root"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in reference):
        raise InvalidParameterError(
            f"slide {shown(reference)} contains a control character (NUL, newline, ...); no slide file is named so"
        )
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in reference.split("/")):
        raise InvalidParameterError(
            f"slide {shown(reference)} has a file or folder name longer than {MAX_NAME_BYTES} bytes; no slide file "
            "is named so"
        )


def resolve_slide_reference(reference: str, roots: Sequence[Path]) -> Path:
    """The real path of ``reference`` (absolute path, path relative to the first root, or ``file:`` URI).

    Raises :class:`InvalidParameterError` for a reference no file can have (empty, control characters, too
    long), :class:`SlideAccessDeniedError` when it lies outside every root, :class:`SlideNotFoundError` when it
    does not exist inside one.
    """
    _check_reference(reference)
    if not roots:
        raise SlideAccessDeniedError("this server has no slide roots configured: start it with --slide-root DIR")
    text = reference
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidParameterError(f"slide URI {shown(reference)} names a remote host; give a path under a slide root")
        text = unquote(parsed.path)
        _check_reference(text)  # %00 and the like, decoded
    candidate = Path(text)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve(strict=False)
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            if not resolved.is_file():
                raise SlideNotFoundError(
                    f"slide {shown(reference)} does not exist under the server's slide roots; check the path"
                    + (" (it is a directory)" if resolved.is_dir() else "")
                )
            return resolved
    raise SlideAccessDeniedError(
        f"slide {shown(reference)} is outside the server's slide roots; ask the server's operator which folders it "
        "serves (GetServerInfo lists them) and give a path under one of them"
    )


def check_bearer_token(authorization: str | None, expected_token: str | None) -> None:
    """Nothing when no token is configured or ``authorization`` is ``Bearer <token>``; else raise."""
    if expected_token is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected_token.encode()):
        raise UnauthenticatedError(
            "missing or wrong bearer token: send the header `authorization: Bearer <token>` with the server's token"
        )
