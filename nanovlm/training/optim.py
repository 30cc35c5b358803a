"""Per-module parameter groups, freezing, and a non-finite-loss guard on the optimizer.

Written here rather than taken from transformers because Trainer builds one LR for all parameters
(`learning_rate`), while nanoVLM trains the projector, the vision tower and the language model at their own LRs.
The schedule is Trainer's own (`cosine_with_min_lr`, a LambdaLR): it scales every group from that group's peak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import NonFiniteLossError

logger = logging.getLogger(__name__)

# Module-path markers of the three parts; a parameter matching none belongs to the language model (lm_head, ...).
PART_MARKERS = {"projector": "multi_modal_projector", "vision": "vision_tower", "language": "language_model"}
NO_DECAY_MARKERS = ("bias", "norm", "embed")  # biases, LayerNorm/RMSNorm, token/patch/position embeddings


def part_of(name: str) -> str:
    """Which part ('projector', 'vision' or 'language') a parameter name belongs to; works under PEFT prefixes."""
    for part, marker in PART_MARKERS.items():
        if f"{marker}." in name:
            return part
    return "language"


def apply_freezing(model: nn.Module, lrs: dict[str, float]) -> dict[str, str]:
    """Freeze every part whose LR is 0; returns {part: "frozen" | "trainable"} and logs it."""
    status = {}
    for part, lr in lrs.items():
        status[part] = "frozen" if lr == 0 else "trainable"
    for name, param in model.named_parameters():
        if status[part_of(name)] == "frozen":
            param.requires_grad_(False)
    counts = {part: 0 for part in lrs}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name)] += param.numel()
    for part in lrs:
        logger.info("%-9s %-9s lr=%g trainable params=%d", part, status[part], lrs[part], counts[part])
    return status


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lrs: dict[str, float],
    weight_decay: float,
    exempt_biases_norms_embeddings: bool = True,
) -> list[dict]:
    """AdamW groups per (part, decay/no-decay) with each part's LR; frozen params and empty groups are left out.

    With `exempt_biases_norms_embeddings` False every parameter decays, as in the original nanoVLM (one AdamW over
    all parameters at torch's default decay 0.01): the groups are then one per part, named after it.
    """
    groups: dict[tuple[str, bool], dict] = {}
    seen: set[int] = set()
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        part = part_of(name)
        decay = not exempt_biases_norms_embeddings or not any(marker in name.lower() for marker in NO_DECAY_MARKERS)
        group = groups.setdefault(
            (part, decay),
            {"params": [], "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0,
             "name": part if decay else f"{part}_no_decay"},
        )
        group["params"].append(param)
    return list(groups.values())


class NonFiniteGuard:
    """Skips optimizer steps whose accumulated loss was NaN/inf; stops after `max_consecutive` in a row (0: never).

    A skipped step still counts as a step: Trainer advances `global_step` and the LR schedule as usual, so the
    schedule stays a function of the step number (a resumed run and `--max_steps` agree with it); only the weights and
    the optimizer's moments are left untouched.

    `observe(loss)` records (on device, no host sync) whether a micro-batch loss was non-finite; the optimizer asks
    `should_skip()` once per step, which syncs the flag across processes so every rank skips together.

    It also sums the losses of the steps that were NOT skipped (`window_loss`, `window_steps`), so that a logging
    window containing a skipped step reports the mean over its finite steps, or NaN when all were skipped, instead
    of Trainer's 0.0 (see `NanoVLMTrainer.log`).
    """

    def __init__(self, max_consecutive: int, step_fn: Callable[[], int], sync: Callable[[torch.Tensor], torch.Tensor]):
        self.max_consecutive = max_consecutive
        self.step_fn = step_fn
        self.sync = sync
        self.flag: torch.Tensor | None = None
        self.consecutive = 0
        self.total_skipped = 0
        self.step_loss: torch.Tensor | float = 0.0  # this step's micro-batch losses so far (non-finite ones as 0)
        self.window_loss: torch.Tensor | float = 0.0  # summed losses of the kept steps since `reset_window`
        self.window_steps = 0

    def observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        finite = torch.isfinite(loss)
        bad = (~finite).any().float()
        self.flag = bad if self.flag is None else torch.maximum(self.flag, bad)
        self.step_loss = self.step_loss + torch.where(finite, loss, torch.zeros_like(loss)).sum()

    def reset_window(self) -> None:
        """Start a new logging window (after the trainer logged)."""
        self.window_loss, self.window_steps = 0.0, 0

    def should_skip(self) -> bool:
        flag, self.flag = self.flag, None
        step_loss, self.step_loss = self.step_loss, 0.0
        skip = flag is not None and bool(self.sync(flag).max().item() > 0)
        if not skip:
            self.consecutive = 0
            self.window_loss = self.window_loss + step_loss
            self.window_steps += 1
            return False
        self.consecutive += 1
        self.total_skipped += 1
        step = self.step_fn() + 1
        logger.warning("Non-finite loss at step %d: optimizer step skipped (%d in a row).", step, self.consecutive)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"Training stopped at step {step}: the loss was NaN/inf for {self.consecutive} consecutive steps "
                f"(--max_consecutive_nonfinite_losses {self.max_consecutive}). Lower the learning rates, check the "
                "data of these steps, or use bf16 instead of fp16."
            )
        return True


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that consults a NonFiniteGuard before each step and drops the step's gradients when told to skip."""

    guard: NonFiniteGuard | None = None

    def step(self, closure=None):
        if self.guard is not None and self.guard.should_skip():
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


__all__ = [
    "apply_freezing",
    "build_param_groups",
    "part_of",
    "NonFiniteGuard",
    "GuardedAdamW",
]
