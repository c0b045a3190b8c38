"""Analysis jobs slow enough to act on part-way, on any machine.

Tests that cancel, kill, watch or fill a queue behind a running job need that job to last. A slide's tile count
alone does not make it last: OpenVINO ran the tiny test encoder at 14,700 tiles/s on CI's machine and ended a
5,844-tile job in 0.4 s, before a test could interrupt it. Here every classifier batch of an analysis takes at
least ``SECONDS_PER_BATCH`` longer: in this process (:func:`throttle`) or in a ``hepatoquant`` subprocess
(:func:`cli_command`). What is measured is unchanged: only time is added, between batches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SECONDS_PER_BATCH = 0.015  # a 16 px tile job on the 2048 px test slide: 183 batches of 32, at least 2.7 s


def _slowed(predict_batches, seconds: float):
    def predict_batches_slowly(*args, **kwargs) -> Iterator:
        for prediction in predict_batches(*args, **kwargs):
            time.sleep(seconds)
            yield prediction

    return predict_batches_slowly


def throttle(monkeypatch: pytest.MonkeyPatch, seconds: float = SECONDS_PER_BATCH) -> None:
    """Slow every analysis batch in this process (servers started in-process included) until ``monkeypatch`` undoes it."""
    from hepatoquant import analysis

    monkeypatch.setattr(analysis, "predict_batches", _slowed(analysis.predict_batches, seconds))


def cli_command() -> list[str]:
    """The start of a command line that runs ``hepatoquant`` (its arguments follow) with every batch slowed."""
    return [sys.executable, str(Path(__file__).with_name("slow_jobs_cli.py"))]
