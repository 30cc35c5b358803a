"""Where a training step's time goes: `torch.profiler` over a few steps, summarised into a small JSON-able dict.

Why this exists (issue #18): the 460m recipe reached 17.4% MFU on an H200 with 94% of the step in forward +
backward, and a lent GPU comes for 15 minutes at a time. This answers, from one profiled item, the questions that
decide the next change:
- `device_busy_fraction`: kernel time (intervals merged) / wall time. Low means the GPU waits for the host
  (kernel launches, Python, syncs): CUDA graphs or fewer, larger kernels help; high means the kernels themselves
  are slow: fusion (compile) or better kernels help.
- `categories`: kernel time by kind (GEMM, attention, norm, elementwise, softmax/loss, optimizer, copies, ...).
- `top_kernels`: the 20 kernels that take the most time, with their launch counts.
- `modules_forward`: per named module's forward (record_function ranges set by forward hooks): the time of the
  kernels it launched, its span on the GPU timeline, and its host time; the backward is not split by module, its
  kernels count in `categories`.
- `launches_per_step`: kernels launched per step.

On CPU (the smoke test) the "kernels" are the profiled operators' self times, so the same code and JSON run there.
The profiler's own Chrome trace is not written: at the 460m shape it is hundreds of MiB, more than a device call
brings back, and the summary is what the decision needs.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import TrainerCallback

# Kernel (or CPU operator) name -> kind, first match wins. The CUDA names are those of torch 2.x's kernels
# (cuBLAS/cuBLASLt "nvjet"/"sm90_xmma"/"cutlass" GEMMs, flash / memory-efficient / cuDNN attention, Inductor's
# "triton_*" fusions); the aten names are the CPU smoke test's.
CATEGORIES: list[tuple[str, str]] = [
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention|cudnn_generated_fort_native_sdpa|flex"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|matmul|linear)\b|_addmm_activation|sm\d+_.*tn"),
    ("optimizer", r"multi_tensor_apply|fused_adam|adam|_foreach_"),
    ("softmax_loss", r"softmax|cross_entropy|nll_loss|log_softmax"),
    ("norm", r"layer_norm|layernorm|rms_norm|RowwiseMoments|welford|aten::(native_layer_norm|rsqrt)"),
    ("copy_cast", r"copy|Memcpy|Memset|cast|aten::(to|_to_copy|copy_|contiguous|clone|cat|fill_|zero_)\b|CatArray"),
    ("index_scatter", r"index|scatter|gather|masked|embedding|nonzero"),
    ("reduce", r"reduce|sum|mean|norm_kernel|aten::(sum|mean|norm)\b"),
    ("compiled_fusion", r"^triton_"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(mul|add|sub|div|gelu|silu|tanh|pow|where|neg)"),
]
_COMPILED = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in CATEGORIES]

# The modules whose forward gets a profiler range: (attribute path from the model, range name).
MODULE_RANGES = [
    ("model.vision_tower", "vision_tower"),
    ("model.multi_modal_projector", "projector"),
    ("model.language_model", "language_model"),
    ("lm_head", "lm_head"),
]


def kind_of(name: str) -> str:
    """The category of a kernel or operator name (`other` when none matches)."""
    for kind, pattern in _COMPILED:
        if pattern.search(name):
            return kind
    return "other"


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _is_annotation(event) -> bool:
    """A range, not work: our `nanovlm::` ranges (kineto also mirrors them on the GPU timeline as
    gpu_user_annotation events) and the profiler's own step markers."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith(("nanovlm::", "ProfilerStep"))


def _module_times(prof) -> dict[str, dict[str, float]]:
    """Per `nanovlm::<module>` range: calls, host ms (CPU range), device ms (the kernels launched inside it) and,
    on a GPU, the range's span on the GPU timeline."""
    modules: dict[str, dict[str, float]] = {}
    for e in prof.events():
        if not e.name.startswith("nanovlm::"):
            continue
        entry = modules.setdefault(e.name.removeprefix("nanovlm::"),
                                   {"calls": 0, "host_ms": 0.0, "device_ms": 0.0, "device_span_ms": 0.0})
        if e.device_type == DeviceType.CPU:
            entry["calls"] += 1
            entry["host_ms"] += e.cpu_time_total / 1e3
            entry["device_ms"] += e.device_time_total / 1e3
        else:
            entry["device_span_ms"] += e.time_range.elapsed_us() / 1e3
    return modules


def _work_items(prof) -> tuple[list[tuple[str, float, float, float]], str]:
    """(name, duration us, start us, end us) of every GPU kernel, or of every CPU operator's self time when no
    kernel was recorded (a CPU run); and which of the two it is."""
    events = prof.events()
    kernels = [(e.name, e.time_range.elapsed_us(), e.time_range.start, e.time_range.end)
               for e in events if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0
               and not _is_annotation(e)]
    if kernels:
        return kernels, "cuda_kernels"
    ops = [(e.name, e.self_cpu_time_total, e.time_range.start, e.time_range.start + e.self_cpu_time_total)
           for e in events if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0
           and not _is_annotation(e) and not e.name.startswith("autograd::engine")]
    return ops, "cpu_operator_self_time"


def summarize_profile(prof, wall_s: float, steps: int, top: int = 20) -> dict[str, Any]:
    """The JSON summary described in the module docstring, from a finished `torch.profiler.profile`."""
    items, source = _work_items(prof)
    total_us = sum(duration for _, duration, _, _ in items)
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, duration, _, _ in items:
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + duration
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    busy_us = _merged_length([(start, end) for _, _, start, end in items]) if source == "cuda_kernels" else None
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "source": source,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "work_ms_per_step": total_us / 1e3 / steps,
        "device_busy_fraction": None if busy_us is None else busy_us / 1e6 / wall_s,
        "launches_per_step": len(items) / steps,
        "categories": {k: {"ms_per_step": v / 1e3 / steps, "share": v / total_us if total_us else 0.0}
                       for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:160], "kind": kind_of(name), "calls_per_step": count / steps,
                         "ms_per_step": us / 1e3 / steps, "share": us / total_us if total_us else 0.0}
                        for name, (us, count) in ranked],
        "modules_forward": _module_times(prof),
    }


class ModuleRanges:
    """Forward hooks that open a `nanovlm::<name>` profiler range around each named module's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.handles = []
        for path, name in MODULE_RANGES:
            module = model
            for attr in path.split("."):
                module = getattr(module, attr, None)
                if module is None:
                    break
            if module is not None:
                self._hook(module, f"nanovlm::{name}")

    def _hook(self, module: torch.nn.Module, label: str) -> None:
        open_ranges: list[record_function] = []

        def before(_module, _args):
            open_ranges.append(record_function(label))
            open_ranges[-1].__enter__()

        def after(_module, _args, _output):
            open_ranges.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class StepProfiler(TrainerCallback):
    """Profiles the optimizer steps `first + 1 .. first + count` (1-based, as `state.global_step` counts them) and
    keeps `summary` (see `summarize_profile`). Steps before `first` are untouched, so timings taken there stand."""

    def __init__(self, model: torch.nn.Module, first: int, count: int) -> None:
        self.model, self.first, self.count = model, first, count
        self.profiler = None
        self.ranges: ModuleRanges | None = None
        self.started = 0.0
        self.summary: dict[str, Any] | None = None

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first and self.profiler is None and self.summary is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            try:  # a profiler that cannot start (no CUPTI, say) costs the profile, never the item's timings
                self.ranges = ModuleRanges(self.model)
                self.profiler = profile(activities=activities)
                self._sync()
                self.profiler.__enter__()
            except Exception as err:
                self._fail("start", err)
                return
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and self.summary is None and state.global_step == self.first + self.count:
            self._sync()
            wall = time.perf_counter() - self.started
            try:
                self.profiler.__exit__(None, None, None)
                self.summary = summarize_profile(self.profiler, wall, self.count)
            except Exception as err:
                self._fail("summary", err)
            finally:
                self._close()

    def _fail(self, stage: str, err: Exception) -> None:
        self.summary = {"error": f"profiler {stage}: {type(err).__name__}: {str(err)[:300]}"}
        self._close()

    def _close(self) -> None:
        if self.ranges is not None:
            self.ranges.remove()
        self.ranges, self.profiler = None, None


def format_profile(summary: dict[str, Any]) -> str:
    """A few readable lines: busy fraction, categories, the top kernels."""
    if "error" in summary:
        return f"profile: {summary['error']}"
    busy = summary["device_busy_fraction"]
    lines = [f"profile ({summary['source']}, {summary['steps']} steps): {summary['wall_ms_per_step']:.1f} ms/step wall, "
             f"{summary['work_ms_per_step']:.1f} ms/step work, busy {'-' if busy is None else f'{busy:.1%}'}, "
             f"{summary['launches_per_step']:.0f} launches/step"]
    lines += [f"  {kind:16s} {v['ms_per_step']:9.2f} ms  {v['share']:6.1%}" for kind, v in summary["categories"].items()]
    lines += [f"  forward {name:14s} kernels {v['device_ms'] / summary['steps']:8.2f} ms, GPU span "
              f"{v['device_span_ms'] / summary['steps']:8.2f} ms, host {v['host_ms'] / summary['steps']:8.2f} ms per step"
              for name, v in summary["modules_forward"].items()]
    lines += [f"  {k['ms_per_step']:8.2f} ms {k['share']:6.1%} x{k['calls_per_step']:<6.0f} {k['kind']:14s} "
              f"{k['name'][:90]}" for k in summary["top_kernels"][:12]]
    return "\n".join(lines)
