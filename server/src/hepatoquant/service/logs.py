"""What the server logs, for an operator: one line per request (both ports) and per job transition, auth
refusals with the peer, and client disconnects as one line. ``--log-format json`` makes every line a JSON object
(the fields as keys) for log collectors; the default is ``key=value`` text."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "auth_denied", "configure", "job_event", "request_line"]

log = logging.getLogger("hepatoquant.server")
_TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's ``fields`` (see :func:`_emit`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str = "text") -> None:
    """The root logger at INFO on stderr, as text or JSON, when nobody configured logging yet (as
    ``logging.basicConfig``: embedded in a host application or a test run, theirs stays); uvicorn's own loggers
    quiet (each request is logged here)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _emit(level: int, fields: dict) -> None:
    if not log.isEnabledFor(level):  # health checks arrive many times a second: no text built for nothing
        return
    text = " ".join(f"{key}={'-' if value in (None, '') else value}" for key, value in fields.items())
    log.log(level, text, extra={"fields": fields})


def request_line(transport: str, method: str, peer: str, status: str, seconds: float, job_id: str | None) -> None:
    """One line per finished request: transport (grpc/http), method, peer, status name, milliseconds, job id.
    Health checks that succeed are DEBUG: an orchestrator probing every few seconds would drown the rest."""
    level = logging.DEBUG if method in ("Check", "healthz") and status == "OK" else logging.INFO
    _emit(level, {"event": "request", "transport": transport, "method": method[:64], "peer": peer,
                         "status": status, "ms": round(1000 * seconds, 1), "job": job_id or None})


def auth_denied(transport: str, peer: str, method: str) -> None:
    _emit(logging.WARNING, {"event": "auth-denied", "transport": transport, "method": method[:64], "peer": peer})


def connection_closed(transport: str, peer: str, reason: str) -> None:
    """A connection the server closed for its client's behaviour (e.g. a request head sent too slowly)."""
    _emit(logging.WARNING, {"event": "connection-closed", "transport": transport, "peer": peer, "reason": reason})


def job_event(job_id: str, event: str, *, level: int = logging.INFO, **fields) -> None:
    """One line per job transition (started, finished with state, code and seconds; an end not yet recorded)."""
    _emit(level, {"event": f"job-{event}", "job": job_id, **fields})
