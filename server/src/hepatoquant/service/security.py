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
)

__all__ = ["SlideAccessDeniedError", "UnauthenticatedError", "resolve_slide_reference", "check_bearer_token"]


def resolve_slide_reference(reference: str, roots: Sequence[Path]) -> Path:
    """The real path of ``reference`` (absolute path, path relative to the first root, or ``file:`` URI).

    Raises :class:`SlideAccessDeniedError` when it lies outside every root, :class:`SlideNotFoundError` when it
    does not exist inside one.
    """
    if not reference.strip():
        raise InvalidParameterError("the request names no slide: set `slide` to a path under a slide root")
    if not roots:
        raise SlideAccessDeniedError("this server has no slide roots configured: start it with --slide-root DIR")
    text = reference
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidParameterError(f"slide URI {reference!r} names a remote host; give a path under a slide root")
        text = unquote(parsed.path)
    candidate = Path(text)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve(strict=False)
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            if not resolved.is_file():
                raise SlideNotFoundError(
                    f"slide {reference!r} does not exist under the server's slide roots; check the path"
                    + (" (it is a directory)" if resolved.is_dir() else "")
                )
            return resolved
    raise SlideAccessDeniedError(
        f"slide {reference!r} is outside the server's slide roots; ask the server's operator which folders it "
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
