"""`NanoVLMTrainingArguments`: `transformers.TrainingArguments` plus nanoVLM's knobs (one learning rate per module,
evaluation cadence, LoRA), with nanoVLM's defaults where they differ (its warmup + cosine schedule among them).

Like the model and data arguments (`nanovlm.training.arguments`), it checks its own fields before
`TrainingArguments.__post_init__` and raises one `ArgumentsError` listing every problem.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainingArguments
from transformers.hf_argparser import HfArg
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from .checks import as_str_list, check_int, check_range, field_errors, is_int, is_number
from .errors import ArgumentsError

if TYPE_CHECKING:
    from .arguments import DataArguments, ModelArguments

logger = logging.getLogger(__name__)

LOSS_NORMALIZATIONS = ["global_tokens", "micro_batch_mean"]
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BASE_FIELDS = frozenset(TrainingArguments.__dataclass_fields__)  # checked by TrainingArguments itself


def _accelerator_available() -> bool:
    """A GPU (or another torch accelerator) that Trainer would place each process on."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    """True when a CUDA GPU with native bf16 is present (CPUs here have none: bf16 made CPU steps 5-33x slower)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class NanoVLMTrainingArguments(TrainingArguments):
    r"""`transformers.TrainingArguments` with nanoVLM's knobs and defaults.

    nanoVLM's own parameters:

    - `lr_mp`, `lr_vision_backbone`, `lr_language_backbone`: one learning rate per module (projector, vision tower,
      language model); 0 freezes that module. They replace `learning_rate`.
    - `weight_decay_exempt_biases_norms_embeddings`: True (the default) keeps `weight_decay` off biases, norms and
      embeddings; False decays every parameter, as the original nanoVLM's AdamW (torch's default 0.01) does.
    - `loss_normalization`: "global_tokens" (the default) divides the summed token losses by the label tokens of
      the whole optimizer step; "micro_batch_mean" is the original's mean per micro-batch / accumulation steps.
    - `eval_interval`: steps between evaluations; sets `eval_steps`, and `save_steps` to the same value, when those
      are not given.
    - `resume_restart_data`: resume weights, optimizer, schedule and step but restart the data (see its help).
    - `eval_max_batches`, `lmms_eval_tasks`, `lmms_eval_interval`, `max_consecutive_nonfinite_losses`, `compile`
      (sets `torch_compile`), `compile_regions` (compile each repeated layer once; sets `torch_compile`), and the
      LoRA knobs `use_lora`, `lora_r`, `lora_alpha`, `lora_dropout`,
      `lora_target_modules`.

    Defaults that differ from `transformers.TrainingArguments`:

    - `per_device_train_batch_size`: 2 instead of 8; `gradient_accumulation_steps`: 8 instead of 1.
    - `max_steps`: 40000 instead of -1; `logging_steps`: 10 instead of 500.
    - `learning_rate`: None instead of 5e-5. It is unused (the three learning rates above replace it); after init it
      mirrors `lr_mp` for code that reads it. Another value is overwritten with a warning.
    - nanoVLM's schedule, applied to every parameter group from its own peak LR (a `LambdaLR`): `lr_scheduler_type`
      "cosine_with_min_lr" instead of "linear", `lr_scheduler_kwargs` `{"min_lr_rate": 0.1}` instead of None (the
      cosine ends at 10% of each peak) and `warmup_steps` 0.03 instead of 0 (in transformers 5, `warmup_steps` < 1
      is a ratio of the total steps). Its warmup runs one step behind nanoVLM's (README, "Differences").
    - `bf16`: None instead of False, resolved before `TrainingArguments.__post_init__`: True when a bf16-capable CUDA
      GPU is present and neither `use_cpu` nor `fp16` is set, else False.
    - `remove_unused_columns`: False instead of True (the collator needs every column).
    - `accelerator_config`: `{"dispatch_batches": False}` instead of None; a given dict without `dispatch_batches`
      gets it too. Dispatching batches from an IterableDataset slices every tensor to the row count, which cuts
      `pixel_values`.
    - `dataloader_num_workers`: 2 instead of 0; `save_total_limit`: 3 instead of None.
    - `ddp_find_unused_parameters`: False instead of None (the vision tower is built without its unused head).
    - `eval_strategy`: "steps" instead of "no" (`parse_args` makes it "no" when there is no validation data);
      `save_steps`: None (= `eval_steps`) instead of 500.
    - `metric_for_best_model`: "eval_loss" instead of None; `greater_is_better`: False instead of None.
    - `report_to`: "none" (explicitly; pass "wandb" or "tensorboard" to log).
    """

    # ---- nanoVLM's learning rates and schedule
    lr_mp: float = HfArg(
        default=0.00512,
        help="Learning rate of the modality projector (pixel shuffle + linear); 0 freezes it.",
    )
    lr_vision_backbone: float = HfArg(default=5e-5, help="Learning rate of the vision tower; 0 freezes it.")
    lr_language_backbone: float = HfArg(
        default=5e-5,
        help="Learning rate of the language model (and lm_head); 0 freezes it.",
    )
    weight_decay_exempt_biases_norms_embeddings: bool = HfArg(
        default=True,
        help="Apply --weight_decay to weight matrices only, not to biases, norms and embeddings (common practice). "
        "false decays every parameter, as the original nanoVLM's AdamW does.",
    )
    loss_normalization: str = HfArg(
        default="global_tokens",
        help="global_tokens: the loss summed over label tokens / the label tokens of the whole optimizer step (all "
        "micro-batches and processes), so every token weighs the same. micro_batch_mean: each micro-batch's mean / "
        "accumulation steps, averaged over processes, as the original nanoVLM does (a token of a short micro-batch "
        "weighs more).",
        metadata={"choices": LOSS_NORMALIZATIONS},
    )
    # ---- evaluation and robustness
    eval_interval: int = HfArg(
        default=500,
        help="Steps between validations; sets --eval_steps and --save_steps when they are not given.",
        metadata={"min": 1},
    )
    eval_max_batches: int | None = HfArg(
        default=None,
        help="Cap on validation batches per evaluation; None evaluates the whole set.",
        metadata={"min": 1},
    )
    lmms_eval_tasks: list[str] | None = HfArg(
        default=None,
        help="lmms-eval tasks to run on saved checkpoints (e.g. mmstar mme); None runs none.",
    )
    lmms_eval_interval: int | None = HfArg(
        default=None,
        help="Steps between lmms-eval runs; None = 2 x --eval_interval.",
        metadata={"min": 1},
    )
    lmms_eval_limit: float | None = HfArg(
        default=None,
        help="Documents per lmms-eval task (an int, or a fraction < 1); None: all.",
    )
    lmms_eval_batch_size: int = HfArg(default=8, help="Batch size of the lmms-eval runs.", metadata={"min": 1})
    lmms_eval_device: str | None = HfArg(
        default=None,
        help="Device of local lmms-eval processes (e.g. cuda:1, cpu); None: cuda when available.",
    )
    lmms_eval_slurm_template: str | None = HfArg(
        default=None,
        help="SLURM job template file, or 'default': evaluate through sbatch. None: local background processes.",
    )
    lmms_eval_results_dir: str | None = HfArg(
        default=None,
        help="Where step_N.json results go; None: OUTPUT_DIR/eval_results.",
    )
    lmms_eval_await_timeout: float = HfArg(
        default=3600,
        help="Seconds to wait for pending evaluations at the end of training.",
    )
    lmms_eval_max_concurrent: int = HfArg(default=1, help="Local evaluation processes at a time.", metadata={"min": 1})
    max_consecutive_nonfinite_losses: int = HfArg(
        default=5,
        help="A step whose loss is NaN/inf on any process is skipped (no weight or optimizer update) and counted in "
        "train/nonfinite_steps_skipped; the logged loss is the mean of the logging window's kept steps, NaN when all "
        "were skipped. A skipped step still counts toward --max_steps and the LR schedule advances as on any step. "
        "Training stops after this many such steps in a row; 0 never stops.",
        metadata={"min": 0},
    )
    resume_restart_data: bool = HfArg(
        default=False,
        help="With --resume_from_checkpoint: restore the model weights, optimizer, LR schedule, RNG and step count "
        "but NOT the data position: the data restarts from its beginning, so data/packing settings (--seq_length, "
        "--dataset_name_or_path, the number of processes, ...) may differ from the checkpoint's. The model settings "
        "must still match. Without it, a resume with changed settings is refused.",
    )
    compile: bool = HfArg(
        default=False,
        help="torch.compile the model (sets --torch_compile). Worth it on GPUs; on CPU the first compile costs 40-50 "
        "s for little gain.",
    )
    compile_regions: bool = HfArg(
        default=False,
        help="Compile each repeated block (decoder and SigLIP layers) once instead of the whole model: Accelerate's "
        "regional compilation (sets --torch_compile). On one H200 at the 460m shape: 0.412 s/step vs 0.532 eager, "
        "53 vs 64 GiB, ~100 s of compilation; whole-model compile had not reached its first step after 107 s "
        "(BENCHMARKS.md).",
    )
    # ---- LoRA (applied to the language model's decoder only: SigLIP has layers with the same names)
    use_lora: bool = HfArg(default=False, help="Train LoRA adapters on the language model.")
    lora_r: int = HfArg(default=16, help="LoRA rank.", metadata={"min": 1})
    lora_alpha: float = HfArg(default=32, help="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = HfArg(
        default=0.05,
        help="Dropout on the LoRA input, in [0, 1).",
        metadata={"range": (0, 1, False)},
    )
    lora_target_modules: list[str] = HfArg(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        help="Linear-layer names in the language model's decoder that get LoRA adapters.",
    )

    # ---- TrainingArguments fields with nanoVLM's defaults (listed in the class docstring)
    per_device_train_batch_size: int = HfArg(default=2, help="Batch size (packed rows) per device per micro-step.")
    gradient_accumulation_steps: int = HfArg(default=8, help="Micro-steps accumulated per optimizer step.")
    max_steps: int = HfArg(default=40000, help="Optimizer steps to train for.")
    learning_rate: float | None = HfArg(
        default=None,
        help="Unused: --lr_mp, --lr_vision_backbone and --lr_language_backbone replace it.",
    )
    lr_scheduler_type: SchedulerType | str = HfArg(
        default="cosine_with_min_lr",
        help="Schedule of every group's LR; nanoVLM's: linear warmup, then cosine to min_lr_rate.",
    )
    lr_scheduler_kwargs: dict | str | None = HfArg(
        default_factory=lambda: {"min_lr_rate": 0.1},
        help="Scheduler options (JSON object); min_lr_rate: the cosine's end, a fraction of each peak.",
    )
    warmup_steps: float = HfArg(
        default=0.03,
        help="Linear warmup: a step count, or below 1 a fraction of the total steps (nanoVLM: 0.03).",
    )
    logging_steps: float = HfArg(default=10, help="Log every this many steps.")
    bf16: bool | None = HfArg(
        default=None,
        help="bf16 mixed precision. None: on when a bf16-capable CUDA GPU is present, else off.",
    )
    remove_unused_columns: bool = HfArg(
        default=False,
        help="Keep False: the collator needs every column of the packed dataset.",
    )
    accelerator_config: dict | str | None = HfArg(
        default_factory=lambda: {"dispatch_batches": False},
        help="Accelerator options (JSON object, YAML mapping or a JSON file). dispatch_batches defaults to False: "
        "dispatching slices pixel_values to the row count.",
    )
    dataloader_num_workers: int = HfArg(default=2, help="Dataloader worker processes per rank.")
    save_total_limit: int | None = HfArg(default=3, help="Checkpoints kept on disk (oldest deleted).")
    report_to: None | str | list[str] = HfArg(default="none", help="Loggers: none, wandb, tensorboard, trackio, all.")
    ddp_find_unused_parameters: bool | None = HfArg(
        default=False,
        help="Keep False: every parameter gets a gradient (no pooling head).",
    )
    eval_strategy: IntervalStrategy | str = HfArg(
        default="steps",
        help="When to validate: steps (every --eval_steps), epoch or no.",
    )
    save_strategy: SaveStrategy | str = HfArg(default="steps", help="When to save: steps, epoch, best or no.")
    save_steps: float | None = HfArg(default=None, help="Save every this many steps; None = --eval_steps.")
    metric_for_best_model: str | None = HfArg(
        default="eval_loss",
        help="Metric that ranks checkpoints (best-checkpoint tracking).",
    )
    greater_is_better: bool | None = HfArg(default=False, help="Whether a larger --metric_for_best_model is better.")


    def __post_init__(self) -> None:
        errors = self._validate_nanovlm()
        if errors:
            raise ArgumentsError(errors)
        self._resolve_defaults()
        super().__post_init__()

    def _validate_nanovlm(self) -> list[str]:
        """Check nanoVLM's own fields (the bounds they declare, then the rules across fields); returns one message
        per problem."""
        errors = field_errors(self, skip=_BASE_FIELDS) + self._base_field_errors()
        lrs = {name: getattr(self, name) for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone")}
        for name, value in lrs.items():
            if not is_number(value) or not math.isfinite(value) or value < 0:
                errors.append(f"--{name} must be a finite number >= 0 (0 freezes that module): got {value!r}")
        if all(is_number(v) and v == 0 for v in lrs.values()):
            errors.append(
                "--lr_mp, --lr_vision_backbone and --lr_language_backbone must not all be 0 (nothing would train): "
                "got 0, 0, 0"
            )
        kwargs = self.lr_scheduler_kwargs
        if isinstance(kwargs, str) and kwargs.startswith("{"):
            kwargs = json.loads(kwargs)
        if isinstance(kwargs, dict) and "min_lr_rate" in kwargs:  # transformers accepts any value
            check_range(errors, "lr_scheduler_kwargs min_lr_rate", kwargs["min_lr_rate"], 0, 1)
        if self.weight_decay_exempt_biases_norms_embeddings is False and self.weight_decay == 0:
            errors.append(
                "--weight_decay_exempt_biases_norms_embeddings false has no effect with --weight_decay 0: got "
                "--weight_decay 0; set --weight_decay (the original nanoVLM: 0.01) or drop the flag"
            )
        self.lmms_eval_tasks = as_str_list(errors, "lmms_eval_tasks", self.lmms_eval_tasks)
        if self.lmms_eval_limit is not None and (not is_number(self.lmms_eval_limit) or self.lmms_eval_limit <= 0):
            errors.append(f"--lmms_eval_limit must be a number > 0 or None: got {self.lmms_eval_limit!r}")
        if not is_number(self.lmms_eval_await_timeout) or self.lmms_eval_await_timeout < 0:
            errors.append(f"--lmms_eval_await_timeout must be a number >= 0: got {self.lmms_eval_await_timeout!r}")
        if self.resume_restart_data is True and self.resume_from_checkpoint in (None, "", "false", "False"):
            errors.append(
                "--resume_restart_data needs a checkpoint to resume from: got no --resume_from_checkpoint; pass "
                "--resume_from_checkpoint true (the last in --output_dir) or a checkpoint folder"
            )
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            errors.append(f"--lora_alpha must be a number > 0: got {self.lora_alpha!r}")
        targets = as_str_list(errors, "lora_target_modules", self.lora_target_modules)
        if targets is not None:
            self.lora_target_modules = targets
            if self.use_lora is True and not targets:
                errors.append("--lora_target_modules must name at least one module with --use_lora true: got []")
        return errors

    def _base_field_errors(self) -> list[str]:
        """TrainingArguments fields it leaves unchecked, whose bad values would otherwise surface only after the data
        and the model are built (a DataLoader traceback, a modulo by zero) or be silently ignored."""
        errors: list[str] = []
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_int(errors, name, getattr(self, name), 1)
        check_int(errors, "dataloader_num_workers", self.dataloader_num_workers, 0)
        max_steps = self.max_steps
        if not is_int(max_steps) or max_steps < 1:  # Trainer's epoch mode needs a dataset length; a stream has none
            errors.append(
                f"--max_steps must be an integer >= 1 (the packed training data is a stream without a length, so the "
                f"run is counted in optimizer steps): got {max_steps!r}"
            )
        elif is_number(self.warmup_steps) and self.warmup_steps > max_steps:
            errors.append(
                f"--warmup_steps must be at most --max_steps ({max_steps}) or a fraction < 1 of it (nanoVLM: 0.03), "
                f"else the LR never reaches its peak: got {self.warmup_steps!r}"
            )
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:  # numpy's seeding refuses anything else
            errors.append(f"--seed must be an integer in [0, 2**32 - 1]: got {self.seed!r}")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm < 0):
            errors.append(f"--max_grad_norm must be a number >= 0 (0 turns clipping off): got {self.max_grad_norm!r}")
        strategy = getattr(self.save_strategy, "value", self.save_strategy)
        if strategy == "steps" and self.save_steps is not None and (
            not is_number(self.save_steps) or self.save_steps <= 0
        ):  # Trainer would never save mid-run, silently
            errors.append(
                f"--save_steps must be > 0 with --save_strategy steps (a step count, or below 1 a fraction of "
                f"--max_steps): got {self.save_steps!r}; or set --save_strategy no"
            )
        return errors

    def _use_cpu_for_several_processes_without_gpu(self) -> None:
        """Under torchrun / `accelerate launch` with several processes and no GPU, Trainer joins them into one DDP
        job on gloo only with `use_cpu`; without it every process trains alone on all the data, into one output
        folder. Set it, and say so once."""
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if self.use_cpu or world_size < 2 or _accelerator_available():
            return
        self.use_cpu = True
        if os.environ.get("RANK", "0") == "0":
            logger.warning(
                "%d processes and no GPU: training them as one DDP job on CPU (gloo), as with --use_cpu true.",
                world_size,
            )

    def _resolve_defaults(self) -> None:
        """Map nanoVLM's knobs onto TrainingArguments' fields before `TrainingArguments.__post_init__` sees them."""
        if self.learning_rate not in (None, self.lr_mp):
            logger.warning("--learning_rate=%r is unused: NanoVLMTrainer follows --lr_mp; setting it to %r",
                           self.learning_rate, self.lr_mp)
        self.learning_rate = self.lr_mp  # for code that reads it
        self._use_cpu_for_several_processes_without_gpu()
        if self.bf16 is None:
            self.bf16 = bool(not self.use_cpu and not self.fp16 and _bf16_supported())
        self.torch_compile = self.torch_compile or self.compile or self.compile_regions
        self.compile = self.torch_compile
        config = self.accelerator_config
        if isinstance(config, str) and config.startswith("{"):
            config = json.loads(config)
        if isinstance(config, dict):
            self.accelerator_config = {"dispatch_batches": False, **config}
        elif config is None:
            self.accelerator_config = {"dispatch_batches": False}
        if self.eval_steps is None:
            self.eval_steps = self.eval_interval
        if self.save_steps is None:
            self.save_steps = self.eval_steps
        if self.lmms_eval_interval is None:
            self.lmms_eval_interval = 2 * self.eval_interval


# --------------------------------------------------------------------------------------------------------------
# run names


def _short_name(name_or_path: str) -> str:
    """'google/siglip2-base-patch16-512' -> 'siglip2-base-patch16-512'; a folder -> its last part."""
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def _format_lr(lr: float) -> str:
    """0.00512 -> '5.1e-03', 5e-5 -> '5e-05', 0 -> '0' (frozen)."""
    if lr == 0:
        return "0"
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{exponent}"


def run_name(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "NanoVLMTrainingArguments",
    world_size: int | None = None,
    date: str | None = None,
) -> str:
    """nanoVLM's descriptive run name, e.g.
    `nanoVLM_siglip2-base-patch16-512_SmolLM2-360M-Instruct_8xGPU_bs128_40000steps_lr-mp5.1e-03-vis5e-05-lang5e-05_20261122`.

    Parts: the model (backbone short names; the checkpoint's name with `--model_name_or_path`; `random-init` for a
    random model built from `--model_config`), `synthetic` for the embedded dataset, processes and device kind,
    global batch (per-device x accumulation x world size), steps, the three learning rates, and the date.

    Args:
        world_size: processes taking part; None uses `training_args.world_size`.
        date: `YYYYMMDD`; None uses today.
    """
    if model_args.model_name_or_path is not None:
        model = _short_name(model_args.model_name_or_path)
    elif model_args.random_init and model_args.model_config is not None:
        model = "random-init"
    else:
        model = f"{_short_name(model_args.vision_model)}_{_short_name(model_args.text_model)}"
    world_size = training_args.world_size if world_size is None else world_size
    device = {"cuda": "GPU"}.get(training_args.device.type, training_args.device.type.upper())
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
    lrs = (
        f"lr-mp{_format_lr(training_args.lr_mp)}-vis{_format_lr(training_args.lr_vision_backbone)}"
        f"-lang{_format_lr(training_args.lr_language_backbone)}"
    )
    parts = ["nanoVLM", model]
    if data_args.synthetic_dataset:
        parts.append("synthetic")
    parts += [f"{world_size}x{device}", f"bs{batch}", f"{training_args.max_steps}steps", lrs]
    parts.append(date if date is not None else time.strftime("%Y%m%d"))
    return "_".join(parts)


__all__ = ["LORA_TARGET_MODULES", "LOSS_NORMALIZATIONS", "NanoVLMTrainingArguments", "run_name"]
