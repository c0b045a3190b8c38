"""Exceptions shared by the client and the server.

Each is both ours and the matching builtin (``class X(HepatoQuantError, ValueError)``) so that callers can
catch either; every message names the bad input and what to do about it.
"""

from __future__ import annotations

__all__ = ["HepatoQuantError", "InvalidGeoJSONError"]


class HepatoQuantError(Exception):
    """Base of every error HepatoQuant raises on purpose."""


class InvalidGeoJSONError(HepatoQuantError, ValueError):
    """A GeoJSON input (file or bytes) that cannot be read as QuPath objects, or an object that QuPath would
    reject on import."""
