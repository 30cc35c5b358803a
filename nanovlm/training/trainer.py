"""NanoVLMTrainer: transformers.Trainer with nanoVLM's optimizer recipe, packed batches and exact resume.

What it overrides, and why (everything else is Trainer's):
- `create_optimizer`: AdamW groups per part (projector, vision, language) at their own LRs (Trainer has a single
  LR), no weight decay on biases/norms/embeddings (unless --weight_decay_exempt_biases_norms_embeddings false),
  frozen parts (LR 0) left out. Trainer's own scheduler (`cosine_with_min_lr` by default) then scales every group
  from its own peak.
- `_prepare_inputs`: pops the collator's bookkeeping (stats, data state, skip counts: not model inputs), the one
  place it is taken off a batch; `training_step` records it (evaluation batches are not counted).
- `training_step`: times data wait and
  forward+backward, feeds the non-finite-loss guard; with `--loss_normalization micro_batch_mean` it withholds the
  step's label-token count, so each micro-batch's mean is divided by the accumulation steps (the original's rule).
- `log`: adds every group's LR and throughput statistics gathered across processes (mean/min/max), among them the
  FLOP estimate per step (`perf/step_tflops*`) and its per-step max/mean over ranks (`perf/step_flops_max_over_mean`).
- `evaluate`: token-weighted validation loss over the whole held-out set (Trainer averages per batch).
- `_save_checkpoint` / `train`: the packed dataset's position is saved with every checkpoint (before
  trainer_state.json, which Trainer writes last: a checkpoint without a readable trainer_state.json is incomplete
  and never resumed from), and restored on resume instead of replaying batches. So are the settings that define
  that position and the model (`run_settings.json`): a resume with other settings is refused, naming each one, unless
  `--resume_restart_data` restarts the data deliberately.
- `save_model` / `create_model_card`: the one writer of the model card. Every save writes the run's
  `training_info.json` (steps, losses, data, LRs, LoRA settings, the results given to `set_results`) and the NanoVLM
  model card (README.md, see model_card.py), which `push_to_hub` uploads instead of Trainer's generic card. A PEFT
  (LoRA) model is saved as its adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collator import BOOKKEEPING_KEY
from ..data.packing import TURNS_DROPPED_KEY, PackedDataset, combine_pack_states
from ..data.samples import IGNORE_INDEX
from .checkpoints import (
    check_resume_checkpoint,
    is_complete_checkpoint,
    last_complete_checkpoint,
)
from .errors import UsageError
from .flops import estimate_flops, peak_flops
from .model_card import save_training_info, write_model_card
from .optim import GuardedAdamW, NonFiniteGuard, apply_freezing, build_param_groups

logger = logging.getLogger(__name__)

DATA_STATE_NAME = "data_state.json"
RUN_SETTINGS_NAME = "run_settings.json"  # the data/packing flags and the model config a checkpoint was saved with
RESULTS_NAME = "results.json"  # the run's end results (set_results), written into output_dir for the user


class NanoVLMTrainer(Trainer):
    """Trainer for NanoVLM; `args` is a `NanoVLMTrainingArguments`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.part_lrs = {
            "projector": self.args.lr_mp,
            "vision": self.args.lr_vision_backbone,
            "language": self.args.lr_language_backbone,
        }
        self.part_status = apply_freezing(self.model, self.part_lrs)
        if self.args.compile_regions:
            # Trainer builds Accelerate's TorchDynamoPlugin without this option (only its environment variable
            # reaches it); accelerator.prepare reads the flag when it compiles, so setting it here is enough.
            self.accelerator.state.dynamo_plugin.use_regional_compilation = True
        self.nonfinite_guard = NonFiniteGuard(
            self.args.max_consecutive_nonfinite_losses,
            step_fn=lambda: self.state.global_step,
            sync=lambda t: self.accelerator.gather(t.reshape(1)),
        )
        self.data_state: dict | None = None
        self._bookkeeping: dict[str, Any] = {}  # the last batch's, popped by _prepare_inputs
        self.skip_counts: Counter = Counter()  # samples skipped by reason, summed over this process's workers (the
        # logs sum them over processes)
        self._skip_by_worker: dict[int, dict] = {}
        self._reset_window()
        self._last_step_end: float | None = None
        # Extra training info for the model card, e.g. {"dataset": "HuggingFaceM4/FineVision"}; see training_info().
        self.card_info: dict[str, Any] = {}
        self.results: dict[str, Any] = {}  # the run's end results (set_results); their accuracy tables go on the card
        # {flag: value} of the settings that define the data position and packing (train_accelerate.py sets them
        # from build.data_position_settings); saved with every checkpoint beside the model config, compared on resume.
        self.run_settings: dict[str, Any] = {}

    # ---- data loading --------------------------------------------------------------------------------------------
    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):
        """Packed datasets are already split per process (rows are sharded by rank before packing), so they bypass
        `accelerator.prepare`: for an IterableDataset it would deal each process only every world_size-th batch of
        ITS stream (dropping the rest) and pad a finite eval stream's last batch with repeated packs. Inputs are
        moved to the device by `Trainer._prepare_inputs` as usual."""
        if not isinstance(dataset, PackedDataset):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        workers = self.args.dataloader_num_workers
        params = {
            "batch_size": batch_size,
            "collate_fn": self.data_collator,
            "num_workers": workers,
            "pin_memory": self.args.dataloader_pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.args.dataloader_persistent_workers and workers > 0,
        }
        if workers > 0:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
            params["multiprocessing_context"] = self.args.dataloader_multiprocessing_context
        return DataLoader(dataset, **params)

    # ---- optimizer and schedule --------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(
                opt_model.named_parameters(),
                self.part_lrs,
                self.args.weight_decay,
                exempt_biases_norms_embeddings=self.args.weight_decay_exempt_biases_norms_embeddings,
            )
            if not groups:
                raise ValueError("Every part is frozen (all three learning rates are 0): nothing to train.")
            self.optimizer = GuardedAdamW(
                groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
            self.optimizer.guard = self.nonfinite_guard
        return self.optimizer

    # ---- one step ------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Every batch passes here (training_step, prediction_step, evaluate) before the forward: the one place where
        # the collator's bookkeeping is taken off. training_step records it; evaluation batches are dropped.
        self._bookkeeping = inputs.pop(BOOKKEEPING_KEY, None) or {}
        return super()._prepare_inputs(inputs)

    def _record_bookkeeping(self, bookkeeping: dict[str, Any]) -> dict[str, Any]:
        """Fold a training batch's pack states and skip counts into the trainer's; returns its stats."""
        skipped = bookkeeping.get("skipped")
        for entry in skipped or ():
            self._skip_by_worker[entry["worker"]] = entry["counts"]
        if skipped:
            self.skip_counts = sum((Counter(c) for c in self._skip_by_worker.values()), Counter())
        if bookkeeping.get("data_state"):
            self.data_state = combine_pack_states(bookkeeping["data_state"], self.data_state)
            if self._skip_by_worker:  # each worker's counts at its last pack, saved beside the position: a resumed
                # worker continues from them (PackedDataset), instead of restarting its counts at 0
                self.data_state["skipped"] = {str(w): dict(c) for w, c in self._skip_by_worker.items()}
        return bookkeeping.get("stats") or {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        if self._last_step_end is not None:
            self._window["data_wait"] += start - self._last_step_end
        self._lrs_in_use = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        if self.args.loss_normalization == "micro_batch_mean":
            # Without the step's label-token count the model returns this micro-batch's mean, which Trainer divides
            # by the accumulation steps (and DDP averages over processes): the original nanoVLM's rule.
            num_items_in_batch = None
        loss = super().training_step(model, inputs, num_items_in_batch)  # pops the bookkeeping (_prepare_inputs)
        stats = self._record_bookkeeping(self._bookkeeping)
        self.nonfinite_guard.observe(loss)
        if self.args.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        self._window["fwd_bwd"] += end - start
        for key in ("num_real_tokens", "num_pad_tokens", "num_samples", "num_images", "num_tiles"):
            self._window[key] += stats.get(key, 0)
        flops = estimate_flops(self.model.config, stats)
        self._window["flops"] += flops
        self._micro_flops.append(flops)
        self._last_step_end = end
        return loss

    # ---- logging -------------------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._window = Counter()
        self._micro_flops: list[float] = []  # this rank's FLOP estimate per micro-batch of the window
        self._window_start = time.perf_counter()

    def _gathered(self, values: dict[str, float]) -> dict[str, float]:
        """mean/min/max over processes of per-process values (one collective for all of them)."""
        keys = sorted(values)
        local = torch.tensor([float(values[k]) for k in keys], device=self.args.device, dtype=torch.float64)
        every = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys)).cpu()
        out = {}
        for i, key in enumerate(keys):
            col = every[:, i]
            out[f"{key}"] = col.mean().item()
            if every.shape[0] > 1:
                out[f"{key}_min"] = col.min().item()
                out[f"{key}_max"] = col.max().item()
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            # the LRs the last optimizer step used (the scheduler has already moved on when Trainer logs)
            for name, lr in getattr(self, "_lrs_in_use", {}).items():
                logs[f"lr/{name}"] = lr
            logs.update(self._throughput_logs())
            self._nonfinite_window_loss(logs)
        super().log(logs, start_time)

    def _nonfinite_window_loss(self, logs: dict[str, float]) -> None:
        """A window with skipped (non-finite) steps logs the mean loss of its kept steps, or NaN when none was kept:
        Trainer would log 0.0 for them (`logging_nan_inf_filter`) or, without the filter, NaN for every later window
        (it resets its running sum by subtracting it from itself)."""
        guard = self.nonfinite_guard
        skipped = guard.total_skipped - getattr(self, "_skipped_at_last_log", 0)
        self._skipped_at_last_log = guard.total_skipped
        if skipped:
            total = torch.as_tensor(guard.window_loss, dtype=torch.float32, device=self.args.device).reshape(1)
            total = self.accelerator.gather(total).mean().item()  # as Trainer: the mean over processes
            logs["loss"] = total / guard.window_steps if guard.window_steps else math.nan
        guard.reset_window()

    def _throughput_logs(self) -> dict[str, float]:
        w = self._window
        wall = max(time.perf_counter() - self._window_start, 1e-9)
        tokens = w["num_real_tokens"] + w["num_pad_tokens"]
        local = {
            "tokens_per_s": tokens / wall,
            "real_tokens_per_s": w["num_real_tokens"] / wall,
            "real_token_fraction": w["num_real_tokens"] / tokens if tokens else 0.0,
            "data_wait_s": w["data_wait"],
            "fwd_bwd_s": w["fwd_bwd"],
            "images_per_sample": w["num_images"] / w["num_samples"] if w["num_samples"] else 0.0,
        }
        peak = peak_flops(self.args.device)
        if peak:
            local["mfu"] = w["flops"] / wall / peak
        steps = self._micro_flops
        if steps:
            local["step_tflops"] = sum(steps) / len(steps) * self.args.gradient_accumulation_steps / 1e12
        logs = {f"perf/{k}": v for k, v in self._gathered(local).items()}
        if steps:
            logs["perf/step_flops_max_over_mean"] = self._flops_imbalance(steps)
        # summed over processes: each rank skips in its own share of the rows (one collective, as _gathered)
        skipped = sum((Counter(c) for c in self._gather_objects(dict(self.skip_counts))), Counter())
        logs["data/turns_dropped_by_rating"] = float(skipped.pop(TURNS_DROPPED_KEY, 0))
        logs["data/skipped_total"] = float(sum(skipped.values()))
        for reason, n in sorted(skipped.items()):
            logs[f"data/skipped/{reason}"] = float(n)
        # no "train/" prefix: wandb's callback prefixes every training key with it (next to loss, grad_norm)
        logs["nonfinite_steps_skipped"] = float(self.nonfinite_guard.total_skipped)
        self._reset_window()
        return logs

    def _flops_imbalance(self, micro_flops: list[float]) -> float:
        """Mean over the window's optimizer steps of (max over ranks / mean over ranks) of the step's FLOP estimate:
        the slowest rank sets a data-parallel step's time, so 1.0 is perfect balance. Every rank ran the same
        micro-batches in the window, so the per-rank vectors line up (a trailing partial accumulation counts as a
        step of its own)."""
        local = torch.tensor(micro_flops, device=self.args.device, dtype=torch.float64)
        every = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(micro_flops)).cpu()  # (ranks, micro)
        acc = self.args.gradient_accumulation_steps
        steps = torch.stack([every[:, i : i + acc].sum(1) for i in range(0, every.shape[1], acc)], 1)  # (ranks, steps)
        mean = steps.mean(0)
        ratio = torch.where(mean > 0, steps.max(0).values / mean.clamp_min(1e-30), torch.ones_like(mean))
        return ratio.mean().item()

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted loss over the whole held-out set (or `eval_max_batches` batches per process)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, PackedDataset) and hasattr(dataset.source, "counter"):
            dataset.source.counter.reset()  # this evaluation's skips only (workers start from this copy)
        dataloader: DataLoader = self.get_eval_dataloader(eval_dataset)
        model = self._wrap_model(self.model, training=False, dataloader=dataloader)
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # (sum of token losses, tokens)
        skipped: dict[int, dict] = {}  # each worker's counts at its last pack
        start = time.perf_counter()
        with torch.no_grad():
            for i, inputs in enumerate(dataloader):
                if self.args.eval_max_batches is not None and i >= self.args.eval_max_batches:
                    break
                inputs = self._prepare_inputs(inputs)
                skipped.update((entry["worker"], entry["counts"]) for entry in self._bookkeeping.get("skipped") or ())
                n_tokens = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
                with self.compute_loss_context_manager():
                    loss = model(**inputs, num_items_in_batch=torch.ones((), device=self.args.device)).loss
                totals += torch.stack([loss.double(), n_tokens.double()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        if totals[1] == 0 and self.is_world_process_zero():  # NaN loss: say why rather than track the best on it
            logger.warning("Evaluation saw no label token: every validation row was skipped (see the data log) or "
                           "--eval_split is empty; %s_loss is NaN.", metric_key_prefix)
        metrics = {
            f"{metric_key_prefix}_loss": (totals[0] / totals[1]).item() if totals[1] > 0 else math.nan,
            f"{metric_key_prefix}_tokens": totals[1].item(),
            f"{metric_key_prefix}_runtime": time.perf_counter() - start,
        }
        # the held-out rows' skips, summed over workers and processes (as data/skipped_* for training)
        skips = sum((Counter(c) for counts in self._gather_objects(list(skipped.values())) for c in counts), Counter())
        metrics[f"{metric_key_prefix}_turns_dropped_by_rating"] = float(skips.pop(TURNS_DROPPED_KEY, 0))
        metrics[f"{metric_key_prefix}_skipped_total"] = float(sum(skips.values()))
        metrics.update({f"{metric_key_prefix}_skipped/{reason}": float(n) for reason, n in sorted(skips.items())})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.model.train()
        self._last_step_end = None  # evaluation time is not data wait
        return metrics

    # ---- model card ----------------------------------------------------------------------------------------------
    def training_info(self, dataset: str | list[str] | None = None, finetuned_from: str | None = None) -> dict:
        """What the model card reports about this run (see model_card.py): steps, global batch, LRs, the
        last training loss, the last and best validation loss (and the best one's step), the data (`dataset`, else
        `card_info["dataset"]`, else the `save_to_disk` folder of the training rows), LoRA settings, and the accuracy
        tables of the results given to `set_results`."""
        history = self.state.log_history
        losses = [e["loss"] for e in history if "loss" in e]
        eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        info: dict[str, Any] = {
            "steps": self.state.global_step,
            "global_batch_size": self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            * self.args.world_size,
            "learning_rates": dict(self.part_lrs),
            "dataset": dataset or self.card_info.get("dataset") or _dataset_name(self.train_dataset),
            "finetuned_from": finetuned_from or getattr(base, "name_or_path", None) or None,
        }
        if losses:
            info["train_loss"] = losses[-1]
        if eval_losses:
            info["eval_loss"] = eval_losses[-1]
        if self.args.load_best_model_at_end and self.args.metric_for_best_model == "eval_loss":
            info["best_eval_loss"] = self.state.best_metric
            # the step whose weights final/ holds: "steps" is the last step, which may not be the best one
            best = re.search(r"checkpoint-(\d+)$", str(self.state.best_model_checkpoint or "").rstrip("/"))
            info["best_step"] = int(best.group(1)) if best else None
        if model is not base:  # a PeftModel
            from .lora import lora_info

            info["lora"] = lora_info(model)
        evaluation = {k: self.results[k] for k in ("test_accuracy", "blind_guess_accuracy") if k in self.results}
        if evaluation:
            info["evaluation"] = evaluation
        return {**self.card_info, **{k: v for k, v in info.items() if v is not None}}

    def set_results(self, results: dict[str, Any]) -> None:
        """Record the run's end results (e.g. the final model's folder, the plots, `test_accuracy` and
        `blind_guess_accuracy`): kept in memory for the training info and model card of every later save and push,
        and written to OUTPUT_DIR/results.json (by the main process) for the user. Every process may call it."""
        self.results = dict(results)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, RESULTS_NAME), "w") as f:
                json.dump(self.results, f, indent=2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (a PEFT model saves its adapter), plus `training_info.json` and the model card
        (README.md; for an adapter it replaces PEFT's template card)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._fsdp_sharded_state_dict() and not _internal_call:
            # Trainer.save_model writes nothing under FSDP with SHARDED_STATE_DICT (configs/accelerate/fsdp.yaml):
            # sharded files are for resuming checkpoints. A model folder a user asks for must load with
            # from_pretrained, so gather the full state dict (a collective: every process calls it).
            state_dict = self.accelerator.get_state_dict(self.model)
            self._save(output_dir, state_dict=state_dict)
        else:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            info = self.training_info()
            save_training_info(info, output_dir)
            write_model_card(self.accelerator.unwrap_model(self.model), output_dir,
                             repo_id=self.args.hub_model_id or output_dir, training_info=info)

    def _fsdp_sharded_state_dict(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the NanoVLM model card (instead of Trainer's) to `output_dir/README.md`, which `push_to_hub`
        uploads: the model's card plus this run's training details. `license`, `tasks`, `dataset_tags` and
        `dataset_args` are ignored (the card is apache-2.0, image-text-to-text)."""
        if not self.is_world_process_zero():
            return
        info = self.training_info(dataset=dataset, finetuned_from=finetuned_from)
        save_training_info(info, self.args.output_dir)
        repo_id = self.args.hub_model_id or model_name
        write_model_card(self.accelerator.unwrap_model(self.model), self.args.output_dir, repo_id=repo_id,
                         training_info=info, tags=tags, language=language)

    # ---- checkpoints and resume ------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # Written first; trainer_state.json (written last by Trainer) marks the checkpoint complete.
        states = self._gather_objects(self.data_state)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder) and not is_complete_checkpoint(folder):
                shutil.rmtree(folder)  # a leftover from a run killed while writing this step
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, DATA_STATE_NAME), "w") as f:
                json.dump({"world_size": self.args.world_size, "ranks": states}, f)
            self._save_run_settings(folder)
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir: str) -> None:
        # Trainer saves each process's RNG (and, under FSDP, its model and optimizer shards) and then, on the main
        # process only, trainer_state.json, the mark of a complete checkpoint, without waiting for the others: a kill
        # in between left a "complete" checkpoint without rank 1's files, and its resume warned and went on with
        # fresh RNG. The barrier makes the mark mean that every process has finished writing.
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _current_run_settings(self) -> dict[str, dict[str, Any]]:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return {"data": dict(self.run_settings), "model": _flat_model_config(base.config)}

    def _save_run_settings(self, folder: str) -> None:
        with open(os.path.join(folder, RUN_SETTINGS_NAME), "w") as f:
            json.dump(self._current_run_settings(), f, indent=1, sort_keys=True, default=str)

    def _check_run_settings(self, checkpoint: str) -> None:
        """Refuse (one line, every changed setting as old -> new) to resume from a checkpoint saved with other data
        or packing settings (the saved data position would point into other data) or another model (its weights
        would not load). With --resume_restart_data only the model must match."""
        path = os.path.join(checkpoint, RUN_SETTINGS_NAME)
        if not os.path.isfile(path):
            logger.warning("%s has no %s (saved by an older version): its settings are not checked.", checkpoint,
                           RUN_SETTINGS_NAME)
            return
        with open(path) as f:
            saved = json.load(f)
        now = json.loads(json.dumps(self._current_run_settings(), default=str))  # as saved: lists, not tuples
        restart = self.args.resume_restart_data
        changed = {kind: [(k, saved[kind].get(k), now[kind].get(k)) for k in sorted(set(saved[kind]) | set(now[kind]))
                          if saved[kind].get(k) != now[kind].get(k)] for kind in ("data", "model")}
        # a flag recorded on one side only is not compared: one only some settings record (per_device_train_batch_size
        # with --balance_batches, whose own change is named), or one an older version did not record yet
        data = [f"--{k} {old} -> {new}" for k, old, new in changed["data"]
                if k in now["data"] and k in saved["data"] and not restart]
        model = [f"model config {k} {old} -> {new}" for k, old, new in changed["model"]]
        if model:
            fix = "its weights only load into the same model: resume with the checkpoint's model settings, or start " \
                  "a new --output_dir (--model_name_or_path CHECKPOINT fine-tunes it with fresh optimizer and data)"
        elif data:
            fix = "resume with the checkpoint's settings, or pass --resume_restart_data true to keep its weights, " \
                  "optimizer, LR schedule and step but restart the data from its beginning with the new settings"
        else:
            return
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: saved with other settings ({', '.join(data + model)}); {fix}"
        )

    def _gather_objects(self, obj: Any) -> list:
        if self.args.world_size == 1:
            return [obj]
        out = [None] * self.args.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming from the last COMPLETE checkpoint when `resume_from_checkpoint` is True, and
        restoring the packed dataset's position from it (so batches are not replayed)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                logger.warning("No complete checkpoint in %s: training from scratch.", self.args.output_dir)
        if resume_from_checkpoint:
            check_resume_checkpoint(resume_from_checkpoint)
            self._check_run_settings(resume_from_checkpoint)
            if self.args.resume_restart_data:
                self.args.ignore_data_skip = True  # the data restarts: Trainer must not skip batches either
                logger.info("Resuming the weights, optimizer, LR schedule and step of %s; the data restarts from its "
                            "beginning (--resume_restart_data).", resume_from_checkpoint)
            else:
                self._restore_data_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Trainer's check, without the false alarm for tied weights: a checkpoint stores a tied lm_head once, as the
        input embeddings, so `load_state_dict` reports `lm_head.weight` missing although loading the embeddings
        filled it (the same tensor)."""
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters(remove_duplicate=False))
        missing = set(load_result.missing_keys)
        loaded = {p.data_ptr() for name, p in params.items() if name not in missing}
        really_missing = [k for k in load_result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=really_missing))

    def _restore_data_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, DATA_STATE_NAME)
        dataset = self.train_dataset
        if not hasattr(dataset, "load_state_dict"):
            return
        if not os.path.isfile(path):
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint}: no {DATA_STATE_NAME}, so the position in the data cannot be "
                "restored; pass --resume_restart_data true to resume the rest and restart the data"
            )
        with open(path) as f:
            saved = json.load(f)
        if saved["world_size"] != self.args.world_size:
            raise UsageError(
                f"{checkpoint} was saved with {saved['world_size']} processes, this run has {self.args.world_size}: "
                "the per-process data positions cannot be mapped; resume with the same number of processes, or pass "
                "--resume_restart_data true to restart the data"
            )
        state = saved["ranks"][self.args.process_index]
        if state is not None:
            dataset.load_state_dict(state)
            self.data_state = state
            self._skip_by_worker = {int(w): c for w, c in (state.get("skipped") or {}).items()}
            self.skip_counts = sum((Counter(c) for c in self._skip_by_worker.values()), Counter())
        # The dataset continues where it was: Trainer must not also skip the batches it already consumed.
        self.args.ignore_data_skip = True
        self._rng_after_first_batch = True
        logger.info("Restored the data position from %s.", path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """With the data position restored, Trainer (skipping no batches) restores the RNG before the first batch;
        fetching it starts the DataLoader, which draws its base seed from the torch RNG. The uninterrupted run drew
        that seed at its start, so the draw shifted every later random number: LoRA dropout masks differed and a
        resumed lora.yaml run's losses were off by up to 2e-3 from step 3. The RNG is restored after the first batch
        instead (`get_batch_samples`), where Trainer itself restores it when it skips batches."""
        if getattr(self, "_rng_after_first_batch", False):
            self._rng_checkpoint = checkpoint
            return
        super()._load_rng_state(checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's, then the RNG state deferred by `_load_rng_state`."""
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        checkpoint, self._rng_checkpoint = getattr(self, "_rng_checkpoint", None), None
        if checkpoint is not None:
            self._rng_after_first_batch = False
            super()._load_rng_state(checkpoint)
        return batches


# Model-config keys that do not change the weights' shapes or meaning (how to run it, where it came from).
_MODEL_KEYS_IGNORED = {
    "transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "output_attentions",
    "output_hidden_states", "return_dict", "training_info", "_commit_hash",
}


def _flat_model_config(config: Any) -> dict[str, Any]:
    """{"text_config.hidden_size": 128, ...}: the model config flattened, without `_MODEL_KEYS_IGNORED`."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in _MODEL_KEYS_IGNORED:
                    walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = value

    walk("", config.to_dict())
    return out


def _dataset_name(dataset: Any) -> str | None:
    """The `save_to_disk` folder the training rows of a PackedDataset were loaded from, or None."""
    rows = getattr(getattr(dataset, "source", None), "rows", None)
    for entry in getattr(rows, "cache_files", None) or []:
        folder = os.path.dirname(os.path.dirname(entry["filename"]))  # <folder>/<split>/data-*.arrow
        if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            return folder
    return None


__all__ = ["NanoVLMTrainer"]
