"""Trainer callbacks: asynchronous lmms-eval evaluation of saved checkpoints.

`LmmsEvalCallback` evaluates every `lmms_eval_interval`-th step's checkpoint without blocking training:
- `on_save` (main process only): submits the new checkpoint to a launcher (`nanovlm.evaluation.launcher`: an
  `sbatch` job when a SLURM template is configured, else a local background process);
- `on_step_end` / `on_log`: polls (at most every `poll_interval_s` seconds) and logs finished results;
- `on_train_end`: waits up to `await_timeout_s` for pending evaluations, logs them, and names those still running.

Results are logged under `lmms_eval/{task}_{metric}` on their own step axis `lmms_eval/step` (the checkpoint's
step, not the step at which the result arrived): to wandb (with `define_metric`) and TensorBoard (run
`{output_dir}/runs/lmms_eval`, or `$TENSORBOARD_LOGGING_DIR`) when they are in `report_to`; always to
`state.log_history`, the Python log and `callback.history`.
A failed evaluation is logged with the tail of its log file and recorded, never raised.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..evaluation.launcher import EvalJob, EvalLauncher, build_launcher, log_tail

logger = logging.getLogger(__name__)

METRIC_PREFIX = "lmms_eval"
STEP_METRIC = f"{METRIC_PREFIX}/step"

# NanoVLMTrainingArguments fields read by `LmmsEvalCallback.from_args`, with the defaults used when a field is absent.
ARG_DEFAULTS: dict[str, Any] = {
    "lmms_eval_limit": None,
    "lmms_eval_batch_size": 8,
    "lmms_eval_device": None,
    "lmms_eval_slurm_template": None,
    "lmms_eval_results_dir": None,
    "lmms_eval_await_timeout": 3600.0,
    "lmms_eval_max_concurrent": 1,
}


@dataclass
class EvalRecord:
    """One finished evaluation as the callback logged it."""

    step: int
    checkpoint: str
    results: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    logged_at_step: int = 0


class LmmsEvalCallback(TrainerCallback):
    """Evaluate checkpoints with lmms-eval in the background and log the results (see the module docstring).

    Args:
        launcher: submits and tracks the evaluations.
        interval: evaluate the checkpoints of steps that are multiples of this (only saved steps can be evaluated).
        await_timeout_s: how long `on_train_end` waits for pending evaluations.
        poll_interval_s: minimum seconds between two polls during training.
    """

    def __init__(
        self, launcher: EvalLauncher, interval: int, await_timeout_s: float = 3600.0, poll_interval_s: float = 30.0
    ):
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"lmms_eval_interval must be an integer >= 1, got {interval!r}.")
        self.launcher = launcher
        self.interval = interval
        self.await_timeout_s = await_timeout_s
        self.poll_interval_s = poll_interval_s
        self.history: list[EvalRecord] = []
        self._last_poll = -math.inf
        self._wandb_ready = False
        self._tb_writer = None

    @classmethod
    def from_args(cls, args: TrainingArguments, synthetic_data: str | None = None, **kwargs) -> LmmsEvalCallback:
        """Build from NanoVLMTrainingArguments (`lmms_eval_tasks`, `lmms_eval_interval` and the optional
        `ARG_DEFAULTS` fields); results go to `lmms_eval_results_dir` (default `{output_dir}/eval_results`).
        `synthetic_data`: the run's synthetic dataset, which the nanovlm_synthetic tasks then read (their YAML default
        is outputs/synthetic_data in the working directory, another run's data or none)."""
        import importlib.util

        value = {name: getattr(args, name, default) for name, default in ARG_DEFAULTS.items()}
        tasks = args.lmms_eval_tasks
        if not tasks:
            raise ValueError("LmmsEvalCallback needs --lmms_eval_tasks (e.g. mmstar mme, or nanovlm_synthetic).")
        if not value["lmms_eval_slurm_template"] and importlib.util.find_spec("lmms_eval") is None:
            raise ValueError(
                f"--lmms_eval_tasks {' '.join(tasks)} needs lmms-eval in this environment: pip install -e . "
                "(or unset --lmms_eval_tasks)."
            )
        results_dir = value["lmms_eval_results_dir"] or os.path.join(args.output_dir, "eval_results")
        launcher = build_launcher(
            results_dir, tasks, slurm_template=value["lmms_eval_slurm_template"],
            batch_size=value["lmms_eval_batch_size"], limit=value["lmms_eval_limit"],
            device=value["lmms_eval_device"], max_concurrent=value["lmms_eval_max_concurrent"],
            extra_args=["--synthetic_data", str(synthetic_data)] if synthetic_data else [],
        )  # fmt: skip
        interval = args.lmms_eval_interval or 2 * getattr(args, "eval_interval", 500)
        return cls(launcher, interval, await_timeout_s=value["lmms_eval_await_timeout"], **kwargs)

    # ---- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        save_steps = args.save_steps if args.save_strategy == "steps" and args.save_steps >= 1 else None  # not a ratio
        if state.is_world_process_zero and save_steps and self.interval % int(save_steps) != 0:
            logger.warning(
                "lmms-eval: --lmms_eval_interval %d is not a multiple of --save_steps %s: only checkpoints whose step "
                "is a multiple of both get evaluated.", self.interval, save_steps,
            )  # fmt: skip

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero or state.global_step % self.interval != 0:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.launcher.submit(checkpoint, state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._poll(args, state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        self._poll(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.launcher.pending:
            logger.info("lmms-eval: waiting up to %.0f s for %d evaluation(s)", self.await_timeout_s,
                        len(self.launcher.pending))  # fmt: skip
        for job in self.launcher.wait(self.await_timeout_s):
            self._report(job, args, state)
        for job in self.launcher.pending:
            logger.warning(
                "lmms-eval: evaluation of %s still running after %.0f s; its results will be in %s",
                job.describe(), self.await_timeout_s, job.results_path,
            )  # fmt: skip
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    # ---- results -------------------------------------------------------------------------------------------------
    def _poll(self, args: TrainingArguments, state: TrainerState) -> None:
        if not state.is_world_process_zero or not self.launcher.jobs:
            return
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = now
        for job in self.launcher.poll():
            self._report(job, args, state)

    def _report(self, job: EvalJob, args: TrainingArguments, state: TrainerState) -> None:
        """Log one finished job: its results to the trackers, its failures as warnings."""
        record = EvalRecord(job.step, str(job.checkpoint), dict(job.results or {}), job.error, state.global_step)
        self.history.append(record)
        if job.error:
            logger.warning(
                "lmms-eval: evaluation of %s %s: %s\n%s", job.describe(),
                "partly failed" if job.results else "failed", job.error, log_tail(job.log_path),
            )  # fmt: skip
        if not record.results:
            return
        metrics = {f"{METRIC_PREFIX}/{key}": value for key, value in sorted(record.results.items())}
        logger.info("lmms-eval results of step %d: %s", job.step,
                    ", ".join(f"{k}={v:.4f}" for k, v in record.results.items()))  # fmt: skip
        state.log_history.append({**metrics, STEP_METRIC: job.step, "step": state.global_step})
        report_to = args.report_to or []
        if "wandb" in report_to:
            self._log_wandb(metrics, job.step)
        if "tensorboard" in report_to:
            self._log_tensorboard(args, metrics, job.step)

    def _log_wandb(self, metrics: dict[str, float], step: int) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        if not self._wandb_ready:
            wandb.define_metric(STEP_METRIC)
            wandb.define_metric(f"{METRIC_PREFIX}/*", step_metric=STEP_METRIC)
            self._wandb_ready = True
        wandb.log({**metrics, STEP_METRIC: step})

    def _log_tensorboard(self, args: TrainingArguments, metrics: dict[str, float], step: int) -> None:
        if self._tb_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            # Trainer's TensorBoard folder is $TENSORBOARD_LOGGING_DIR, else output_dir/runs/<date_host> (decided
            # inside its callback): write next to it, as run "lmms_eval", on the checkpoints' steps.
            log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "lmms_eval")
            self._tb_writer = SummaryWriter(log_dir=os.path.expanduser(log_dir), filename_suffix=".lmms_eval")
        for key, value in metrics.items():
            self._tb_writer.add_scalar(key, value, global_step=step)
        self._tb_writer.flush()


def check_lmms_eval_tasks(args: TrainingArguments) -> None:
    """Raise a one-line `UsageError` when `--lmms_eval_tasks` names a task lmms-eval does not know (with close
    matches and how to list them). Called at start-up, before the data and the model: otherwise each checkpoint's
    background evaluation would fail with lmms-eval's KeyError in its log, and training would go on evaluating
    nothing. Not in the argument parser: indexing lmms-eval's tasks takes seconds."""
    if not getattr(args, "lmms_eval_tasks", None):
        return
    from ..evaluation.lmms import checked_task_manager
    from ..evaluation.tasks import TASKS_DIR
    from .errors import UsageError

    tasks = [t.strip() for name in args.lmms_eval_tasks for t in name.split(",") if t.strip()]
    try:
        checked_task_manager(tasks, [str(TASKS_DIR)], flag="--lmms_eval_tasks")
    except ValueError as err:
        raise UsageError(str(err)) from None


__all__ = ["ARG_DEFAULTS", "EvalRecord", "LmmsEvalCallback", "check_lmms_eval_tasks"]
