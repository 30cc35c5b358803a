"""The GPU proof (issue #18): one command that measures and checks the 460m recipe on one GPU in about 8 minutes.

Every item runs in its own subprocess under a hard time limit (a hang, a CUDA OOM or a crash in one item cannot stop
the others), and its JSON is written as soon as it ends: `OUT/items/<item>.json`, plus `OUT/results.json` (every
item so far, rewritten after each) and `OUT/log.txt` (every child's output). `--copy_to DIR` also copies those two
files there after each item (the device's `$OUT` takes 8 files at most). Items, most valuable first:

    train_*         NanoVLMTrainer steps at the 460m shape (`NanoVLMConfig()` defaults, random init, bf16, packed
                    4096-token rows of FineVision-like random samples, bench/train_throughput.py's machinery):
                    tokens/s, real tokens/s, MFU (vision + projector + decoder FLOPs, attention within samples),
                    peak memory, data wait vs compute. Variants: sdpa / flex_attention (both isolating packed
                    samples), `unisolated` (position_ids 0..T-1 over the whole row: one causal mask, the isolation
                    cost's baseline), torch.compile, fused AdamW, Liger fused linear cross-entropy, activation
                    checkpointing, micro-batch 1/2/4. Every variant sees the same data and init: `loss_first` agrees.
                    `profile=N` items then profile N more steps (bench/step_profile.py): kernel time by kind, the top
                    kernels, the GPU's busy fraction, forward time per module (under "profile").
    packed_equivalence  per-sample losses of packed rows == the samples run one by one (bf16 autocast on GPU, fp32
                    on CPU; tolerance in the JSON), per attention variant, with the unisolated row as a control
    generation_cache    greedy tokens with and without the KV cache are equal (fp32, TF32 off)
    generation_speed    tokens/s with the KV cache at batch 1 and 32 (bf16)
    fsdp_step       one FSDP2 step through configs/accelerate/fsdp.yaml (`--num_processes 1`) on train_accelerate.py,
                    then the saved model loaded by `from_pretrained` gives the logits of the raw safetensors weights
    dataloader_w4/8 the real DataLoader (PackedDataset + SampleBuilder + PackedCollator) on FineVision-like JPEG
                    rows, 4 and 8 workers, feeding the sdpa training step: data-wait fraction

`--smoke` runs the same items on the `tiny` shape with a few steps (CPU is fine: what CI tests); items that need
CUDA record `skipped: no CUDA`. Only the named items: `--items a,b`. `--inject_failure ITEM` makes that item raise
(tests check that the others still run).

    PYTHONPATH=. python bench/gpu_suite.py --out /tmp/gpu_suite --copy_to "$OUT"
    PYTHONPATH=. python bench/gpu_suite.py --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass
class Item:
    """One measurement: what runs (`kind` + `params`), whether it needs CUDA, and its time limit on the GPU."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    cuda_only: bool = False
    budget_s: int = 60


def train(name: str, budget: int = 45, cuda_only: bool = False, **params) -> Item:
    return Item(name, "train", params, cuda_only, budget)


# Most valuable first: a later timeout only loses the tail. Limits from the first H200 run (2026-12-04): the
# items that timed out there got about twice their time; a whole pass no longer fits one call: use --items.
ITEMS: list[Item] = [
    # `profile=N`: N more steps after the timed ones under torch.profiler (bench/step_profile.py): kernel time by
    # kind, the top kernels and the GPU's busy fraction, i.e. where the step's time goes (MFU was 17.4%).
    train("train_sdpa_b2", budget=75, profile=2),
    train("train_unisolated_b2", unisolated=True),
    train("train_sdpa_compile_b2", budget=240, cuda_only=True, compile=True),
    train("train_sdpa_regional_compile_b2", budget=200, cuda_only=True, compile=True, regional=True),
    train("train_regional_compile_b4", budget=220, cuda_only=True, compile=True, regional=True, batch=4, profile=2),
    train("train_flex_b2", budget=180, cuda_only=True, attn="flex_attention"),  # flex has no backward on CPU
    # torch_varlen (nanovlm/attention.py): PyTorch's flash varlen kernel over the collator's cu_seq_lens, so
    # isolation skips the other samples' blocks instead of computing them under sdpa's mask (10.4% of the step)
    train("train_varlen_b2", budget=75, cuda_only=True, attn="torch_varlen"),
    train("train_varlen_regional_compile_b4", budget=220, cuda_only=True, attn="torch_varlen", compile=True,
          regional=True, batch=4, profile=2),
    Item("packed_equivalence", "packed", {}, False, 150),
    # flex_attention compiles its kernels on first use (it did not finish in 90 s at the 460m shape): without it
    Item("packed_equivalence_sdpa_eager", "packed", {"impls": ["sdpa", "eager"]}, False, 80),
    Item("packed_equivalence_flex", "packed", {"impls": ["flex_attention"]}, True, 150),
    Item("packed_equivalence_varlen", "packed", {"impls": ["torch_varlen"]}, True, 60),
    Item("generation_cache", "gen_cache", {}, False, 45),
    Item("generation_speed", "gen_speed", {}, False, 100),
    Item("generation_speed_static_compile", "gen_speed", {"mode": "static_compile"}, True, 240),
    Item("dataloader_w4", "dataloader", {"workers": 4}, False, 120),
    train("train_fused_adamw_b2", cuda_only=True, fused_adamw=True),
    # The second lease's ~2.1 s per step (4x eager) ran the whole model in fp32: this item's loss called the
    # model's submodule outside Accelerate's autocast (fixed in _liger_loss). The limit also reaches step 20.
    train("train_liger_b2", budget=120, cuda_only=True, liger=True),
    train("train_ckpt_b2", checkpointing=True),
    train("train_sdpa_b4", batch=4),
    train("train_sdpa_b1", batch=1),
    Item("fsdp_step", "fsdp", {}, True, 120),
    Item("dataloader_w8", "dataloader", {"workers": 8}, False, 50),
    train("train_flex_compile_b2", budget=120, cuda_only=True, attn="flex_attention", compile=True),
]
BY_NAME = {item.name: item for item in ITEMS}


# ----------------------------------------------------------------------------------------------------------------
# Child side: one item, in its own process


def _bench_imports():
    sys.path.insert(0, str(BENCH))
    import common  # noqa: F401  (bench/common.py, imported by name as the bench scripts do)

    common.setup_environment()
    common.quiet_logging()
    return common


def _cached_tokenizer(common, spec, cache: Path):
    """The shape's locally trained tokenizer, trained once per suite run and reloaded by later items."""
    from transformers import AutoTokenizer

    path = cache / f"tokenizer-{spec.name}"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    tokenizer = common.build_tokenizer(spec)
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class Unisolated:
    """Collator wrapper: position_ids 0..T-1 over each whole row, so the model sees one causal mask per row and
    packed samples attend to each other (the original nanoVLM's packing): the baseline of the isolation cost."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, packs):
        import torch

        batch = self.collator(packs)
        rows, length = batch["input_ids"].shape
        batch["position_ids"] = torch.arange(length).expand(rows, length).clone()
        return batch


def _liger_loss(trainer):
    """Replace the trainer's loss by Liger's fused linear cross-entropy (no (B, T, V) logits are materialised)."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from nanovlm.data.samples import IGNORE_INDEX

    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        inner = model.module if hasattr(model, "module") else model
        # Accelerate applies bf16 autocast by wrapping the prepared model's own forward; `inner.model` is a submodule
        # called around it, so the autocast is entered here. Without it (the second lease) the whole model ran in
        # fp32: that, not Liger, was the 4x slower step.
        with trainer.accelerator.autocast():
            hidden = inner.model(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
            targets = labels[:, 1:].reshape(-1)  # next-token targets, as the model's own loss shifts them
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            # The residual stream and the master weights are fp32 under autocast, and Liger's GEMMs write into
            # preallocated buffers (`torch.mm(..., out=)`), which autocast leaves alone: give Liger the autocast
            # dtype, as a bf16 model would; gradients flow back through the casts.
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
            loss = flce(inner.lm_head.weight.to(dtype), hidden.to(dtype), targets)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        return loss / count

    trainer.compute_loss = compute_loss


_CHILD_START = time.perf_counter()


def _progress_callback():
    """A callback printing each step's wall time as it ends: a timed-out item's log still shows where time went
    (compilation, data wait) and the steady-state step time."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        last = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            took = "" if self.last is None else f" ({now - self.last:.3f} s)"
            self.last = now
            print(f"step {state.global_step} at {now - _CHILD_START:.1f} s{took}", flush=True)

    return Progress()


def _train_args(tt, spec_name: str, smoke: bool, p: dict[str, Any], device: str, workers: int | None, data: str):
    steps, warmup = (4, 1) if smoke else (20, 5)
    argv = [
        "--shape", spec_name, "--steps", str(steps), "--warmup_steps", str(warmup), "--device", device,
        "--attn_implementation", p.get("attn", "sdpa"), "--rows", "400" if smoke else "3000", "--data", data,
        "--pipeline_batches", "0",
    ]
    if p.get("batch"):
        argv += ["--batch_size", str(p["batch"] if not smoke else min(p["batch"], 4))]
    if workers is not None:
        argv += ["--num_workers", str(workers)]
    argv += ["--compile"] if p.get("compile") else []
    argv += ["--compile_regions"] if p.get("regional") else []  # the recipe's --compile_regions
    argv += ["--gradient_checkpointing"] if p.get("checkpointing") else []
    argv += ["--profile_steps", str(p["profile"])] if p.get("profile") else []
    argv += ["--bf16"] if device == "cuda" else ["--no-bf16"]
    return tt.build_parser().parse_args(argv)


def run_train(params: dict[str, Any], smoke: bool, cache: Path, rows_fn=None, workers: int | None = None) -> dict:
    """Build the bench's TimedTrainer with the variant applied, train, and summarise the measured steps."""
    import torch

    common = _bench_imports()
    import train_throughput as tt

    from nanovlm.training.optim import GuardedAdamW, build_param_groups

    shape = "tiny" if smoke else "460m"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tt.build_tokenizer = lambda spec, rows=None: _cached_tokenizer(common, spec, cache)
    data = "random"
    if rows_fn is not None:
        tt.synthetic_rows, data = rows_fn, "synthetic"
    args = _train_args(tt, shape, smoke, params, device, workers if workers is not None else (0 if smoke else None),
                       data)
    with tempfile.TemporaryDirectory() as output_dir:
        if device == "cuda":  # init the 460M parameters on the GPU (faster than on the host); data stays on the host
            build_model = tt.build_model

            def on_gpu(*a, **k):
                with torch.device("cuda"):
                    return build_model(*a, **k)

            tt.build_model = on_gpu
        run = tt.build_run(args, shape, output_dir)
        trainer, setup = run["trainer"], run["setup"]
        trainer.add_callback(_progress_callback())
        print(f"model and data built at {time.perf_counter() - _CHILD_START:.1f} s", flush=True)
        if params.get("unisolated"):
            trainer.data_collator = Unisolated(trainer.data_collator)
        if params.get("fused_adamw"):
            groups = build_param_groups(trainer.model.named_parameters(), trainer.part_lrs, trainer.args.weight_decay)
            trainer.optimizer = GuardedAdamW(
                groups, betas=(trainer.args.adam_beta1, trainer.args.adam_beta2), eps=trainer.args.adam_epsilon,
                fused=True,
            )
            trainer.optimizer.guard = trainer.nonfinite_guard
        if params.get("liger"):
            _liger_loss(trainer)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        result = {**setup, **tt.summarize_run(run, args)}
        result["train_wall_s"] = time.perf_counter() - start
        if device == "cuda":
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            result["peak_memory_gib"] = result["peak_memory_bytes"] / 2**30
        result["variant"] = params
        result["data_wait_fraction"] = result["time_split"]["data_wait"]
        result["compute_fraction"] = result["time_split"]["fwd_bwd"] + result["time_split"]["optimizer"]
    return result


def _jpeg_rows_fn(smoke: bool):
    """FineVision-like rows with JPEG images of photo sizes (bench/preprocess.py's generator), as a Dataset."""
    import datasets
    import preprocess

    sizes = [("photo", 96, 64), ("photo", 64, 128)] if smoke else [
        ("photo", 640, 480), ("photo", 1024, 768), ("photo", 1536, 2048), ("photo", 1920, 1080)
    ]

    def rows(spec, n, seed=0):
        return datasets.Dataset.from_list(preprocess.finevision_like_rows(sizes, n, seed))

    return rows


def run_dataloader(params: dict[str, Any], smoke: bool, cache: Path) -> dict:
    _bench_imports()
    workers = min(params["workers"], 2) if smoke else params["workers"]
    result = run_train({}, smoke, cache, rows_fn=_jpeg_rows_fn(smoke), workers=workers)
    result["image_format"] = "JPEG"
    return result


def _packed_batch(common, spec, tokenizer, processor, n_rows: int, seed: int = 0):
    """n_rows packs of FineVision-like random samples through the real PackedDataset + PackedCollator."""
    from nanovlm.data import PackedCollator, PackedDataset

    source = common.RandomSamples(processor, n=400, max_sample_length=spec.max_sample_length,
                                  max_images=spec.max_images_per_example, seed=seed)
    dataset = PackedDataset(source, seq_length=spec.seq_length, max_images_per_pack=spec.max_images_per_pack,
                            buffer_size=min(spec.pack_buffer_size, 200), seed=seed, infinite=False)
    packs = []
    for pack in dataset:
        if len(pack["samples"]) >= 2:
            packs.append(pack)
        if len(packs) == n_rows:
            break
    batch = PackedCollator(tokenizer.pad_token_id)(packs)
    samples = [[s for s in pack["samples"]] for pack in packs]
    return batch, samples


def run_packed(params: dict[str, Any], smoke: bool, cache: Path) -> dict:
    """Per-sample summed losses from packed rows vs each sample alone, per attention implementation."""
    import torch

    common = _bench_imports()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    spec = common.get_shape("tiny" if smoke else "460m")
    tokenizer = _cached_tokenizer(common, spec, cache)
    # bf16 autocast as training runs; fp32 on CPU (no native bf16 there). Tolerance on each sample's mean token loss.
    tol = 5e-2 if cuda else 1e-4
    impls = params.get("impls") or (["sdpa", "flex_attention", "eager"] if cuda else ["sdpa", "eager"])
    out: dict[str, Any] = {"tolerance_mean_loss_abs": tol, "dtype": "bf16 autocast" if cuda else "float32",
                           "variants": {}}
    model = None
    for impl in impls:
        try:
            if model is None:
                with device:
                    model = common.build_model(spec, tokenizer, attn_implementation=impl).eval()
            else:
                model.set_attn_implementation(impl)
            processor = common.build_processor_for_shape(spec, tokenizer, model.config)
            batch, samples = _packed_batch(common, spec, tokenizer, processor, 1 if smoke else 2)
            out["variants"][impl] = _compare_packed(model, batch, samples, device, cuda, tol)
        except Exception as err:  # one kernel failing must not hide the others
            out["variants"][impl] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    ok = [v.get("equal") for v in out["variants"].values()]
    out["all_equal"] = all(x is True for x in ok)
    return out


def _sample_losses(model, input_ids, labels, pixel_values, position_ids, device, cuda, varlen=None):
    """Per-token losses (B, T-1) and their label mask; `varlen`: the collator's cu_seq_lens_* / max_length_* (the
    packed row's sample boundaries, which flash_attention_2 and torch_varlen read)."""
    import torch

    from nanovlm.data.samples import IGNORE_INDEX

    kw = {"input_ids": input_ids.to(device), "labels": labels.to(device)}
    kw.update({k: v.to(device) if hasattr(v, "to") else v for k, v in (varlen or {}).items()})
    if pixel_values is not None:
        kw["pixel_values"] = pixel_values.to(device)
    if position_ids is not None:
        kw["position_ids"] = position_ids.to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        # use_cache=False: a cache turns the packed-sequence mask off (DESIGN.md), as it would in training
        logits = model(**{k: v for k, v in kw.items() if k != "labels"}, use_cache=False).logits.float()  # (B, T, V)
    target = kw["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                               reduction="none")  # (B, T-1)
    return losses, target != IGNORE_INDEX


def _compare_packed(model, batch, samples, device, cuda, tol) -> dict:
    import torch

    varlen = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    packed, mask = _sample_losses(model, batch["input_ids"], batch["labels"], batch.get("pixel_values"),
                                  batch["position_ids"], device, cuda, varlen)
    rows, length = batch["input_ids"].shape
    arange = torch.arange(length).expand(rows, length)
    mixed, _ = _sample_losses(model, batch["input_ids"], batch["labels"], batch.get("pixel_values"), arange,
                              device, cuda)
    diffs, control = [], []
    for r, row in enumerate(samples):
        start = 0
        for s in row:
            n = len(s["input_ids"])
            alone, alone_mask = _sample_losses(model, s["input_ids"][None], s["labels"][None], s.get("pixel_values"),
                                               None, device, cuda)
            count = int(alone_mask.sum())
            if count:
                mean_alone = float(alone[alone_mask].sum()) / count
                span = slice(start, start + n - 1)  # predictions inside this sample only
                m = mask[r, span]
                mean_packed = float(packed[r, span][m].sum()) / max(int(m.sum()), 1)
                mean_mixed = float(mixed[r, span][m].sum()) / max(int(m.sum()), 1)
                diffs.append(abs(mean_packed - mean_alone))
                control.append(abs(mean_mixed - mean_alone))
            start += n
    return {
        "samples": len(diffs), "rows": rows, "row_length": length,
        "max_abs_diff_mean_loss": max(diffs), "mean_abs_diff_mean_loss": sum(diffs) / len(diffs),
        "equal": max(diffs) <= tol,
        "control_unisolated_max_abs_diff": max(control),  # packed samples that see each other: must differ
    }


def _gen_setup(common, smoke: bool, cache: Path, dtype, attn: str = "sdpa"):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = common.get_shape("tiny" if smoke else "460m")
    tokenizer = _cached_tokenizer(common, spec, cache)
    with device:
        model = common.build_model(spec, tokenizer, attn_implementation=attn).to(dtype=dtype).eval()
    processor = common.build_processor_for_shape(spec, tokenizer, model.config)
    return device, spec, tokenizer, model, processor


def run_gen_cache(params: dict[str, Any], smoke: bool, cache: Path) -> dict:
    """Greedy tokens with and without the KV cache (fp32, TF32 off: random weights have near-ties in bf16)."""
    import torch

    common = _bench_imports()
    import generation

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device, spec, tokenizer, model, processor = _gen_setup(common, smoke, cache, torch.float32)
    image = common.photo_like_image(640, 480, 0)
    inputs = generation.build_inputs(processor, 2, image, "What is in the top left corner of the picture?", device)
    suppress = common.image_token_ids(tokenizer)
    n = 16 if smoke else 48
    _, cached = generation.timed_generate(model, inputs, n, {"use_cache": True}, suppress)
    _, plain = generation.timed_generate(model, inputs, n, {"use_cache": False}, suppress)
    prompt = inputs["input_ids"].shape[1]
    a, b = cached[:, prompt:].cpu(), plain[:, prompt:].cpu()
    differ = (a != b).any(dim=0).nonzero()
    return {"batch": 2, "new_tokens": n, "prompt_tokens": prompt, "dtype": "float32", "equal": bool(torch.equal(a, b)),
            "first_mismatch": int(differ[0]) if len(differ) else None, "tokens_cache": a[0, :16].tolist()}


def run_gen_speed(params: dict[str, Any], smoke: bool, cache: Path) -> dict:
    """Tokens/s with the KV cache at batch 1 and 32 (bf16 on GPU): `params["mode"]` "dynamic" (default) or
    "static_compile" (static cache + compiled decoding, CUDA graphs on GPU: the remedy for launch-bound decoding)."""
    import torch

    common = _bench_imports()
    import generation

    cuda = torch.cuda.is_available()
    device, spec, tokenizer, model, processor = _gen_setup(common, smoke, cache,
                                                           torch.bfloat16 if cuda else torch.float32)
    args = argparse.Namespace(max_new_tokens=8 if smoke else 128, repeats=1 if smoke else 2)
    image = common.photo_like_image(640, 480, 0)
    suppress = common.image_token_ids(tokenizer)
    runs = []
    for batch in (1, 4) if smoke else (1, 32):
        inputs = generation.build_inputs(processor, batch, image, "Describe the picture in detail.", device)
        r = generation.run_mode(model, inputs, params.get("mode", "dynamic"), args, device, suppress)
        r.pop("tokens", None)
        r.update(batch=batch, prompt_tokens=int(inputs["input_ids"].shape[1]),
                 image_tiles=int(inputs["pixel_values"].shape[0]) // batch)
        runs.append(r)
    return {"dtype": str(next(model.parameters()).dtype), "runs": runs}


def run_fsdp(params: dict[str, Any], smoke: bool, cache: Path) -> dict:
    """One FSDP2 step of train_accelerate.py on the demo config (tiny model, tiny synthetic data), then the saved
    model through `from_pretrained` vs the raw safetensors in a fresh model: equal logits."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out, data = Path(tmp) / "run", Path(tmp) / "data"
        # The data is built first and trained on as a plain dataset (--synthetic_dataset false): with the synthetic
        # flag the demo ends in its held-out report, which needs lmms-eval (not on the GPU machines; the first H200
        # run trained and saved under FSDP2, then stopped there before this check).
        build = [sys.executable, "-m", "nanovlm.data.synthetic", "--output_dir", str(data), "--num_train", "120",
                 "--num_validation", "8", "--num_test", "8", "--num_train_simple", "16", "--no_parquet"]
        subprocess.run(build, capture_output=True, text=True, cwd=ROOT, check=True)
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", str(ROOT / "train_accelerate.py"),
            "--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(out), "--dataset_name_or_path",
            str(data), "--synthetic_dataset", "false", "--max_steps", "2", "--eval_interval", "2",
            "--logging_steps", "1", "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "4",
            "--bf16", "true",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=None)
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        if proc.returncode != 0:
            raise RuntimeError(f"train_accelerate.py under fsdp.yaml exited {proc.returncode}: "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        from safetensors.torch import load_file

        from nanovlm import NanoVLMForConditionalGeneration

        final = out / "final"
        loaded = NanoVLMForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
        raw = load_file(str(final / "model.safetensors"))
        fresh = NanoVLMForConditionalGeneration._from_config(loaded.config).eval()
        missing, unexpected = fresh.load_state_dict(raw, strict=False)
        ids = torch.randint(0, loaded.config.text_config.vocab_size, (1, 32))
        ids[ids == loaded.config.image_token_id] = 0
        with torch.no_grad():
            a, b = loaded(input_ids=ids).logits, fresh(input_ids=ids).logits
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text()) \
            if (out / "checkpoint-2" / "trainer_state.json").is_file() else {}
        return {
            "returncode": proc.returncode, "saved_files": sorted(p.name for p in final.iterdir()),
            "tensors_saved": len(raw), "missing_keys": [k for k in missing if "lm_head" not in k],
            "unexpected_keys": list(unexpected), "max_abs_logit_diff": float((a - b).abs().max()),
            "equal": bool(torch.equal(a, b)), "losses": [e["loss"] for e in state.get("log_history", []) if "loss" in e],
            "fsdp_in_log": "FSDP" in proc.stderr or "fsdp" in proc.stderr.lower(),
        }


RUNNERS = {"train": run_train, "packed": run_packed, "gen_cache": run_gen_cache, "gen_speed": run_gen_speed,
           "fsdp": run_fsdp, "dataloader": run_dataloader}


def child_main(name: str, out: Path, smoke: bool, inject: str | None) -> int:
    """Run one item and write its JSON; exceptions become a 'failed' record (the parent also covers crashes)."""
    item = BY_NAME[name]
    start = time.perf_counter()
    record: dict[str, Any] = {"item": name, "kind": item.kind, "params": item.params, "smoke": smoke}
    try:
        if inject == name:
            raise RuntimeError(f"injected failure in {name} (--inject_failure)")
        if item.params.get("liger"):
            try:
                import liger_kernel  # noqa: F401
            except Exception as err:
                record.update(status="skipped", reason=f"liger-kernel not available: {type(err).__name__}: {err}")
                return _write_item(out, record, start)
        record["result"] = RUNNERS[item.kind](item.params, smoke, out / "cache")
        record["status"] = "ok"
    except Exception as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
        print(record["traceback"], file=sys.stderr)
    return _write_item(out, record, start)


def _write_item(out: Path, record: dict[str, Any], start: float) -> int:
    record["seconds"] = round(time.perf_counter() - start, 2)
    path = out / "items" / f"{record['item']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parent side: schedule, time limits, results.json, table


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from importlib import metadata

    for name in ("accelerate", "datasets", "liger-kernel", "triton"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def run_item(item: Item, args, log, left_s: float) -> dict[str, Any]:
    """Run one item in a subprocess (its own process group) under its time limit; return its record."""
    budget = args.smoke_budget_s if args.smoke else int(item.budget_s * args.budget_scale)
    budget = max(1, min(budget, int(left_s)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", item.name, "--out", str(args.out)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--inject_failure", args.inject_failure] if args.inject_failure else []
    path = args.out / "items" / f"{item.name}.json"
    path.unlink(missing_ok=True)
    log.write(f"\n===== {item.name} (limit {budget} s) =====\n")
    log.flush()
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the item and its DataLoader workers / launched ranks
        proc.wait()
        rc = None
    seconds = round(time.perf_counter() - start, 2)
    if path.is_file():
        record = json.loads(path.read_text())
    else:
        status = "timeout" if rc is None else "failed"
        error = f"no result within {budget} s (killed)" if rc is None else f"process exited {rc} without a result"
        record = {"item": item.name, "kind": item.kind, "params": item.params, "status": status, "error": error}
    record["wall_s"] = seconds
    record["budget_s"] = budget
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return record


def summary(record: dict[str, Any]) -> str:
    r = record.get("result") or {}
    if record.get("status") != "ok":
        return (record.get("reason") or record.get("error") or "").splitlines()[0][:90] if (
            record.get("reason") or record.get("error")) else ""
    kind = record["kind"]
    if kind in ("train", "dataloader"):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else "-"
        line = (f"step {r['step_time_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, real {r['real_tokens_per_s']:.0f}, "
                f"MFU {mfu}, mem {mem}, data wait {100 * r['data_wait_fraction']:.1f}%, loss0 {r['loss_first']:.3f}")
        if r.get("profile") and "error" in r["profile"]:
            line += f"; {r['profile']['error'][:60]}"
        elif r.get("profile"):
            prof = r["profile"]
            busy = prof["device_busy_fraction"]
            kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in list(prof["categories"].items())[:3])
            line += f"; busy {'-' if busy is None else f'{busy:.0%}'}, {kinds}"
        return line
    if kind == "packed":
        parts = [f"{k}: " + (f"max {v['max_abs_diff_mean_loss']:.2e} ctl {v['control_unisolated_max_abs_diff']:.2e}"
                             if "error" not in v else v["error"][:40]) for k, v in r["variants"].items()]
        return f"tol {r['tolerance_mean_loss_abs']:.0e}; " + "; ".join(parts)
    if kind == "gen_cache":
        return f"equal={r['equal']} ({r['new_tokens']} tokens x {r['batch']})"
    if kind == "gen_speed":
        return "; ".join(f"B={x['batch']}: {x.get('tokens_per_s', 0):.0f} tok/s" if "error" not in x
                         else f"B={x['batch']}: {x['error'][:40]}" for x in r["runs"])
    if kind == "fsdp":
        return f"logits equal={r['equal']} (max diff {r['max_abs_logit_diff']:.1e}), losses {r['losses']}"
    return ""


def write_results(args, info: dict[str, Any], records: list[dict[str, Any]], log_path: Path) -> None:
    report = {"machine": info, "smoke": args.smoke, "items": records}
    path = args.out / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.copy_to / "results.json")
        shutil.copyfile(log_path, args.copy_to / "log.txt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder (items/, results.json, log.txt)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, a few steps (CPU is fine)")
    parser.add_argument("--items", default=None, help=f"comma-separated subset, run in the order given; all: {list(BY_NAME)}")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiply every item's time limit")
    parser.add_argument("--smoke_budget_s", type=int, default=120, help="each item's time limit under --smoke")
    parser.add_argument("--total_budget_s", type=float, default=480,
                        help="the whole suite's limit: an item gets at most what is left; none starts with < 15 s")
    parser.add_argument("--copy_to", type=Path, default=None, help="also copy results.json and log.txt here")
    parser.add_argument("--inject_failure", default=None, help="make this item raise (tests)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        return child_main(args._child, args.out, args.smoke, args.inject_failure)
    items = ITEMS
    if args.items:
        names = [n.strip() for n in args.items.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"--items: unknown {unknown}; choose from {list(BY_NAME)}")
        items = [BY_NAME[n] for n in dict.fromkeys(names)]  # in the order given: the call's most wanted first
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info), flush=True)
    records: list[dict[str, Any]] = []
    log_path = args.out / "log.txt"
    suite_start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"machine: {json.dumps(info)}\n")
        for item in items:
            if item.cuda_only and not info["cuda"]:
                record = {"item": item.name, "kind": item.kind, "params": item.params, "status": "skipped",
                          "reason": "skipped: no CUDA", "wall_s": 0.0}
                (args.out / "items").mkdir(exist_ok=True)
                (args.out / "items" / f"{item.name}.json").write_text(json.dumps(record, indent=2))
            elif (left := args.total_budget_s - (time.perf_counter() - suite_start)) < 15:
                record = {"item": item.name, "kind": item.kind, "params": item.params, "status": "skipped",
                          "reason": f"skipped: --total_budget_s {args.total_budget_s} spent", "wall_s": 0.0}
            else:
                record = run_item(item, args, log, left)
            records.append(record)
            print(f"[{time.perf_counter() - suite_start:6.1f} s] {item.name:34s} {record['status']:8s} "
                  f"{record.get('wall_s', 0):6.1f} s  {summary(record)}", flush=True)
            write_results(args, info, records, log_path)
    print(f"\n{'item':34s} {'status':8s} {'wall s':>7s}  summary")
    for record in records:
        print(f"{record['item']:34s} {record['status']:8s} {record.get('wall_s', 0):7.1f}  {summary(record)}")
    print(f"total {time.perf_counter() - suite_start:.1f} s; wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
