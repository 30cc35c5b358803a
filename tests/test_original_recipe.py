"""NanoVLMTrainer with the README's documented differences switched to the original's behaviour trains exactly like
the original nanoVLM's update rule, re-implemented here from its description (not from nanovlm's optimizer code):

- one `torch.optim.AdamW` over all parameters at torch's defaults (weight decay 0.01 on everything), with one
  parameter group per module: projector, vision tower, language model (lm_head included) at their own LRs;
- before each optimizer step every group's LR is `peak * get_lr(step)`: `(step + 1) / warmup` while
  `step < warmup` (warmup = warmup_fraction x steps), then cosine from the peak down to 10% of it; nanovlm uses
  transformers' `cosine_with_min_lr`, whose warmup is `step / warmup`: one step behind (LR 0 at step 0, the peak one
  step later, the same cosine after), the offset the README states. The reference applies the original's rule with
  that shift during warmup (`get_lr(step - 1)`, 0 at step 0), so the comparison stays exact;
- loss = the micro-batch's mean token loss / accumulation steps, backward per micro-batch;
- the gradient norm of all parameters clipped to 1.0, then the step.

Switched to the original's behaviour: `--weight_decay 0.01 --weight_decay_exempt_biases_norms_embeddings false
--loss_normalization micro_batch_mean`. The warmup is a whole number of steps (3): otherwise transformers rounds it
up and the cosine shifts too. Accumulation 2 over micro-batches with unequal label-token counts, where the two loss
normalisations differ.
"""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args

STEPS, ACCUMULATION, WARMUP_FRACTION = 20, 2, 0.15  # warmup: 3 steps
WARMUP_OFFSET = 1  # nanovlm's warmup runs this many steps behind the original's (README, "Differences")
PEAKS = {"projector": 3e-3, "vision": 1e-3, "language": 2e-3}
pytestmark = pytest.mark.usefixtures("one_thread")


def original_lr(step: int, peak: float, total: int = STEPS, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """The original's `get_lr(it, max_lr, max_steps)` with the warmup fraction as a parameter."""
    min_lr = 0.1 * peak
    warmup = total * warmup_fraction
    if step < warmup:
        return peak * (step + 1) / warmup
    if step > total:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return min_lr + coeff * (peak - min_lr)


def shifted_lr(step: int, peak: float) -> float:
    """The original's LR with nanovlm's warmup offset: `WARMUP_OFFSET` steps late during warmup (0 before the
    original's step 0), the same cosine after."""
    if step >= STEPS * WARMUP_FRACTION:
        return original_lr(step, peak)
    return original_lr(step - WARMUP_OFFSET, peak) if step >= WARMUP_OFFSET else 0.0


def original_training(model, micro_batches: list[dict]) -> list[float]:
    """The original's loop over the given micro-batches; returns each micro-batch's mean loss."""
    projector = list(model.model.multi_modal_projector.parameters())
    vision = list(model.model.vision_tower.parameters())
    taken = {id(p) for p in projector + vision}
    language = [p for p in model.parameters() if id(p) not in taken]  # parameters() lists tied weights once
    groups = [
        {"params": projector, "lr": PEAKS["projector"], "peak": PEAKS["projector"]},
        {"params": vision, "lr": PEAKS["vision"], "peak": PEAKS["vision"]},
        {"params": language, "lr": PEAKS["language"], "peak": PEAKS["language"]},
    ]
    optimizer = torch.optim.AdamW(groups)  # torch's defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
    model.train()
    losses = []
    for step in range(STEPS):
        for batch in micro_batches[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            loss = model(**batch).loss  # mean over this micro-batch's label tokens
            losses.append(loss.item())
            (loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        for group in optimizer.param_groups:
            group["lr"] = shifted_lr(step, group["peak"])
        optimizer.step()
        optimizer.zero_grad()
    return losses


def test_original_rule_and_trainer_with_the_original_switches_give_the_same_losses(tmp_path):
    model, processor = tiny_setup(seed=0)
    args = training_args(
        tmp_path,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION,
        lr_mp=PEAKS["projector"],
        lr_vision_backbone=PEAKS["vision"],
        lr_language_backbone=PEAKS["language"],
        warmup_steps=WARMUP_FRACTION,
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0,
        weight_decay=0.01,
        weight_decay_exempt_biases_norms_embeddings=False,
        loss_normalization="micro_batch_mean",
    )
    trainer = make_trainer(model, processor, args, packed_dataset(synthetic_rows(96), processor))
    micro_batches, trainer_losses = [], []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        micro_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        trainer_losses.append(loss.item())
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    assert len(micro_batches) == STEPS * ACCUMULATION

    # the two micro-batches of a step have unequal label counts: the loss normalisation matters here
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
    step_counts = [counts[i : i + ACCUMULATION] for i in range(0, len(counts), ACCUMULATION)]
    assert sum(len(set(c)) > 1 for c in step_counts) >= STEPS // 2, step_counts

    reference, _ = tiny_setup(seed=0)
    reference_losses = original_training(reference, micro_batches)
    assert max(abs(a - b) for a, b in zip(trainer_losses, reference_losses)) < 1e-4
    # per step: the mean of the micro-batch means (what the trainer logs under micro_batch_mean, rounded to 4 digits)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    expected = [sum(reference_losses[i : i + ACCUMULATION]) / ACCUMULATION for i in range(0, 2 * STEPS, 2)]
    assert logged == pytest.approx(expected, abs=1e-4)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
