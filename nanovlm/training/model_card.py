"""The README.md model card of a NanoVLM, built from the model itself. Its one writer is `NanoVLMTrainer` (every save
and `push_to_hub`; `merge_lora_checkpoint` for the merged model): the model class knows nothing of cards.

The card has hub metadata (license, pipeline tag, library, tags, backbones and datasets when they are hub ids) and
sections for the architecture with the real parameter counts of each part, the training run, the evaluation
results, and a usage snippet that loads the model with `trust_remote_code=True`.

What the model cannot know by itself (data, steps, losses, evaluation) is its *training info*: a small JSON dict
saved next to the weights as `training_info.json` (written by `NanoVLMTrainer` with the card). Recognised keys, all
optional:

    dataset            str or list of str: the training data (hub ids or paths)
    steps              int: optimizer steps trained
    global_batch_size  int: rows per optimizer step over all processes and accumulation steps
    learning_rates     {"projector": float, "vision": float, "language": float} (0 = frozen)
    train_loss         float: the last logged training loss
    eval_loss          float: the last validation loss
    best_eval_loss     float: the best validation loss (its checkpoint is the one kept, with load_best_model_at_end)
    best_step          int: that checkpoint's step (the weights saved; `steps` is the last step trained)
    evaluation         {"test_accuracy": {question type: acc}, "blind_guess_accuracy": {...}} (synthetic data) and/or
                       {"metrics": {name: value}}
    finetuned_from     str: the checkpoint this run started from
    lora               {"r", "alpha", "dropout", "target_modules", "base_model"} for a LoRA adapter

Checkpoints saved by older versions carry a copy of this module as model_card_nanovlm.py (their modeling file
imported it); they still load, since they use their own copies.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from huggingface_hub import ModelCardData

logger = logging.getLogger(__name__)

TRAINING_INFO_NAME = "training_info.json"
CARD_TAGS = ("nanovlm", "vision-language", "image-text-to-text")
LICENSE = "apache-2.0"
PIPELINE_TAG = "image-text-to-text"
PROJECT_URL = "https://github.com/huggingface/nanoVLM"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PART_MARKERS = {"projector": "multi_modal_projector.", "vision": "vision_tower."}


# ---- facts about the model -------------------------------------------------------------------------------------
def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters per part: {"total", "vision", "projector", "language", "adapter"}.

    Tied weights count once. Works on a NanoVLM and on a PEFT-wrapped one: LoRA matrices count as "adapter" (not in
    "total"), and of a `modules_to_save` wrapper only the trained copy counts, so the parts are those of the merged
    model.
    """
    counts = dict.fromkeys(("total", "vision", "projector", "language", "adapter"), 0)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or ".original_module." in name:
            continue
        seen.add(id(param))
        if ".lora_" in name:
            counts["adapter"] += param.numel()
            continue
        part = next((p for p, marker in _PART_MARKERS.items() if marker in name), "language")
        counts[part] += param.numel()
        counts["total"] += param.numel()
    return counts


def backbone_names(config: Any) -> dict[str, str | None]:
    """{"vision": name, "text": name}: the hub ids / paths the backbones came from (None when built from a config)."""
    names = {}
    for part, sub in (("vision", config.vision_config), ("text", config.text_config)):
        name = getattr(sub, "_name_or_path", "") or ""
        names[part] = str(name) or None
    return names


def is_hub_id(name: Any) -> bool:
    """Whether `name` looks like a hub repo id (`owner/name`) and is not a local path."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


# ---- training info -----------------------------------------------------------------------------------------------
def save_training_info(info: dict[str, Any], directory: str | os.PathLike) -> str:
    """Write `info` as `training_info.json` into `directory`; returns the file's path."""
    path = os.path.join(directory, TRAINING_INFO_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
    return path


def read_training_info(name_or_path: str | os.PathLike) -> dict[str, Any] | None:
    """The training info saved in a checkpoint folder or hub repo, or None when it has none (or is unreachable)."""
    name_or_path = os.fspath(name_or_path)
    if not name_or_path:
        return None
    path = os.path.join(name_or_path, TRAINING_INFO_NAME)
    if not os.path.isdir(name_or_path):
        if not is_hub_id(name_or_path):
            return None
        try:
            from transformers.utils import cached_file

            path = cached_file(
                name_or_path, TRAINING_INFO_NAME, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception as err:  # an unreachable hub must not break saving or pushing
            logger.info("No %s for %s: %s", TRAINING_INFO_NAME, name_or_path, err)
            return None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)



# ---- the card ----------------------------------------------------------------------------------------------------
def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f}{unit})"
    return f"{n:,}"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _image_sentence(config: Any) -> str:
    """How an image becomes tokens; with `max_grid` 1 there are no tiles, only the global view (the processor emits
    the tile blocks only for images of more than one tile)."""
    side, tokens = config.vision_config.image_size, config.image_seq_len
    if getattr(config, "max_grid", None) == 1:
        return f"Each image becomes one {side} px view of {tokens} image tokens."
    return f"Each image becomes {side} px tiles plus a global view, {tokens} image tokens each."


def _architecture_section(model: Any, counts: dict[str, int]) -> str:
    config = model.config
    vc, tc = config.vision_config, config.text_config
    names = backbone_names(config)
    s = config.pixel_shuffle_factor
    grid = vc.image_size // vc.patch_size
    vision = (
        f"{names['vision'] or 'random init'} ({vc.model_type}, {vc.num_hidden_layers} layers, hidden "
        f"{vc.hidden_size}, {vc.image_size} px tiles, {vc.patch_size} px patches)"
    )
    projector = f"pixel shuffle x{s} ({grid}x{grid} patches -> {config.image_seq_len} tokens) + linear " \
        f"({vc.hidden_size * s * s} -> {tc.hidden_size})"
    text = (
        f"{names['text'] or 'random init'} ({tc.model_type}, {tc.num_hidden_layers} layers, hidden "
        f"{tc.hidden_size}, vocabulary {tc.vocab_size:,})"
    )
    rows = [
        "| part | backbone | parameters |",
        "|---|---|---|",
        f"| vision tower | {vision} | {_fmt_count(counts['vision'])} |",
        f"| projector | {projector} | {_fmt_count(counts['projector'])} |",
        f"| language model | {text} | {_fmt_count(counts['language'])} |",
        f"| **total** | | **{_fmt_count(counts['total'])}** |",
    ]
    lines = [
        "## Model",
        "",
        "SigLIP vision tower -> pixel-shuffle projector -> causal language model, in transformers' standard VLM "
        "layout (`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`). "
        + _image_sentence(config),
        "",
        *rows,
    ]
    if counts["adapter"]:
        lines += ["", f"LoRA adapter parameters (not in the total): {_fmt_count(counts['adapter'])}."]
    return "\n".join(lines)


def _training_section(info: dict[str, Any]) -> str:
    lines = ["## Training", ""]
    datasets = _as_list(info.get("dataset"))
    lines.append(f"- data: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}")
    if info.get("finetuned_from"):
        lines.append(f"- finetuned from: `{info['finetuned_from']}`")
    if info.get("steps") is not None:
        batch = info.get("global_batch_size")
        lines.append(f"- steps: {info['steps']:,}" + (f" (global batch {batch} packed rows)" if batch else ""))
    lrs = info.get("learning_rates") or {}
    if lrs:
        parts = ", ".join(f"{part} {lr:g}" + (" (frozen)" if lr == 0 else "") for part, lr in lrs.items())
        lines.append(f"- learning rates: {parts}")
    lora = info.get("lora")
    if lora:
        lines.append(
            f"- LoRA on the language model: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout="
            f"{lora.get('dropout')}, targets {', '.join(_as_list(lora.get('target_modules')))}"
        )
    if info.get("train_loss") is not None:
        lines.append(f"- final training loss: {info['train_loss']:.4f}")
    return "\n".join(lines)


def _evaluation_section(info: dict[str, Any]) -> str | None:
    evaluation = dict(info.get("evaluation") or {})
    lines = ["## Evaluation", ""]
    if info.get("eval_loss") is not None:
        lines.append(f"- validation loss (last evaluation): {info['eval_loss']:.4f}")
    if info.get("best_eval_loss") is not None:
        at = f" at step {info['best_step']}" if info.get("best_step") is not None else ""
        lines.append(f"- best validation loss{at} (the checkpoint kept): {info['best_eval_loss']:.4f}")
    for name, value in (evaluation.get("metrics") or {}).items():
        lines.append(f"- {name}: {value:.4f}" if isinstance(value, float) else f"- {name}: {value}")
    accuracy = evaluation.get("test_accuracy") or {}
    if accuracy:
        blind = evaluation.get("blind_guess_accuracy") or {}
        lines += [""] * (len(lines) > 2)  # a blank line after the loss list only: one follows the heading already
        lines += ["Held-out accuracy on the synthetic test set (greedy answers), beside the blind guess (the "
                  "majority answer of each question type):", "",
                  "| question type | accuracy | blind guess |", "|---|---|---|"]
        for qtype, acc in accuracy.items():
            guess = blind.get(qtype)
            lines.append(f"| {qtype} | {acc:.3f} | {'' if guess is None else f'{guess:.3f}'} |")
    return "\n".join(lines) if len(lines) > 2 else None


def _usage_section(repo: str, adapter_base: str | None) -> str:
    if adapter_base is not None:
        load = (
            f'base = AutoModel.from_pretrained("{adapter_base}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(base, "{repo}").merge_and_unload()  # a plain NanoVLM again\n'
            f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)'
        )
        imports = "from peft import PeftModel\nfrom PIL import Image\nfrom transformers import AutoModel, AutoProcessor"
        intro = "This repository holds a LoRA adapter (and the processor); it loads on top of its base model:"
    else:
        load = (
            f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)'
        )
        imports = "from PIL import Image\nfrom transformers import AutoModel, AutoProcessor"
        intro = "The repository carries its own model code: any recent `transformers` loads it, nothing else needed."
    if not is_hub_id(repo):  # the trainer names a local run's folder; once uploaded, readers need the hub id
        load = f'# "{repo}" is a local folder: after `hf upload you/name {repo}`, pass "you/name"\n' + load
    return f"""## Usage

{intro}

```python
{imports}

{load}
image = Image.open("image.png")
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def build_model_card(
    model: Any,
    repo_id: str | None = None,
    training_info: dict[str, Any] | None = None,
    tags: list[str] | str | None = None,
    language: str | list[str] | None = None,
) -> str:
    """The model card (README.md text with YAML front matter) of `model`.

    Args:
        model: a `NanoVLMForConditionalGeneration`, or a PEFT model wrapping one (then the card describes the
            adapter: `library_name: peft`, the base model, and a usage snippet loading the adapter on it).
        repo_id: the hub repo (title and usage snippet); None uses the model's `name_or_path`.
        training_info: see the module docstring; None reads the `training_info.json` saved where the model was
            loaded from (none: the card says no training information was recorded).
        tags: extra hub tags (nanovlm, vision-language and image-text-to-text are always there).
        language: the card's `language` metadata.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if training_info is None:
        training_info = read_training_info(getattr(base, "name_or_path", "") or "")
    info = dict(training_info or {})
    counts = parameter_counts(model)
    repo = repo_id or str(getattr(base, "name_or_path", "") or "path/to/checkpoint")
    lora = info.get("lora") or None
    adapter_base = None
    if counts["adapter"]:
        adapter_base = str((lora or {}).get("base_model") or getattr(base, "name_or_path", "") or "base/model")

    card_tags = list(CARD_TAGS)
    for tag in _as_list(tags) + (["lora"] if adapter_base else []):
        if tag not in card_tags:
            card_tags.append(tag)
    names = backbone_names(base.config)
    base_models = [adapter_base] if adapter_base else [n for n in (names["vision"], names["text"]) if n]
    if not adapter_base and info.get("finetuned_from"):
        base_models = [info["finetuned_from"]]
    data = ModelCardData(
        language=language,
        license=LICENSE,
        library_name="peft" if adapter_base else "transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=card_tags,
        base_model=[b for b in base_models if is_hub_id(b)] or None,
        datasets=[d for d in _as_list(info.get("dataset")) if is_hub_id(d)] or None,
    )
    kind = "a LoRA adapter for a nanoVLM vision-language model" if adapter_base else "a nanoVLM vision-language model"
    sections = [
        f"# {repo.rstrip('/').split('/')[-1]}",
        f"{repo} is {kind} ([nanoVLM]({PROJECT_URL}) recipe, rebuilt on transformers): it answers questions about "
        "images and follows a ChatML chat template.",
        _architecture_section(base, counts),
        _training_section(info) if info else "## Training\n\nNo training information was recorded with this model.",
        _evaluation_section(info) if info else None,
        _usage_section(repo, adapter_base),
        f"## License\n\n{LICENSE}; the backbones keep their own licenses.",
    ]
    body = "\n\n".join(s for s in sections if s)
    return f"---\n{data.to_yaml()}\n---\n\n{body}\n"


def write_model_card(model: Any, directory: str | os.PathLike, **kwargs: Any) -> str:
    """Write `build_model_card(model, **kwargs)` to `directory/README.md`; returns the file's path."""
    path = os.path.join(directory, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(build_model_card(model, **kwargs))
    return path


__all__ = [
    "TRAINING_INFO_NAME",
    "build_model_card",
    "write_model_card",
    "parameter_counts",
    "backbone_names",
    "read_training_info",
    "save_training_info",
]
