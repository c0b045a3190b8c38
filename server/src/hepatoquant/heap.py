"""Keep the garbage collector's full passes short in a long-running process (the server).

Libraries and models loaded once (torch, timm, grpc: some 400,000 Python objects, more with peft) live as long
as the process. Left in the collector's oldest generation, every full collection walks all of them: about 0.2 s
holding the GIL, during which the server's event loop answers nothing (measured: health checks of 150-250 ms
under load). ``gc.freeze`` moves what lives now out of the collector's reach for good; what is created later is
collected as before.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_long_lived"]


def freeze_long_lived() -> None:
    """Collect the garbage there is now, then freeze everything still alive (call after loading, not per job)."""
    gc.collect()
    gc.freeze()
