"""Exceptions: those shared by the client and the server, and the client's errors for failed calls.

Each is both ours and the matching builtin (``class X(HepatoQuantError, ValueError)``) so that callers can
catch either; every message names the bad input and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "HepatoQuantClientError",
    "HepatoQuantError",
    "InvalidArgumentError",
    "InvalidGeoJSONError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReportFormatError",
    "ServerUnavailableError",
    "UnauthenticatedError",
]


class HepatoQuantError(Exception):
    """Base of every error HepatoQuant raises on purpose."""


class InvalidGeoJSONError(HepatoQuantError, ValueError):
    """A GeoJSON input (file or bytes) that cannot be read as QuPath objects, or an object that QuPath would
    reject on import."""


class ReportFormatError(HepatoQuantError, ValueError):
    """A stored report that is not a HepatoQuant report (not JSON, or a field missing or of the wrong kind)."""


class HepatoQuantClientError(HepatoQuantError):
    """A call to the server failed, or the job it ran did not succeed.

    ``code`` is the gRPC status name (``"NOT_FOUND"``, ``"PERMISSION_DENIED"``, ...); ``message`` is the server's
    message (what is wrong and what to do). Subclasses for the common codes are also the matching builtin, so
    ``except FileNotFoundError`` style handling is not needed: catch this class, or the subclass, or the builtin.
    """

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable despite the two-argument constructor
        return (type(self), (self.code, self.message))

    @classmethod
    def for_code(cls, code: str, message: str) -> HepatoQuantClientError:
        """The most specific error class for a status name."""
        return _ERROR_BY_CODE.get(code, HepatoQuantClientError)(code, message)

    @classmethod
    def from_rpc_error(cls, error: Exception) -> HepatoQuantClientError:
        """From a ``grpc.RpcError`` (read by its ``code()`` and ``details()``, so this module needs no grpc)."""
        code_fn = getattr(error, "code", None)
        details_fn = getattr(error, "details", None)
        status = code_fn() if callable(code_fn) else None
        code = getattr(status, "name", None) or "UNKNOWN"
        message = (details_fn() if callable(details_fn) else None) or str(error) or code
        return cls.for_code(code, message)


class InvalidArgumentError(HepatoQuantClientError, ValueError):
    """INVALID_ARGUMENT: a bad option, an unreadable slide or regions file."""


class NotFoundError(HepatoQuantClientError, LookupError):
    """NOT_FOUND: the slide, model pack or job named does not exist."""


class PermissionDeniedError(HepatoQuantClientError, PermissionError):
    """PERMISSION_DENIED: the slide lies outside the server's slide roots."""


class UnauthenticatedError(HepatoQuantClientError, PermissionError):
    """UNAUTHENTICATED: no token, or the wrong one."""


class ServerUnavailableError(HepatoQuantClientError, ConnectionError):
    """UNAVAILABLE: the server cannot be reached (or stopped while a job ran)."""


_ERROR_BY_CODE: dict[str, type[HepatoQuantClientError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "UNAVAILABLE": ServerUnavailableError,
}
