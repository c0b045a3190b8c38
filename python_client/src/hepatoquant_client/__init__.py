"""HepatoQuant's client: the gRPC client, the QuPath GeoJSON dialect and the class table (research use only).

``from hepatoquant_client import Client``. Importing the package imports nothing beyond the standard library:
the public names are loaded on first use, so ``import hepatoquant_client.classes`` stays as cheap as it was.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the submodule that defines it.
_LAZY: dict[str, str] = {
    "Client": "client",
    "HepatoQuantClientError": "errors",
    "InvalidArgumentError": "errors",
    "NotFoundError": "errors",
    "PermissionDeniedError": "errors",
    "UnauthenticatedError": "errors",
    "ServerUnavailableError": "errors",
    "AnalysisOutcome": "results",
    "ClassShare": "results",
    "RegionShare": "results",
    "JobProgress": "results",
    "TilePrediction": "results",
    "ServerInfo": "results",
    "ModelInfo": "results",
    "HepatoQuantError": "errors",
    "InvalidGeoJSONError": "errors",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .client import (
        AnalysisOutcome,
        ClassShare,
        Client,
        HepatoQuantClientError,
        InvalidArgumentError,
        JobProgress,
        ModelInfo,
        NotFoundError,
        PermissionDeniedError,
        RegionShare,
        ServerInfo,
        ServerUnavailableError,
        TilePrediction,
        UnauthenticatedError,
    )
    from .errors import HepatoQuantError, InvalidGeoJSONError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
