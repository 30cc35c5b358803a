"""nanovlm.devices: the device and dtype defaults shared by nanovlm-generate, the lmms-eval adapter and bench/."""

from __future__ import annotations

import pytest
import torch

from nanovlm.cli.generate import UsageError, pick_device_and_dtype
from nanovlm.devices import DTYPES, resolve_device, resolve_dtype


def test_defaults_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) is resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_device_and_dtype(None, None) == (torch.device("cpu"), torch.float32)


def test_explicit_choices_are_kept():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name, dtype in DTYPES.items():
        assert resolve_dtype(name, torch.device("cpu")) is dtype
    assert resolve_dtype(torch.float16, torch.device("cpu")) is torch.float16


def test_a_missing_gpu_and_a_bad_dtype_name_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{name}' was requested but no CUDA GPU is available; use cpu"):
            resolve_device(name)
    with pytest.raises(UsageError, match=r"--device cuda was requested but no CUDA GPU is available; use --device cpu"):
        pick_device_and_dtype("cuda", None)
    with pytest.raises(ValueError, match=r"dtype='fp8' is not supported; choose one of \['auto', 'float32'"):
        resolve_dtype("fp8", torch.device("cpu"))
