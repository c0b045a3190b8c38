"""How much this process's resident memory rose during a block, sampled every few milliseconds on a thread.

The high-water mark (``ru_maxrss``, ``VmHWM``) cannot show it: a test run that loaded a model earlier already
peaked higher, so a growth measured against it is zero whatever the block did."""

from __future__ import annotations

import threading
from pathlib import Path


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class RssSampler:
    """``with RssSampler() as rss: ...`` then ``rss.growth_mib``: the highest sample less the one before."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start_mib = self.peak_mib = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_mib = max(self.peak_mib, _rss_mib())

    def __enter__(self) -> RssSampler:
        self.start_mib = self.peak_mib = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak_mib = max(self.peak_mib, _rss_mib())

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.start_mib
