"""Device and dtype choices shared by the command-line tools, the lmms-eval adapter and the benchmarks."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto": cuda when a GPU is available, else cpu. A CUDA device that is not there raises ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(resolved)!r} was requested but no CUDA GPU is available; use cpu.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on a bf16-capable GPU, float32 elsewhere (CPUs without native bf16 are 5-33x slower)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {['auto', *DTYPES]}.")
    return DTYPES[dtype]


__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]
