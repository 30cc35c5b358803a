"""LoRA finetuning of NanoVLM's language model with PEFT, and merging an adapter back into a full checkpoint.

Scope: adapters go on the decoder's linear layers only. Names such as `q_proj` also exist in the SigLIP tower
(`model.vision_tower.encoder.layers.N.self_attn.q_proj`), so the targets are a regex on the decoder's module path
(`model.language_model.<...>.q_proj`), never bare names.

The other parts follow their learning rates, as in full training (`NanoVLMTrainer` groups parameters by the markers
`multi_modal_projector`, `vision_tower`, `language_model`, which survive PEFT's `base_model.model.` prefix and its
`modules_to_save.default.` wrappers):

| part           | LR > 0                                                      | LR = 0 |
|----------------|-------------------------------------------------------------|--------|
| projector      | trained in full, saved with the adapter (`modules_to_save`) | frozen |
| vision tower   | trained in full, saved with the adapter (`modules_to_save`) | frozen |
| language model | LoRA A/B at `lr_language_backbone`; base weights frozen     | error  |

Embeddings and `lm_head` stay frozen (the image and tile tokens were trained with the checkpoint being finetuned).

Usage (train_accelerate.py does this with `--use_lora true`):

    model = apply_lora(model, training_args)          # a peft.PeftModel; NanoVLMTrainer trains and saves it
    merge_lora_checkpoint("outputs/lora/final", "outputs/lora/merged")  # a full NanoVLM checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from .checks import check_output_folder, is_local_path
from .errors import UsageError
from .model_card import parameter_counts, read_training_info, save_training_info, write_model_card

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from ..modeling_nanovlm import NanoVLMForConditionalGeneration
    from .arguments import NanoVLMTrainingArguments

logger = logging.getLogger(__name__)

LANGUAGE_MODEL_PATH = "model.language_model"
PROJECTOR_MODULE = "multi_modal_projector"
VISION_MODULE = "vision_tower"


def language_model_target_regex(target_modules: Sequence[str]) -> str:
    """A regex (matched by PEFT against full module names) selecting `target_modules` inside the language model only,
    e.g. `model\\.language_model\\..*\\.(q_proj|v_proj)`."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"{re.escape(LANGUAGE_MODEL_PATH)}\..*\.({names})"


def _decoder_linear_names(model: nn.Module) -> set[str]:
    """Last name components of the linear layers inside the language model."""
    prefix = LANGUAGE_MODEL_PATH + "."
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, nn.Linear)}


def lora_config_for(model: nn.Module, training_args: NanoVLMTrainingArguments) -> LoraConfig:
    """The `peft.LoraConfig` for `model` from `training_args` (`lora_r`, `lora_alpha`, `lora_dropout`,
    `lora_target_modules`, and `lr_mp` / `lr_vision_backbone` for `modules_to_save`).

    Raises `UsageError` (a ValueError that train_accelerate.py prints as one line) when the language model would not
    train (`lr_language_backbone` 0) or a target name is not a
    linear layer of the language model.
    """
    from peft import LoraConfig

    if not training_args.lr_language_backbone > 0:
        lr = training_args.lr_language_backbone
        raise UsageError(
            f"--use_lora true trains LoRA adapters at --lr_language_backbone, got {lr}: set --lr_language_backbone "
            "> 0 (e.g. 1e-4), or --use_lora false to train only the projector/vision tower."
        )
    targets = list(training_args.lora_target_modules)
    available = _decoder_linear_names(model)
    missing = [name for name in targets if name not in available]
    if missing or not targets:
        raise UsageError(
            f"--lora_target_modules must name linear layers of the language model: {missing or targets} not found; "
            f"choose from {sorted(available)}."
        )
    modules_to_save = []
    if training_args.lr_mp > 0:
        modules_to_save.append(PROJECTOR_MODULE)
    if training_args.lr_vision_backbone > 0:
        modules_to_save.append(VISION_MODULE)
    return LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        target_modules=language_model_target_regex(targets),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: NanoVLMForConditionalGeneration, training_args: NanoVLMTrainingArguments) -> PeftModel:
    """Wrap a `NanoVLMForConditionalGeneration` in a `peft.PeftModel` with LoRA on its language model.

    The projector and the vision tower are trained in full (and saved with the adapter) when their LR is > 0, frozen
    otherwise; every other base weight is frozen. Logs the trainable parameter counts.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model is already a PeftModel (adapters {list(model.peft_config)}); apply_lora expects a plain "
            "NanoVLMForConditionalGeneration: merge the adapter first (merge_and_unload) or load the base model."
        )
    config = lora_config_for(model, training_args)
    base_total = parameter_counts(model)["total"]
    peft_model = get_peft_model(model, config)
    if getattr(training_args, "gradient_checkpointing", False):
        peft_model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad input
    trainable = {"adapter": 0, "projector": 0, "vision": 0}
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        key = "adapter" if ".lora_" in name else "projector" if f"{PROJECTOR_MODULE}." in name else "vision"
        trainable[key] += param.numel()
    total_trainable = sum(trainable.values())
    logger.info(
        "LoRA r=%d alpha=%g dropout=%g on the language model's %s: trainable %d of %d base parameters (%.2f%%): "
        "adapters %d, projector %d, vision tower %d",
        config.r, config.lora_alpha, config.lora_dropout, ", ".join(training_args.lora_target_modules),
        total_trainable, base_total, 100 * total_trainable / max(base_total, 1),
        trainable["adapter"], trainable["projector"], trainable["vision"],
    )
    return peft_model


def lora_info(peft_model: PeftModel) -> dict:
    """The adapter's settings as the model card reports them (`training_info["lora"]`)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = config.target_modules
    head = language_model_target_regex([""])[:-1]  # `model\.language_model\..*\.(`
    if isinstance(targets, str) and targets.startswith(head) and targets.endswith(")"):  # our regex: its names
        targets = [re.sub(r"\\(.)", r"\1", name) for name in targets[len(head):-1].split("|")]
    elif isinstance(targets, str):
        targets = [targets]
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(config.modules_to_save or []),
        "base_model": config.base_model_name_or_path,
    }


def merge_lora_checkpoint(
    adapter_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> NanoVLMForConditionalGeneration:
    """Load a base NanoVLM and a saved adapter, merge them (`merge_and_unload`) and save a full checkpoint.

    The output is a plain NanoVLM checkpoint (weights, config with `auto_map`, model code, processor, and the adapter
    run's training info and model card) that `AutoModel.from_pretrained(output_dir, trust_remote_code=True)` loads.
    The processor is taken from the adapter folder (NanoVLMTrainer saves it there), else from the base model.

    Args:
        adapter_path: a folder written by `PeftModel.save_pretrained` / `NanoVLMTrainer.save_model`.
        output_dir: where to write the merged checkpoint.
        base_model_name_or_path: the base checkpoint; None uses `base_model_name_or_path` of the adapter config.
        overwrite: replace a non-empty `output_dir` (its old files are deleted); never the adapter or base folder.

    Returns the merged `NanoVLMForConditionalGeneration`.
    """
    from peft import PeftModel
    from transformers import AutoProcessor

    from ..modeling_nanovlm import NanoVLMForConditionalGeneration

    adapter_path = os.fspath(adapter_path)
    config_path = os.path.join(adapter_path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{adapter_path} has no adapter_config.json: pass a folder saved from a LoRA run (e.g. OUTPUT_DIR/final "
            "of a --use_lora true run)."
        )
    if base_model_name_or_path is None:
        with open(config_path) as f:
            base_model_name_or_path = json.load(f).get("base_model_name_or_path")
        if not base_model_name_or_path:
            raise ValueError(f"{config_path} records no base_model_name_or_path: pass base_model_name_or_path.")
    base = os.fspath(base_model_name_or_path)
    if is_local_path(base) and not os.path.isdir(os.path.expanduser(base)):  # else the hub's "Repo id must be ..."
        raise FileNotFoundError(f"merge_lora_checkpoint: the base model {base} is no folder here (a relative path is "
                                "read from the working directory); pass base_model_name_or_path=PATH")
    check_output_folder(os.fspath(output_dir), {"adapter": adapter_path, "base model": base}, overwrite,
                        name="merge_lora_checkpoint: output_dir", overwrite_flag="overwrite=True")
    base = NanoVLMForConditionalGeneration.from_pretrained(base_model_name_or_path)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    if overwrite and os.path.isdir(output_dir):  # no stale files (optimizer, adapter) beside the merged weights
        shutil.rmtree(output_dir)
    merged.save_pretrained(output_dir)
    # this run's training info and card, not the base model's (which `name_or_path` would point the card at)
    info = read_training_info(adapter_path) or {"finetuned_from": os.fspath(base_model_name_or_path)}
    save_training_info(info, output_dir)
    write_model_card(merged, output_dir, repo_id=os.fspath(output_dir), training_info=info)
    processor_source = adapter_path if os.path.isfile(os.path.join(adapter_path, "processor_config.json")) else (
        base_model_name_or_path)
    AutoProcessor.from_pretrained(processor_source).save_pretrained(output_dir)
    logger.info("Merged %s into %s: saved %s", adapter_path, base_model_name_or_path, output_dir)
    return merged


__all__ = ["apply_lora", "lora_config_for", "lora_info", "language_model_target_regex", "merge_lora_checkpoint"]
