"""Which numeric precision the encoders run in, per device: chosen automatically, overridable, always recorded.

``auto``: on CUDA, autocast to the encoder's recommended dtype (bfloat16 where the GPU supports it, else float16);
on a CPU with native bfloat16 (AVX512-BF16 or AMX), bfloat16 autocast, which oneDNN runs several times faster
than float32 for ViTs; float32 on other CPUs, where bfloat16 would be emulated and slower. ``fp32``, ``bf16`` and
``fp16`` force a choice (fp16 only on CUDA: PyTorch's CPU kernels do not run these models faster in fp16).

Weights stay float32 under autocast. Storing them in bfloat16 on a CPU was measured and not kept: 1.47x for
ViT-Ti/16 and 1.14x for ViT-S/16 but no gain for ViT-B/16 and larger (the foundation models' sizes), and the
residual stream in bfloat16 lowered top-1 agreement with fp32 on the real tiles from 100 % to 99.3 %.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from hepatoquant.errors import InvalidParameterError

__all__ = ["PRECISIONS", "autocast_for", "cpu_has_native_bf16", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        if callable(check) and check():
            return True
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text(errors="replace").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(requested: str, device: torch.device, recommended_dtype: str = "bfloat16") -> str:
    """The precision to run with (``fp32``, ``bf16`` or ``fp16``) for ``requested`` on ``device``."""
    if requested not in PRECISIONS:
        raise InvalidParameterError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            wants_bf16 = recommended_dtype == "bfloat16"
            return "bf16" if wants_bf16 and torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise InvalidParameterError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 (CPUs with AVX512-BF16 or "
                                    "AMX) or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidParameterError("this GPU has no bfloat16 support; use --precision fp16 or fp32")
    return requested


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
