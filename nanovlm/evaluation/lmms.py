"""lmms-eval (0.7.x) model adapter for NanoVLM, registered as "nanovlm_hf".

lmms-eval ships an unrelated model called "nanovlm" (a different architecture, needing `lmms_engine`), so this
adapter uses the id `nanovlm_hf`. The CLI finds it through the `lmms_eval.models` entry-point group (see
`lmms_eval_manifest`); Python code can call `register_with_lmms_eval()` instead, or pass an adapter object to
`lmms_eval.evaluator.simple_evaluate`.

    python -m lmms_eval --model nanovlm_hf --model_args pretrained=outputs/demo/final,batch_size=16 \
        --tasks nanovlm_synthetic --include_path "$(python -m nanovlm.evaluation.tasks)"

What differs from the original nanoVLM wrapper and from lmms-eval's conventions:
- `loglikelihood` is implemented (nanoVLM raises NotImplementedError), so multiple-choice tasks work. lmms-eval 0.7.3
  picks the answer with `argmin` over what the model returns (its HF models return a loss) and turns any plain
  `(value, is_greedy)` tuple into a string before scoring. This adapter therefore returns the negative
  log-likelihood (summed over the continuation tokens; lower is better), wrapped in a `GenerationResult` so the
  tuple reaches the task intact. `score_continuations` gives the plain `(sum of log-probs, is_greedy)` pairs.
  Consequence: lmms-eval's `acc_mutual_info` (an argmax over differences) is inverted and not supported.
- Per-task prompt formatting follows nanoVLM's table (`nanovlm.evaluation.prompts`), with its "chartvqa" entry
  spelled as the task is actually called (`chartqa`).
- `clean()` keeps the model: lmms-eval deletes every `nn.Module` attribute of its model after each run, which would
  break a second `simple_evaluate` call and would drop a model a training job passed in.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from transformers import AutoProcessor

from ..devices import resolve_device, resolve_dtype
from ..image_processing_nanovlm import load_image
from ..modeling_nanovlm import NanoVLMForConditionalGeneration
from ..processing_nanovlm import NanoVLMProcessor
from .prompts import NO_FORMAT, cut_at_stop_strings, prompt_format_for

logger = logging.getLogger(__name__)

MODEL_ID = "nanovlm_hf"
CLASS_PATH = "nanovlm.evaluation.lmms.NanoVLMLmms"


# --------------------------------------------------------------------------------------------------------------
# registration


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: lmms-eval's CLI calls this while building its model registry.

    setup.cfg: `[options.entry_points]` / `lmms_eval.models = nanovlm_hf = nanovlm.evaluation.lmms:lmms_eval_manifest`
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def register_with_lmms_eval() -> None:
    """Make `--model nanovlm_hf` resolvable in this process (for when the entry point is not installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


# --------------------------------------------------------------------------------------------------------------
# devices and processes


def distributed_context() -> tuple[int, int, int]:
    """(global rank, world size, local rank) of this process: from torch.distributed when it is initialised, else
    from the RANK / WORLD_SIZE / LOCAL_RANK variables torchrun and accelerate set (0, 1, 0 when alone)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank


def _resolve_device(device: str | torch.device | None, world_size: int, local_rank: int) -> torch.device:
    if world_size > 1 and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")  # data parallel: one GPU per process
    return resolve_device(device)


def _to_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or isinstance(value, bool) or (isinstance(value, float) and value != number):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {name}=8.")
    return number


# --------------------------------------------------------------------------------------------------------------
# the adapter


def load_checkpoint(
    pretrained: str | os.PathLike, **from_pretrained_kwargs: Any
) -> tuple[NanoVLMForConditionalGeneration, str | os.PathLike]:
    """(model, where its processor is) for a NanoVLM checkpoint, or for a LoRA adapter folder (`adapter_config.json`,
    as `--use_lora` runs save): its base model with the adapter merged in, and the adapter's processor if it has one.
    """
    adapter_config = Path(pretrained) / "adapter_config.json"
    if not adapter_config.is_file():
        return NanoVLMForConditionalGeneration.from_pretrained(pretrained, **from_pretrained_kwargs), pretrained
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(
            f"{adapter_config} records no base_model_name_or_path; merge the adapter first with "
            "nanovlm.training.lora.merge_lora_checkpoint(adapter_path, output_dir, base_model_name_or_path)."
        )
    base = NanoVLMForConditionalGeneration.from_pretrained(base_path, **from_pretrained_kwargs)
    model = PeftModel.from_pretrained(base, os.fspath(pretrained)).merge_and_unload()
    has_processor = (Path(pretrained) / "processor_config.json").is_file()
    logger.info("%s: merged the LoRA adapter %s into %s", MODEL_ID, pretrained, base_path)
    return model, pretrained if has_processor else base_path


def _model_and_processor(
    pretrained: str | os.PathLike | torch.nn.Module,
    processor: NanoVLMProcessor | None,
    device: torch.device | None,
    dtype: str | torch.dtype | None,
    attn_implementation: str | None,
    revision: str | None,
) -> tuple[torch.nn.Module, NanoVLMProcessor]:
    """The adapter's model (on `device`, default: where it is for a model object, else `resolve_device`) and
    processor. A model object (a PreTrainedModel, or a PeftModel: not one, but it forwards generate/device/dtype to
    it) keeps its dtype unless `dtype` is given; a checkpoint loads in `resolve_dtype(dtype)`."""
    if isinstance(pretrained, torch.nn.Module):
        if processor is None:
            raise ValueError(f"{MODEL_ID} with a model object needs its processor: pass processor=...")
        if device is not None:
            pretrained.to(device)
        if dtype is not None:
            pretrained.to(resolve_dtype(dtype, pretrained.device))
        return pretrained, processor
    device = device or resolve_device(None)
    hub = {"revision": revision} if revision else {}
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, processor_source = load_checkpoint(pretrained, dtype=resolve_dtype(dtype, device), **hub, **attn)
    return model.to(device), processor or AutoProcessor.from_pretrained(processor_source, **hub)


@dataclass
class _Request:
    """One request, normalised: what the model sees and where its answer goes."""

    index: int
    context: str
    images: list = field(default_factory=list)
    task: str | None = None
    gen_kwargs: dict = field(default_factory=dict)
    continuation: str = ""


@register_model(MODEL_ID)
class NanoVLMLmms(lmms):
    """lmms-eval model for NanoVLM checkpoints (a folder or hub id) or a live model from a training job.

    Args:
        pretrained: checkpoint folder or hub id (a LoRA adapter folder is merged into its base model), or a
            `NanoVLMForConditionalGeneration` object, or a PEFT (LoRA) model around one, as a training job holds it
            (then `processor` is required, and the model keeps its device and dtype unless `device` / `dtype` are
            given).
        processor: the `NanoVLMProcessor` to use with a model object (loaded from `pretrained` otherwise).
        device: "cuda", "cuda:1", "cpu" or None/"auto". Under torchrun/accelerate with several processes on GPUs,
            each process uses cuda:LOCAL_RANK.
        batch_size: requests per forward/generate call.
        dtype: "auto" (bf16 on capable GPUs, else fp32), "float32", "bfloat16" or "float16".
        max_new_tokens: generation length when the task does not set one (`--gen_kwargs` and task YAMLs win).
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2", "flex_attention".
        format_prompts: apply nanoVLM's per-task prompt formatting (`nanovlm.evaluation.prompts`).
        revision: hub revision of `pretrained`.
        max_batch_size: accepted for lmms-eval's CLI and ignored (no automatic batch sizing).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | os.PathLike | torch.nn.Module | None = None,
        processor: NanoVLMProcessor | None = None,
        device: str | torch.device | None = None,
        batch_size: int | str = 8,
        dtype: str | torch.dtype | None = None,
        max_new_tokens: int | str = 64,
        attn_implementation: str | None = None,
        format_prompts: bool = True,
        revision: str | None = None,
        max_batch_size: int | None = None,
        **unexpected: Any,
    ) -> None:
        super().__init__()
        if unexpected:
            raise ValueError(
                f"Unknown model_args for {MODEL_ID}: {sorted(unexpected)}; valid ones are pretrained, batch_size, "
                "device, dtype, max_new_tokens, attn_implementation, format_prompts, revision."
            )
        if pretrained is None:
            raise ValueError(f"{MODEL_ID} needs a checkpoint: pass --model_args pretrained=<folder or hub id>.")
        self._batch_size = _to_int("batch_size", batch_size)
        self.max_new_tokens = _to_int("max_new_tokens", max_new_tokens)
        self.format_prompts = bool(format_prompts)
        self._rank, self._world_size, local_rank = distributed_context()
        if self._world_size > 1 and not dist.is_initialized():
            from accelerate import Accelerator

            self.accelerator = Accelerator()  # joins the launcher's process group; lmms-eval gathers through it

        placed = device is not None or self._world_size > 1  # else a model object stays where it is
        target = _resolve_device(device, self._world_size, local_rank) if placed else None
        self._model, self.processor = _model_and_processor(pretrained, processor, target, dtype, attn_implementation,
                                                           revision)  # fmt: skip
        if not isinstance(self.processor, NanoVLMProcessor):
            raise TypeError(f"{MODEL_ID} needs a NanoVLMProcessor, got {type(self.processor).__name__}.")
        self._model.eval()
        self.tokenizer = self.processor.tokenizer
        source = pretrained if isinstance(pretrained, (str, os.PathLike)) else type(pretrained).__name__
        logger.info("%s: %s on %s (%s), rank %d of %d, batch size %d", MODEL_ID, source, self.device,
                    self._model.dtype, self._rank, self._world_size, self._batch_size)  # fmt: skip

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NanoVLMLmms:
        """`--model_args a=1,b=2` plus the CLI's `--batch_size` / `--device`; a value in model_args wins (the CLI
        always passes a batch size, so the base class would fail with 'got multiple values')."""
        from lmms_eval.utils import simple_parse_args_string

        kwargs = {k: v for k, v in (additional_config or {}).items() if v is not None}
        kwargs.update(simple_parse_args_string(arg_string))
        return cls(**kwargs)

    # ---- lmms-eval's expected attributes -------------------------------------------------------------------------
    @property
    def model(self) -> NanoVLMForConditionalGeneration:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def clean(self) -> None:
        """Free cached memory but keep the model (see the module docstring)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- prompts and inputs --------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual: Callable | None, doc_id: Any, task: str | None, split: str | None) -> list:
        if doc_to_visual is None or task is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [load_image(v) for v in visuals if v is not None]

    def build_prompt(self, context: str, num_images: int, task: str | None = None) -> str:
        """The chat-formatted prompt: one user turn (the images, then the formatted context) and the assistant
        header, followed by the task's assistant prefix."""
        fmt = prompt_format_for(task) if self.format_prompts else NO_FORMAT
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": fmt.format_user(context)}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return prompt + fmt.assistant_prefix

    def _encode(self, requests: Sequence[_Request]) -> dict[str, torch.Tensor]:
        """Left-padded input_ids/attention_mask (+ pixel_values) for a batch of requests."""
        prompts = [self.build_prompt(r.context, len(r.images), r.task) for r in requests]
        images = [r.images for r in requests]
        old_side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            inputs = self.processor(
                text=prompts, images=images if any(images) else None, padding=True, return_tensors="pt"
            )
        finally:
            self.tokenizer.padding_side = old_side
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _batches(self, requests: list[_Request], key: Callable[[_Request], Any] | None = None):
        """Batches of at most `batch_size` requests, longest first, grouped by `key` (e.g. generation kwargs)."""
        groups: dict[Any, list[_Request]] = {}
        for r in requests:
            groups.setdefault(key(r) if key else None, []).append(r)
        for group in groups.values():
            group.sort(key=lambda r: (-(len(r.context) + len(r.continuation) + 1000 * len(r.images)), r.index))
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=self.rank != 0)

    # ---- generation ----------------------------------------------------------------------------------------------
    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """lmms-eval generation kwargs -> (transformers `generate` kwargs, stop strings)."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = gen_kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample) and temperature != 0.0
        out = {
            "max_new_tokens": _to_int("max_new_tokens", gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
            "do_sample": do_sample,
            "num_beams": _to_int("num_beams", gen_kwargs.pop("num_beams", 1)),
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        top_p = gen_kwargs.pop("top_p", None)
        if do_sample:
            out["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                out["top_p"] = float(top_p)
        else:  # greedy: no sampling knobs, so the checkpoint's generation_config cannot turn sampling on
            out.update(temperature=None, top_p=None, top_k=None)
        if gen_kwargs:
            logger.debug("ignoring generation kwargs %s", sorted(gen_kwargs))
        return out, until

    @torch.no_grad()
    def _generate(self, batch: Sequence[_Request]) -> list[str]:
        generate_kwargs, until = self._generation_kwargs(batch[0].gen_kwargs)
        inputs = self._encode(batch)
        output = self._model.generate(**inputs, **generate_kwargs)  # (B, T_prompt + T_new)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop_strings(text, until) for text in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched, left-padded generation; greedy unless `do_sample` with a temperature > 0; each output is cut at
        the first of the request's `until` strings."""
        items = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            items.append(_Request(i, context, self._visuals(doc_to_visual, doc_id, task, split), task, gen_kwargs))
        results: list[str | None] = [None] * len(items)
        progress = self._progress(len(items), f"{MODEL_ID} generating")
        for batch in self._batches(items, key=lambda r: json.dumps(r.gen_kwargs, sort_keys=True, default=str)):
            for r, text in zip(batch, self._generate(batch)):
                results[r.index] = text
            progress.update(len(batch))
        progress.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation (lmms-eval's protocol): round 0 answers the context; then the task's `doc_to_text`
        is called with `previous_output`, `round_idx` and `previous_round_info` and returns (visuals, context,
        terminal signal, previous outputs, round info) until its terminal signal. Returns every round's answer."""
        results = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            outputs: list[str] = []
            info, round_idx = None, 0
            while True:
                if round_idx > 0:
                    doc = self.task_dict[task][split][doc_id]
                    visuals, context, terminal, previous, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                    )
                    if terminal:
                        break
                    outputs = list(previous) if previous is not None else outputs
                    visuals = [load_image(v) for v in (visuals or []) if v is not None]
                outputs.append(self._generate([_Request(i, context, visuals, task, gen_kwargs)])[0])
                round_idx += 1
            results.append(outputs)
        return results

    # ---- log-likelihood ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_batch(self, batch: Sequence[_Request]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation tokens, whether greedy decoding would produce them) per request.

        Sequences (prompt + continuation) are left-padded so every continuation ends at the last position: only the
        last max(len(continuation)) + 1 positions need logits. Position ids count real tokens, as in `generate`.
        """
        inputs = self._encode(batch)
        conts = [self.tokenizer(r.continuation, add_special_tokens=False)["input_ids"] for r in batch]
        rows = [
            ids[mask.bool()].tolist() + cont
            for ids, mask, cont in zip(inputs["input_ids"], inputs["attention_mask"], conts)
        ]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(c) for c in conts) + 1
        logits = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=inputs.get("pixel_values"),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (B, keep, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for i, cont in enumerate(conts):
            if not cont:
                scores.append((0.0, True))
                continue
            steps = logprobs[i, keep - 1 - len(cont) : keep - 1]  # (C, V): the positions that predict the continuation
            target = torch.tensor(cont, device=steps.device)
            total = steps.gather(-1, target[:, None]).sum().item()
            scores.append((total, bool((steps.argmax(-1) == target).all())))
        return scores

    def _loglikelihood_requests(self, requests: list[Instance]) -> list[_Request]:
        items = []
        for i, request in enumerate(requests):
            args = request.args
            if len(args) == 2:  # lmms-eval's unconditional requests for acc_mutual_info: (context, continuation)
                items.append(_Request(i, args[0], [], None, continuation=args[1]))
                continue
            context, continuation, doc_to_visual, doc_id, task, split = args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            items.append(_Request(i, context, visuals, task, continuation=continuation))
        return items

    def score_continuations(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation given context + images, is_greedy) per loglikelihood request."""
        items = self._loglikelihood_requests(requests)
        scores: list[tuple[float, bool] | None] = [None] * len(items)
        progress = self._progress(len(items), f"{MODEL_ID} scoring")
        for batch in self._batches(items):
            for r, score in zip(batch, self._score_batch(batch)):
                scores[r.index] = score
            progress.update(len(batch))
        progress.close()
        return scores

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """For lmms-eval 0.7.3: `(negative log-likelihood, is_greedy)` per request, lower is better, wrapped in a
        `GenerationResult` so lmms-eval does not stringify the tuple (see the module docstring)."""
        return [GenerationResult(text=(-logprob, greedy)) for logprob, greedy in self.score_continuations(requests)]


# --------------------------------------------------------------------------------------------------------------
# running tasks and reading results


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lmms-eval's `results["results"]` -> flat `{task}_{metric}` numbers (`_{filter}` appended when the filter is
    not "none"); standard errors (`*_stderr*`), aliases and non-numeric values are dropped."""
    flat: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}_{metric}" + (f"_{filter_name}" if filter_name and filter_name != "none" else "")
            flat[name] = float(value)
    return flat


@dataclass
class EvaluationReport:
    """What `evaluate_tasks` produced: flat metrics of the tasks that ran, and an error message per failed task."""

    results: dict[str, float] = field(default_factory=dict)
    failed_tasks: dict[str, str] = field(default_factory=dict)


def _split_tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return [t.strip() for name in names for t in name.split(",") if t.strip()]


def task_manager_for(tasks: Sequence[str], include_path: str | Sequence[str] | None = None, verbosity: str = "WARNING"):
    """A TaskManager that knows `tasks`: only the `include_path` folders when they hold them all (indexing lmms-eval's
    ~2000 built-in tasks takes seconds), else those plus the built-in ones."""
    from lmms_eval.tasks import TaskManager

    if include_path:
        manager = TaskManager(verbosity, include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([t]) for t in tasks):
            return manager
    return TaskManager(verbosity, include_path=include_path or None)


def checked_task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None, *,
                         flag: str = "--tasks", verbosity: str = "WARNING"):
    """`task_manager_for(tasks, ...)`, raising a one-line ValueError naming `flag`, each unknown task (with close
    matches) and how to list the tasks, before any model is loaded: lmms-eval itself fails with a KeyError traceback
    per task, after the model is loaded."""
    import difflib

    manager = task_manager_for(tasks, include_path, verbosity)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        named = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(c)}?)" if c else "") for t, c in close.items())
        raise ValueError(
            f"{flag}: unknown lmms-eval task{'s' if len(unknown) > 1 else ''} {named}; list the tasks with: python -m lmms_eval --tasks list "
            '--include_path "$(python -m nanovlm.evaluation.tasks)"'
        )
    return manager


def evaluate_tasks(
    model: NanoVLMLmms,
    tasks: str | Iterable[str],
    *,
    limit: int | float | None = None,
    include_path: str | Sequence[str] | None = None,
    gen_kwargs: str | None = None,
    verbosity: str = "WARNING",
    task_configs: Mapping[str, Mapping[str, Any]] | None = None,
    task_manager: Any = None,
) -> EvaluationReport:
    """Run each task separately through `lmms_eval.evaluator.simple_evaluate`, so one failing task (a missing
    dataset, a crash) does not lose the others; failures are logged and returned, not raised.

    `task_configs` overrides fields of a task's YAML for this call, per task name (e.g.
    `nanovlm.evaluation.synthetic_task.data_overrides(path, split)`): lmms-eval merges a `{"task": name, ...}`
    config into the registered one, so the task gets its data location without any environment variable.
    `task_manager`: an lmms-eval TaskManager that knows the tasks (e.g. from `checked_task_manager`); None builds one."""
    from lmms_eval.evaluator import simple_evaluate

    names = _split_tasks(tasks)
    if not names:
        raise ValueError(f"No tasks to evaluate: got {tasks!r}; pass e.g. tasks='mmstar,mme'.")
    manager = task_manager or task_manager_for(names, include_path, verbosity)  # one from checked_task_manager
    report = EvaluationReport()
    for name in names:
        try:
            overrides = (task_configs or {}).get(name)
            results = simple_evaluate(
                model=model,
                tasks=[{"task": name, **overrides} if overrides else name],  # a fresh dict: lmms-eval pops "task"
                limit=limit,
                task_manager=manager,
                log_samples=False,
                gen_kwargs=gen_kwargs,
                verbosity=verbosity,
                bootstrap_iters=0,
                # lmms-eval's accelerate path gathers 0-d tensors, which fails on CPU (gloo); its torchrun path works
                distributed_executor_backend="torchrun" if dist.is_initialized() else "accelerate",
            )
        except Exception as error:  # noqa: BLE001 - one task's failure must not stop the others
            logger.exception("lmms-eval task %s failed", name)
            report.failed_tasks[name] = f"{type(error).__name__}: {error}"
            continue
        if results is not None:  # None on ranks other than 0
            report.results.update(flatten_results(results))
    return report


__all__ = [
    "MODEL_ID",
    "EvaluationReport",
    "NanoVLMLmms",
    "checked_task_manager",
    "distributed_context",
    "evaluate_tasks",
    "flatten_results",
    "lmms_eval_manifest",
    "load_checkpoint",
    "register_with_lmms_eval",
    "resolve_dtype",
    "task_manager_for",
]
