"""The one place that maps our exceptions to status names (gRPC codes; the HTTP gateway maps those on).

Mapping by class, walking the exception's MRO, means a new subclass gets its parent's code without touching
this table, and a more specific class listed here wins over its parent. Anything that is not one of our errors
is a bug, not bad input, and is INTERNAL.
"""

from __future__ import annotations

from hepatoquant.errors import (
    CorruptSlideError,
    ExecutorStoppedError,
    HepatoQuantError,
    InvalidGeoJSONError,
    InvalidParameterError,
    JobCancelledError,
    JobNotFoundError,
    JobNotReadyError,
    JobStoreSchemaError,
    StorageFullError,
    StorageUnavailableError,
    MissingMPPError,
    ModelPackError,
    ModelPackNotFoundError,
    NoTissueError,
    QueueFullError,
    RegionsError,
    ReportFormatError,
    SlideNotFoundError,
    UnauthenticatedError,
    UnsupportedSlideError,
    WeightsMismatchError,
)

__all__ = [
    "CANCELLED",
    "DATA_LOSS",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "status_name_for",
]

# gRPC status code names (grpc.StatusCode members), kept as strings so the job store needs no grpc.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
PERMISSION_DENIED = "PERMISSION_DENIED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
CANCELLED = "CANCELLED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
DATA_LOSS = "DATA_LOSS"

_STATUS_BY_ERROR: dict[type[BaseException], str] = {
    # What the client named does not exist.
    SlideNotFoundError: NOT_FOUND,
    ModelPackNotFoundError: NOT_FOUND,
    JobNotFoundError: NOT_FOUND,
    # What the client sent is wrong whatever the server's state: a bad option, an unreadable slide or regions.
    InvalidParameterError: INVALID_ARGUMENT,
    UnsupportedSlideError: INVALID_ARGUMENT,
    CorruptSlideError: INVALID_ARGUMENT,
    InvalidGeoJSONError: INVALID_ARGUMENT,
    RegionsError: INVALID_ARGUMENT,
    # The request is well formed but cannot run as things are: the slide needs an MPP override or has no
    # tissue; the server's model pack (manifest or weights) is broken, which the client cannot fix by asking
    # differently.
    MissingMPPError: FAILED_PRECONDITION,
    NoTissueError: FAILED_PRECONDITION,
    ModelPackError: FAILED_PRECONDITION,
    WeightsMismatchError: FAILED_PRECONDITION,
    JobStoreSchemaError: FAILED_PRECONDITION,
    JobNotReadyError: FAILED_PRECONDITION,
    # Ours and PermissionError (e.g. a slide outside the configured roots); a missing or wrong token.
    PermissionError: PERMISSION_DENIED,
    UnauthenticatedError: "UNAUTHENTICATED",
    # The server's state: its queue is full, the job was cancelled, the server is stopping.
    QueueFullError: RESOURCE_EXHAUSTED,
    JobCancelledError: CANCELLED,
    ExecutorStoppedError: UNAVAILABLE,
    StorageFullError: RESOURCE_EXHAUSTED,  # the disk: free space, then submit again
    StorageUnavailableError: UNAVAILABLE,  # the job store failed: try again later
    # A stored result that can no longer be read (a damaged report): only its owner can fix it.
    ReportFormatError: DATA_LOSS,
}


def status_name_for(exc: BaseException) -> str:
    """The status name for ``exc``: its most specific class in the table, INTERNAL for anything else."""
    if not isinstance(exc, HepatoQuantError):
        return INTERNAL  # a builtin PermissionError, say, is a server bug, not the client's doing
    for cls in type(exc).__mro__:
        if cls in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[cls]
    return INTERNAL
