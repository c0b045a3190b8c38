"""Where a run's wall time goes: named stages that add up to the whole, and a trace a user can open.

A report's ``timings_s`` used to leave out start-up, model loading from disk and writing the outputs, and so
understated the wall time by a third. A :class:`RunClock` is started with the run (for the command line: with
the process) and travels with the result; every stage is timed on it, and its summary ends with ``other``
(whatever no stage covered, shown rather than hidden) and ``total`` (the wall time so far), so that the stages
and ``other`` add up to ``total``, less ``overlapped`` where stages ran at once in different threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RunClock", "seconds_since_process_start"]


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included): Linux's ``/proc`` gives
    the start in clock ticks since boot, compared with the boot-time clock (10 ms resolution); None where there
    is no ``/proc`` (the report then has no ``startup`` stage)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return max(0.0, now - ticks / os.sysconf("SC_CLK_TCK"))


class RunClock:
    """Named stages of one run, in seconds; ``started_s_ago`` counts time before the clock was made (the
    process's start-up, recorded as the ``startup`` stage)."""

    def __init__(self, *, started_s_ago: float | None = None) -> None:
        self._origin = time.perf_counter() - (started_s_ago or 0.0)
        self._lock = threading.Lock()
        self.stages: dict[str, float] = {}
        self.spans: list[tuple[str, float, float, int]] = []  # (stage, start, end, thread id), perf_counter s
        if started_s_ago:
            self._record("startup", self._origin, self._origin + started_s_ago)

    @classmethod
    def for_process(cls) -> RunClock:
        """A clock whose run began when the process did (the command line's runs)."""
        return cls(started_s_ago=seconds_since_process_start())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._record(name, started, time.perf_counter())

    def _record(self, name: str, start: float, end: float) -> None:
        with self._lock:
            self.stages[name] = self.stages.get(name, 0.0) + (end - start)
            self.spans.append((name, start, end, threading.get_ident()))

    def summary(self) -> dict[str, float]:
        """The stages, then ``overlapped`` (time two stages ran at once, so counted twice: the segmenter runs
        alongside the classification; absent when none did), ``other`` (wall time no stage covered) and
        ``total`` (wall time since the start): stages - overlapped + other = total."""
        now = time.perf_counter()
        total = now - self._origin
        with self._lock:
            stages = dict(self.stages)
            spans = sorted((start, end) for _, start, end, _ in self.spans)
        covered, reach = 0.0, self._origin
        for start, end in spans:  # the union of the spans
            if end > reach:
                covered += end - max(start, reach)
                reach = end
        overlapped = max(0.0, sum(stages.values()) - covered)
        summary = {**stages, "overlapped": overlapped} if overlapped > 1e-4 else stages
        return {**summary, "other": max(0.0, total - covered), "total": total}

    def write_trace(self, path: Path) -> None:
        """The stages as a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing)."""
        with self._lock:
            spans = list(self.spans)
        events = [{"name": name, "cat": "stage", "ph": "X", "pid": os.getpid(), "tid": thread,
                   "ts": round((start - self._origin) * 1e6), "dur": round((end - start) * 1e6)}
                  for name, start, end, thread in spans]
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
