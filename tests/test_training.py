"""NanoVLMTrainer: per-group LRs and schedule, freezing, loss under accumulation, exact resume, non-finite guard."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os

import pytest
import torch
import training_helpers
from training_helpers import make_trainer, packed_dataset, synthetic_rows, tiny_setup, training_args
from transformers import TrainerCallback
from transformers.integrations.integration_utils import rewrite_logs

from nanovlm.training.checkpoints import last_complete_checkpoint
from nanovlm.training.errors import NonFiniteLossError
from nanovlm.training.optim import part_of


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(96)


def record_micro_steps(trainer) -> tuple[list[float], list[list[int]]]:
    """Wrap training_step to record each micro-batch's loss and the first token ids of its rows."""
    losses, seen = [], []
    original = trainer.training_step

    def wrapped(model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"][:, :8].flatten().tolist() + [int(inputs["input_ids"].numel())])
        loss = original(model, inputs, num_items_in_batch)
        losses.append(loss.item())
        return loss

    trainer.training_step = wrapped
    return losses, seen


class GradCapture(TrainerCallback):
    """Keeps the gradients seen just before each optimizer step (after accumulation, before clipping)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def nanovlm_get_lr(step: int, total: int, warmup_fraction: float = 0.03, min_ratio: float = 0.1) -> float:
    """The original nanoVLM's `get_lr(step) / max_lr`."""
    warmup = total * warmup_fraction
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (1.0 - min_ratio)


def lr_factor(step: int, total: int) -> float:
    """The default schedule (transformers' cosine_with_min_lr, warmup 3% of the steps rounded up, min_lr_rate 0.1)."""
    warmup = math.ceil(0.03 * total)
    if step < warmup:
        return step / warmup
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_default_schedule_is_nanovlms_one_step_late(tmp_path):
    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path, max_steps=100), [])
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    factors = [trainer.lr_scheduler.lr_lambdas[0](s) for s in range(101)]
    # warmup over 3% of 100 steps = 3 steps: 0, 1/3, 2/3, then the peak one step after nanoVLM reaches it
    assert factors[:5] == pytest.approx([0, 1 / 3, 2 / 3, 1.0, nanovlm_get_lr(4, 100)])
    assert factors[1:4] == pytest.approx([nanovlm_get_lr(s, 100) for s in range(3)])  # the one-step offset
    assert factors[3:] == pytest.approx([nanovlm_get_lr(s, 100) for s in range(3, 101)])  # then the same cosine
    assert factors == pytest.approx([lr_factor(s, 100) for s in range(101)])
    assert factors[100] == pytest.approx(0.1) and factors[3 + 97 // 2] == pytest.approx(0.55, abs=0.01)
    # every group scales from its own peak
    trainer.optimizer.step()  # no gradients: moves nothing, keeps torch's step order
    trainer.lr_scheduler.step()
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] / 3)


def test_group_lrs_follow_the_schedule_and_all_trainable_params_change(rows, tmp_path):
    model, processor = tiny_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = 40
    args = training_args(tmp_path, max_steps=total, lr_mp=3e-3, lr_vision_backbone=1e-3, lr_language_backbone=2e-3)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    lrs = []

    class LrRecorder(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})

    trainer.add_callback(LrRecorder())
    trainer.train()
    peaks = {"projector": 3e-3, "vision": 1e-3, "language": 2e-3}
    # 3% of 40 = 1.2 steps, rounded up to 2: step 1 at half the peak, step 2 the first full-LR step
    for step in (0, 1, 2, total // 2, total - 1):
        for name, lr in lrs[step].items():
            part = name.replace("_no_decay", "")
            assert lr == pytest.approx(peaks[part] * lr_factor(step, total)), (step, name)
    logged = [e for e in trainer.state.log_history if "lr/projector" in e]
    assert {"lr/projector", "lr/vision", "lr/language", "lr/vision_no_decay"} <= set(logged[0])
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


def test_zero_lr_freezes_that_part(rows, tmp_path):
    model, processor = tiny_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, max_steps=3, lr_vision_backbone=0.0)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    assert trainer.part_status == {"projector": "trainable", "vision": "frozen", "language": "trainable"}
    trainer.train()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (part_of(name) != "vision"), name
    names = {g["name"] for g in trainer.optimizer.param_groups}
    assert not any(n.startswith("vision") for n in names)


def test_no_weight_decay_on_biases_norms_embeddings(rows, tmp_path):
    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path, weight_decay=0.1), packed_dataset(rows, processor))
    trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            no_decay = "bias" in n or "norm" in n or "embed" in n
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), n


def test_weight_decay_on_every_parameter_as_the_original(rows, tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path, weight_decay=0.01, weight_decay_exempt_biases_norms_embeddings=False)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    trainer.create_optimizer()
    assert {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups} == {
        "projector": 0.01, "vision": 0.01, "language": 0.01
    }
    in_groups = sorted(id(p) for g in trainer.optimizer.param_groups for p in g["params"])
    assert in_groups == sorted({id(p) for p in model.parameters()})  # every parameter once (tied weights once)


@pytest.mark.parametrize(("batch", "accum"), [(2, 2), (1, 4)])
def test_loss_and_grads_equal_across_accumulation(rows, tmp_path, batch, accum):
    results = {}
    for key, (b, a) in {"ref": (4, 1), "acc": (batch, accum)}.items():
        model, processor = tiny_setup()
        capture = GradCapture()
        args = training_args(tmp_path / key, max_steps=2, per_device_train_batch_size=b, gradient_accumulation_steps=a)
        trainer = make_trainer(model, processor, args, packed_dataset(rows, processor), callbacks=[capture])
        trainer.train()
        results[key] = (capture.grads, [e["loss"] for e in trainer.state.log_history if "loss" in e])
    (ref_grads, ref_loss), (grads, loss) = results["ref"], results["acc"]
    assert loss == pytest.approx(ref_loss, abs=1e-4)  # logged (rounded) loss per step
    for step in range(2):
        for name, g in ref_grads[step].items():
            torch.testing.assert_close(grads[step][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_resume_gives_the_same_losses_and_data(rows, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, dataloader_num_workers=1)

    def packed_dataset(rows, processor):  # multi-image rows skipped, rounds of 8 rows: more skips after the resume
        return training_helpers.packed_dataset(rows, processor, max_images_per_example=1, buffer_size=8)

    model, processor = tiny_setup()
    straight = make_trainer(model, processor, training_args(tmp_path / "a", **common), packed_dataset(rows, processor))
    losses_a, seen_a = record_micro_steps(straight)
    straight.train()

    model, processor = tiny_setup()
    first = make_trainer(model, processor, training_args(tmp_path / "b", **common, ), packed_dataset(rows, processor))
    losses_b1, seen_b1 = record_micro_steps(first)
    first.train()
    # Throw away steps 4..6 as if the run had been killed after checkpoint-3 was written.
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    assert last_complete_checkpoint(str(tmp_path / "b")).endswith("checkpoint-3")
    data_state = json.loads((tmp_path / "b" / "checkpoint-3" / "data_state.json").read_text())
    assert data_state["world_size"] == 1 and data_state["ranks"][0]["workers"]

    model, processor = tiny_setup(seed=123)  # different init: everything must come from the checkpoint
    resumed = make_trainer(model, processor, training_args(tmp_path / "b", **common), packed_dataset(rows, processor))
    losses_b2, seen_b2 = record_micro_steps(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert seen_b1[:3] + seen_b2 == seen_a
    assert losses_b1[:3] + losses_b2 == pytest.approx(losses_a, abs=1e-6)
    skipped = [[e["data/skipped_total"] for e in t.state.log_history if "loss" in e] for t in (straight, resumed)]
    assert skipped[0][-1] > skipped[0][0] > 0  # skips in the first round, and more in later ones
    assert skipped[1] == skipped[0]  # they restarted at 0 on resume


def test_incomplete_checkpoint_is_never_loaded(rows, tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    make_trainer(model, processor, args, packed_dataset(rows, processor)).train()
    # A kill while checkpoint-4 was being written: trainer_state.json (written last) is truncated.
    state = tmp_path / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:20])
    assert last_complete_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path, max_steps=4), packed_dataset(rows, processor))
    with pytest.raises(ValueError, match="checkpoint-4: not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4


def test_nonfinite_loss_steps_are_skipped_then_training_stops(rows, tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path, max_steps=8, max_consecutive_nonfinite_losses=3)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    original = trainer.compute_loss
    bad_steps = {2, 4, 5, 6}  # 0-based optimizer steps whose loss is NaN

    def nan_on_bad_steps(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if trainer.state.global_step in bad_steps else loss

    trainer.compute_loss = nan_on_bad_steps
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(copy.deepcopy(model.model.multi_modal_projector.proj.weight.detach()))

    trainer.add_callback(Snapshot())
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 7: the loss was NaN/inf for 3 consecutive steps"):
        trainer.train()
    assert trainer.nonfinite_guard.total_skipped == 4
    # a skipped step leaves the weights as they were; a good step changes them
    assert torch.equal(snapshots[2], snapshots[1]) and not torch.equal(snapshots[3], snapshots[2])
    assert torch.isfinite(snapshots[-1]).all()
    # skipped steps are logged as NaN (not 0.0) and counted; the LR schedule advances on them like on any step
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [math.isnan(e["loss"]) for e in logs] == [False, False, True, False, True, True]
    skipped = [next(v for k, v in e.items() if k.endswith("nonfinite_steps_skipped")) for e in logs]
    assert skipped == [0, 0, 1, 1, 2, 3]
    assert [e["lr/projector"] for e in logs] == pytest.approx([1e-3 * lr_factor(s, 8) for s in range(6)])


def test_zero_max_consecutive_nonfinite_losses_never_stops(rows, tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path, max_steps=3, max_consecutive_nonfinite_losses=0)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    original = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: original(*a, **k) * float("nan")
    before = copy.deepcopy(model.state_dict())
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.nonfinite_guard.total_skipped == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validation_loss_is_token_weighted_over_the_whole_set(rows, tmp_path):
    model, processor = tiny_setup()
    eval_ds = packed_dataset(synthetic_rows(20, seed=1), processor, infinite=False)
    args = training_args(tmp_path, per_device_eval_batch_size=2)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor), eval_dataset=eval_ds)
    metrics = trainer.evaluate()
    # reference: every pack, every label token, one by one
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for pack in eval_ds:
            for s in pack["samples"]:
                out = model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], labels=s["labels"][None],
                            num_items_in_batch=torch.tensor(1))
                total += out.loss.item()
                count += int((s["labels"][1:] != -100).sum())
    assert metrics["eval_tokens"] == count
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    capped = trainer.evaluate() if False else None  # noqa: F841
    args_capped = training_args(tmp_path, per_device_eval_batch_size=2, eval_max_batches=1)
    trainer_capped = make_trainer(model, processor, args_capped, packed_dataset(rows, processor), eval_dataset=eval_ds)
    assert trainer_capped.evaluate()["eval_tokens"] < count


def test_throughput_stats_are_logged(rows, tmp_path):
    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path, max_steps=2), packed_dataset(rows, processor))
    trainer.train()
    log = [e for e in trainer.state.log_history if "loss" in e][-1]
    for key in ("perf/tokens_per_s", "perf/real_token_fraction", "perf/data_wait_s", "perf/fwd_bwd_s",
                "perf/images_per_sample", "data/skipped_total", "grad_norm", "nonfinite_steps_skipped"):
        assert key in log, key
    assert log["nonfinite_steps_skipped"] == 0.0
    # wandb's callback prefixes training keys with "train/" itself: no key may come out doubled
    wandb_keys = set(rewrite_logs(log))
    assert "train/nonfinite_steps_skipped" in wandb_keys
    assert not [k for k in wandb_keys if k.startswith("train/train/")]
    assert 0.5 < log["perf/real_token_fraction"] <= 1.0
    assert log["perf/tokens_per_s"] > 0 and "perf/mfu" not in log  # no MFU on CPU
    assert log["perf/step_tflops"] > 0 and log["perf/step_flops_max_over_mean"] == 1.0  # one rank: balanced
    assert os.path.isdir(tmp_path)


def test_step_flops_imbalance_is_max_over_mean_across_ranks_per_optimizer_step(rows, tmp_path):
    model, processor = tiny_setup()
    args = training_args(tmp_path, gradient_accumulation_steps=2)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    # a second rank whose second micro-batch costs 3x: steps cost (2, 2) on rank 0 and (4, 2) on rank 1
    trainer.accelerator.gather = lambda t: torch.cat([t, t * torch.tensor([[1.0, 3.0, 1.0, 1.0]], dtype=t.dtype)])
    assert trainer._flops_imbalance([1.0, 1.0, 1.0, 1.0]) == pytest.approx((4 / 3 + 1.0) / 2)


def test_tied_lm_head_is_not_reported_missing_after_a_checkpoint_load(rows, tmp_path):
    from torch.nn.modules.module import _IncompatibleKeys
    from transformers.utils import logging as hf_logging

    model, processor = tiny_setup()
    trainer = make_trainer(model, processor, training_args(tmp_path), packed_dataset(rows, processor))
    logged = []
    handler = hf_logging.logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    hf_logging.add_handler(handler)
    try:
        # what Trainer's resume gets from load_state_dict: the checkpoint stores the tied weight once
        trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
        assert not [m for m in logged if "missing keys" in m]
        # an untied lm_head that is absent from the checkpoint is really missing: still reported
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
        assert [m for m in logged if "missing keys" in m and "lm_head.weight" in m]
    finally:
        hf_logging.remove_handler(handler)


def test_flop_estimate_counts_real_tokens_and_attention_within_each_sample(rows):
    """The logged MFU's FLOPs (what bench/gpu_suite.py reports too): padding is free and packed samples attend only
    within themselves, so the attention term is sum_i L_i^2, not rows * T^2."""
    from nanovlm.data.collator import BOOKKEEPING_KEY, PackedCollator
    from nanovlm.training.flops import _sizes, estimate_flops

    model, processor = tiny_setup()
    packs = list(itertools.islice(iter(packed_dataset(rows, processor)), 2))
    batch = PackedCollator(processor.tokenizer.pad_token_id, pad_to_multiple_of=64)(packs)
    stats = batch[BOOKKEEPING_KEY]["stats"]
    lengths = [len(s["input_ids"]) for p in packs for s in p["samples"]]
    assert len(lengths) > 2 and stats["num_pad_tokens"] > 0
    assert stats["sum_sq_sample_lengths"] == sum(n * n for n in lengths)
    cfg, text, vision = model.config, model.config.text_config, model.config.vision_config
    n_text, n_vis, n_proj, patches = _sizes(cfg)
    tiles = int(batch["pixel_values"].shape[0])
    expected = (6 * n_text * sum(lengths) + 6 * text.num_hidden_layers * text.hidden_size * sum(n * n for n in lengths)
                + 6 * n_vis * patches * tiles + 12 * vision.num_hidden_layers * vision.hidden_size * patches**2 * tiles
                + 6 * n_proj * cfg.image_seq_len * tiles)
    assert estimate_flops(cfg, stats) == pytest.approx(expected, rel=1e-12)
    # stats without the per-sample sum (an older collator) fall back to attention over whole rows: an upper bound
    whole_rows = {k: v for k, v in stats.items() if k != "sum_sq_sample_lengths"}
    extra = 6 * text.num_hidden_layers * text.hidden_size * (
        stats["num_rows"] * stats["row_length"] ** 2 - stats["sum_sq_sample_lengths"])
    assert estimate_flops(cfg, whole_rows) == pytest.approx(expected + extra, rel=1e-12)


def test_compile_regions_compiles_each_repeated_layer_not_the_whole_model(rows, tmp_path):
    """--compile_regions true: Accelerate's regional compilation (the 460m recipe's default, measured on an H200).
    Compilation is lazy, so preparing the model costs nothing here; the GPU suite times real steps."""
    from torch._dynamo.eval_frame import OptimizedModule

    from nanovlm.training.arguments import NanoVLMTrainingArguments

    assert NanoVLMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, compile_regions=True).torch_compile
    model, processor = tiny_setup()
    args = training_args(tmp_path, compile_regions=True)
    trainer = make_trainer(model, processor, args, packed_dataset(rows, processor))
    assert args.torch_compile and trainer.accelerator.state.dynamo_plugin.use_regional_compilation
    prepared = trainer.accelerator.prepare_model(trainer.model)
    assert not isinstance(prepared, OptimizedModule)  # the whole model is not one compiled graph
    for layers in (prepared.model.language_model.layers, prepared.model.vision_tower.encoder.layers):
        assert layers and all(isinstance(layer, OptimizedModule) for layer in layers)
    # the compiled layers are the trained parameters (the optimizer sees the same tensors)
    assert prepared.model.language_model.layers[0]._orig_mod.self_attn.q_proj.weight is \
        model.model.language_model.layers[0].self_attn.q_proj.weight


def test_evaluation_without_any_usable_row_says_why_its_loss_is_nan(rows, tmp_path, caplog):
    model, processor = tiny_setup()
    bad = [{"images": [b"not an image"], "texts": [{"user": "a?", "assistant": "b"}]}, {"texts": []}]
    trainer = make_trainer(model, processor, training_args(tmp_path), packed_dataset(rows, processor),
                           eval_dataset=packed_dataset(bad, processor, infinite=False))
    with caplog.at_level(logging.WARNING, logger="nanovlm.training.trainer"):
        metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_loss"]) and metrics["eval_tokens"] == 0
    assert ("Evaluation saw no label token: every validation row was skipped (see the data log) or --eval_split is "
            "empty; eval_loss is NaN.") in caplog.messages
