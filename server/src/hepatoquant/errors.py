"""The errors HepatoQuant raises on purpose, one class per kind of bad input.

Each is also the matching builtin, so callers may catch ``FileNotFoundError`` or ``ValueError`` as well as
ours; each message names the input, what is wrong and what to do. The CLI turns them into one line and a
non-zero exit code; the server (later) maps them to gRPC status codes by class.
"""

from __future__ import annotations

from hepatoquant_client.errors import HepatoQuantError, InvalidGeoJSONError, ReportFormatError

__all__ = [
    "CorruptSlideError",
    "ExecutorStoppedError",
    "HepatoQuantError",
    "InvalidGeoJSONError",
    "InvalidParameterError",
    "JobCancelledError",
    "JobNotFoundError",
    "JobNotReadyError",
    "JobStoreDamagedError",
    "JobStoreSchemaError",
    "MissingMPPError",
    "ModelPackError",
    "ModelPackNotFoundError",
    "NoTissueError",
    "OutputWriteError",
    "QueueFullError",
    "RegionsError",
    "ReportFormatError",
    "SlideAccessDeniedError",
    "SlideNotFoundError",
    "StorageFullError",
    "StorageUnavailableError",
    "UnauthenticatedError",
    "UnsupportedSlideError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "shown",
]


class SlideNotFoundError(HepatoQuantError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class UnsupportedSlideError(HepatoQuantError, ValueError):
    """A file OpenSlide cannot open as a whole-slide image."""


class CorruptSlideError(HepatoQuantError, OSError):
    """A slide that opens but whose pixels cannot be read (truncated or damaged file)."""


class MissingMPPError(HepatoQuantError, ValueError):
    """A slide without pixel-size metadata, and no override given. The fix depends on the entry point (a
    command-line flag, a cohort CSV column, a request field): :meth:`with_fix` restates it for another one."""

    CLI_FIX = "pass it with --mpp (micrometres per pixel, e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)"

    def __init__(self, slide: str, fix: str = CLI_FIX) -> None:
        self.slide = slide
        self.fix = fix
        super().__init__(f"slide {slide!r} has no pixel size (MPP) in its metadata; {fix}")

    def with_fix(self, fix: str) -> MissingMPPError:
        return MissingMPPError(self.slide, fix)

    def __reduce__(self):  # picklable with its arguments (cohort workers send errors between processes)
        return MissingMPPError, (self.slide, self.fix)


class InvalidParameterError(HepatoQuantError, ValueError):
    """An option out of its allowed range (tile size, MPP, threshold, ...)."""


class NoTissueError(HepatoQuantError, ValueError):
    """Tissue detection found nothing to analyse."""


class ModelPackError(HepatoQuantError, ValueError):
    """A model pack whose manifest or weights are invalid."""


class ModelPackNotFoundError(ModelPackError, FileNotFoundError):
    """No model pack of that name or path."""


class WeightsMismatchError(ModelPackError):
    """A weight file whose parameter names or shapes do not match the architecture."""


class WeightsNotFoundError(WeightsMismatchError, FileNotFoundError):
    """A weight file path that does not exist."""


class OutputWriteError(HepatoQuantError, OSError):
    """The output folder cannot be written (permissions, full disk); nothing partial is left in it."""


class RegionsError(InvalidGeoJSONError):
    """A regions file that is valid GeoJSON but does not give usable regions for this slide."""


# -- the server's own: jobs, queue, access (mapped to status codes in hepatoquant.service.status) --------------


class QueueFullError(HepatoQuantError, RuntimeError):
    """The job queue is at its limit; the client should try again later."""


class JobCancelledError(HepatoQuantError, RuntimeError):
    """Raised inside a running job (by its progress callback) once the job has been cancelled."""


class ExecutorStoppedError(HepatoQuantError, RuntimeError):
    """A job submitted while the server is shutting down."""


class JobNotReadyError(HepatoQuantError, RuntimeError):
    """A result asked for before the job succeeded."""


class JobNotFoundError(HepatoQuantError, KeyError):
    """No job with that id in this server's state directory."""

    # KeyError would show the message in quotes, as if it were a key; ours is a sentence.
    __str__ = BaseException.__str__


class JobStoreSchemaError(HepatoQuantError, RuntimeError):
    """A job database written by a newer HepatoQuant, whose layout this version cannot read."""


class JobStoreDamagedError(JobStoreSchemaError):
    """A job database that cannot be trusted at start (damaged, or emptied while results exist): the message says
    how to recover (``hepatoquant serve --rebuild-job-store``, or a backup)."""


class StorageFullError(HepatoQuantError, OSError):
    """The server's disk is full: a job could not be recorded or its results written. The message names no
    server path; the operator frees space and the client submits again."""


class StorageUnavailableError(HepatoQuantError, OSError):
    """The server's job store failed (not a full disk): the client tries again later; the server log says why."""


class SlideAccessDeniedError(HepatoQuantError, PermissionError):
    """A slide reference that resolves outside every slide root."""


class UnauthenticatedError(HepatoQuantError, PermissionError):
    """A request without the server's bearer token."""


def shown(text: str, limit: int = 80) -> str:
    """``text`` as an error message may repeat what a client sent: quoted, control characters escaped, at most
    ``limit`` characters (a message never grows with the input: a 100 kB job id once made the error too large
    to send)."""
    quoted = repr(text[:limit])
    return quoted if len(text) <= limit else f"{quoted}... ({len(text)} characters)"
