"""Training throughput of NanoVLMTrainer on packed data: tokens/s, real-token fraction, time split, memory, MFU.

What runs is what users run: `NanoVLMTrainer` (its AdamW groups, nanoVLM schedule, gradient clipping, loss over the
global label-token count) on the real `PackedDataset` + `PackedCollator` behind a DataLoader with `--num_workers`
workers, for `--steps` optimizer steps (gradient accumulation 1) of one shape (`tiny`, `demo`, `460m`; see
bench/common.py). The first `--warmup_steps` steps (worker start-up, allocator warm-up, compilation) are timed but
left out of the figures. Data: `synthetic` (the embedded visual-QA rows through the real SampleBuilder: PNG decode,
tiling, chat template, labels) or `random` (FineVision-like lengths and image counts, random ids and pixel tiles).
`--no-packing` is the baseline: one sample per row, every row padded to `--seq_length`.

Per step, timed with Trainer callbacks and a `training_step` wrapper:
    data wait   end of the previous step -> start of training_step (the DataLoader's `next`)
    fwd+bwd     training_step: host-to-device copy, forward, loss, backward (CUDA synchronised at its end)
    optimizer   gradient clipping + AdamW step (CUDA synchronised)
    other       LR scheduler, zero_grad, callbacks, logging
Tokens/s count every token of every row (padding included); real tokens/s only the samples' tokens.
Peak memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the main process's peak RSS (`ru_maxrss`, process
lifetime; DataLoader workers are separate processes, their largest peak is reported apart).

Model FLOPs per step (training = 3x forward), N_* the non-embedding parameters (the LM head counts as a matmul):
    language   6 * N_text * real_tokens + 6 * L_text * d_text * sum_i(L_i^2)     L_i: length of packed sample i
    vision     6 * N_vision * P * tiles + 12 * L_vis * d_vis * P^2 * tiles        P: patches per tile
    projector  6 * (d_vis * s^2 * d_text) * image_tokens_per_tile * tiles
The causal-attention term counts pairs within each sample only (packed samples never attend to each other), i.e.
what a varlen kernel computes; MFU = model FLOPs / step time / the GPU's dense bf16 peak. This is
`nanovlm.training.flops.estimate_flops`, the same function the trainer logs `perf/mfu` with (it counted padding and
whole-row attention before 2026-12-04, 7% above this figure; BENCHMARKS.md's "old logged" column).

The data pipeline alone: after training, the same DataLoader (`trainer.get_train_dataloader()`) is iterated for
`--pipeline_batches` batches without a model; `pipeline_ratio` = its steady-state batches/s divided by the rate at
which training consumes batches when it never waits (1 / (step time - data wait)). Target: >= 5 on the demo shape
on CPU. On a 2-core CPU the workers compete with the training threads, so the data wait during training is the
other figure to read.

`--profile_steps N` profiles N more steps after the timed ones (bench/step_profile.py: kernel time by kind, the top
kernels, the GPU's busy fraction, forward time per module) and writes it under "profile".

    python bench/train_throughput.py --shape demo --steps 200 --out bench/results/train_demo.json
    python bench/train_throughput.py --shape 460m --bf16 --steps 200 --attn_implementation flash_attention_2
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    SHAPES,
    RandomSamples,
    args_dict,
    build_model,
    build_processor_for_shape,
    build_tokenizer,
    format_table,
    get_shape,
    machine_info,
    max_rss_bytes,
    parameter_counts,
    quiet_logging,
    resolve_device,
    setup_environment,
    synthetic_rows,
    torch_threads,
    write_json,
)
from step_profile import StepProfiler, format_profile
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from nanovlm.data import PackedCollator, PackedDataset, SampleBuilder, SampleDataset
from nanovlm.data.collator import BOOKKEEPING_KEY
from nanovlm.training.arguments import NanoVLMTrainingArguments
from nanovlm.training.flops import estimate_flops, peak_flops
from nanovlm.training.trainer import NanoVLMTrainer

logger = logging.getLogger("bench.train_throughput")

ATTN_CHOICES = ["eager", "sdpa", "flash_attention_2", "flex_attention", "torch_varlen"]


# ----------------------------------------------------------------------------------------------------------------
# Pieces


class OneSamplePerRow(PackedDataset):
    """The no-packing baseline: the same source, reading and resume logic, but every sample is its own pack (the
    collator then pads each row to seq_length)."""

    def _round_packs(self, samples, epoch, worker, num_workers, start):
        return [[s] for s in samples if s is not None]


class StepTimer(TrainerCallback):
    """Timestamps of each optimizer step's phases (see the module docstring)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self.last_end = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = {"prev_end": self.last_end, "begin": time.perf_counter()}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sync()
        self.current["optimizer_end"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_end = self.current["end"] = time.perf_counter()
        self.records.append(self.current)


class TimedTrainer(NanoVLMTrainer):
    """NanoVLMTrainer whose training_step also records its time, the batch's collator stats and the loss."""

    timer: StepTimer

    def training_step(self, model, inputs, num_items_in_batch=None):
        stats = dict(inputs[BOOKKEEPING_KEY]["stats"])
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)  # synchronises CUDA at its end
        self.timer.current.update(train_start=start, train_end=time.perf_counter(), stats=stats, loss=loss.detach())
        return loss


def checkpointing_kwargs(enabled: bool) -> dict[str, bool]:
    """The training argument that turns activation checkpointing on: `activation_checkpointing` from transformers
    5.23, `gradient_checkpointing` before (the GPU machines' image has 5.17)."""
    names = {f.name for f in dataclasses.fields(NanoVLMTrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def build_run(args: argparse.Namespace, shape: str, output_dir: str) -> dict[str, Any]:
    """Tokenizer, model, processor, packed dataset, collator and TimedTrainer for one shape (nothing run yet)."""
    spec = get_shape(shape)
    data = args.data or spec.default_data
    seq_length = args.seq_length or spec.seq_length
    max_sample_length = min(seq_length, spec.max_sample_length) if args.seq_length else spec.max_sample_length
    max_images = args.max_images_per_pack or spec.max_images_per_pack
    batch_size = args.batch_size or spec.batch_size
    num_workers = spec.num_workers if args.num_workers is None else args.num_workers
    buffer_size = args.pack_buffer_size or spec.pack_buffer_size
    device = resolve_device(args.device)

    max_images_per_example = min(spec.max_images_per_example, max_images)
    rows = synthetic_rows(spec, args.rows, seed=args.seed) if data == "synthetic" else None
    tokenizer = build_tokenizer(spec, rows)
    model = build_model(spec, tokenizer, attn_implementation=args.attn_implementation, seed=args.seed)
    processor = build_processor_for_shape(spec, tokenizer, model.config)
    if data == "synthetic":
        builder = SampleBuilder(
            processor, max_sample_length=max_sample_length, max_images_per_example=max_images_per_example
        )
        source = SampleDataset(rows, builder, seed=args.seed)
    else:
        source = RandomSamples(
            processor, n=args.rows, max_sample_length=max_sample_length, max_images=max_images_per_example,
            seed=args.seed,
        )
    dataset_cls = PackedDataset if args.packing else OneSamplePerRow
    dataset = dataset_cls(
        source, seq_length=seq_length, max_images_per_pack=max_images, buffer_size=buffer_size,
        seed=args.seed, infinite=True,
    )
    pad_multiple = args.pad_to_multiple_of if args.packing else seq_length
    collator = PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)

    lr_mp, lr_vision, lr_language = spec.lrs
    training_args = NanoVLMTrainingArguments(
        output_dir=output_dir, max_steps=max(args.steps, 1) + args.profile_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, lr_mp=lr_mp, lr_vision_backbone=lr_vision, lr_language_backbone=lr_language,
        logging_steps=max(args.steps, 1), eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        report_to="none", dataloader_num_workers=num_workers, use_cpu=device.type == "cpu", bf16=args.bf16,
        torch_compile=args.compile, compile_regions=args.compile_regions, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
        **checkpointing_kwargs(args.gradient_checkpointing),
    )
    trainer = TimedTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=processor
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    sync = torch.cuda.synchronize if training_args.device.type == "cuda" else (lambda: None)
    trainer.timer = StepTimer(sync)
    trainer.add_callback(trainer.timer)
    trainer.profiler = None
    if args.profile_steps:  # after the timed steps, so their figures are not slowed by the profiler
        trainer.profiler = StepProfiler(model, first=max(args.steps, 1), count=args.profile_steps)
        trainer.add_callback(trainer.profiler)
    setup = {
        "shape": shape, "data": data, "packing": args.packing, "seq_length": seq_length,
        "max_sample_length": max_sample_length, "max_images_per_pack": max_images, "pack_buffer_size": buffer_size, "batch_size": batch_size,
        "num_workers": num_workers, "device": str(training_args.device), "bf16": bool(training_args.bf16),
        "attn_implementation": args.attn_implementation, "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile, "pad_to_multiple_of": pad_multiple, "params": parameter_counts(model),
        "image_tokens_per_tile": model.config.image_seq_len, "tile_size": model.config.tile_size,
    }
    return {"trainer": trainer, "model": model, "setup": setup, "device": training_args.device}


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def summarize_steps(records: list[dict[str, Any]], warmup: int, config, device: torch.device) -> dict[str, Any]:
    """Figures over the measured steps (after warm-up) and totals over every step."""
    totals: dict[str, int] = {}
    for rec in records:
        for key, value in rec["stats"].items():
            totals[key] = totals.get(key, 0) + int(value)
    measured = records[warmup:]
    if not measured:
        raise SystemExit(f"--steps must exceed --warmup_steps ({warmup}) to measure anything; got {len(records)} steps.")
    phase = {"data_wait": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0, "other": 0.0}
    wall = 0.0
    sums: dict[str, float] = {}
    flops = 0.0
    for rec in measured:
        step = rec["end"] - rec["prev_end"]
        data_wait = rec["train_start"] - rec["prev_end"]
        fwd_bwd = rec["train_end"] - rec["train_start"]
        optimizer = rec["optimizer_end"] - rec["train_end"]
        phase["data_wait"] += data_wait
        phase["fwd_bwd"] += fwd_bwd
        phase["optimizer"] += optimizer
        phase["other"] += step - data_wait - fwd_bwd - optimizer
        wall += step
        for key, value in rec["stats"].items():
            sums[key] = sums.get(key, 0) + value
        flops += estimate_flops(config, rec["stats"])
    tokens = sums["num_real_tokens"] + sums["num_pad_tokens"]
    peak = peak_flops(device)
    losses = [float(rec["loss"]) for rec in records]
    return {
        "steps": len(records),
        "measured_steps": len(measured),
        "step_time_s": wall / len(measured),
        "tokens_per_s": tokens / wall,
        "real_tokens_per_s": sums["num_real_tokens"] / wall,
        "real_token_fraction": sums["num_real_tokens"] / tokens,
        "samples_per_s": sums["num_samples"] / wall,
        "images_per_s": sums["num_images"] / wall,
        "tiles_per_s": sums["num_tiles"] / wall,
        "mean_row_length": sums["row_length"] / len(measured),
        "time_s": phase,
        "time_split": {k: v / wall for k, v in phase.items()},
        "model_tflops_per_s": flops / wall / 1e12,
        "peak_flops": peak,
        "mfu": flops / wall / peak if peak else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_finite": all(math.isfinite(x) for x in losses),
        "totals": {
            "steps": len(records),
            "real_tokens": totals.get("num_real_tokens", 0),
            "pad_tokens": totals.get("num_pad_tokens", 0),
            "label_tokens": totals.get("num_label_tokens", 0),
            "samples": totals.get("num_samples", 0),
            "images": totals.get("num_images", 0),
            "tiles": totals.get("num_tiles", 0),
        },
    }


def summarize_run(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`summarize_steps` of a trained `build_run` over its `--steps` timed steps, plus the profile of the
    `--profile_steps` that came after them (under "profile")."""
    trainer = run["trainer"]
    result = summarize_steps(trainer.timer.records[: args.steps], args.warmup_steps, run["model"].config, run["device"])
    if trainer.profiler is not None:
        result["profile"] = trainer.profiler.summary
    return result


def measure_pipeline(trainer, batches: int) -> dict[str, Any]:
    """Iterate the training DataLoader alone: time to the first batch, then steady-state batches/s and tokens/s."""
    loader = trainer.get_train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_s = time.perf_counter() - start
    real = pad = packs = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        real += batch[BOOKKEEPING_KEY]["stats"]["num_real_tokens"]
        pad += batch[BOOKKEEPING_KEY]["stats"]["num_pad_tokens"]
        packs += batch[BOOKKEEPING_KEY]["stats"]["num_rows"]
    seconds = time.perf_counter() - t0
    del iterator, first
    gc.collect()
    return {
        "batches": batches,
        "time_to_first_batch_s": first_s,
        "batches_per_s": batches / seconds if batches else None,
        "packs_per_s": packs / seconds if batches else None,
        "real_tokens_per_s": real / seconds if batches else None,
        "real_token_fraction": real / (real + pad) if real + pad else None,
    }


def run_shape(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """Build, train `--steps` steps, then time the data pipeline alone; one result row."""
    with tempfile.TemporaryDirectory() as output_dir:
        run = build_run(args, shape, output_dir)
        trainer, device, setup = run["trainer"], run["device"], run["setup"]
        result: dict[str, Any] = {**setup, "load_average_start": machine_info()["load_average"]}
        if not args.pipeline_only:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rss_before = max_rss_bytes()
            trainer.train()
            result.update(summarize_run(run, args))
            if device.type == "cuda":
                result.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                              peak_memory_kind="cuda_max_allocated")
            else:
                result.update(peak_memory_bytes=max_rss_bytes(), peak_memory_kind="cpu_max_rss",
                              rss_before_train_bytes=rss_before)
            result["trainer_logged"] = next(
                ({k: v for k, v in e.items() if k.startswith("perf/")} for e in trainer.state.log_history
                 if "perf/tokens_per_s" in e), {}
            )
        pipeline = measure_pipeline(trainer, args.pipeline_batches)
        result["worker_max_rss_bytes"] = max_rss_bytes(children=True) if setup["num_workers"] else None
        if not args.pipeline_only:
            busy = result["step_time_s"] - result["time_s"]["data_wait"] / result["measured_steps"]
            pipeline["train_batches_per_s"] = 1.0 / busy
            # --pipeline_batches 0 times only the first batch: no steady-state rate, no ratio
            pipeline["ratio"] = (pipeline["batches_per_s"] / pipeline["train_batches_per_s"]
                                 if pipeline["batches_per_s"] is not None else None)
        result["pipeline"] = pipeline
        result["load_average_end"] = machine_info()["load_average"]
        del run, trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Figures and formulas: see the module docstring and BENCHMARKS.md."
    )
    parser.add_argument("--shape", nargs="+", default=["demo"], choices=SHAPES, help="model shape(s), one row each")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to run (warm-up included)")
    parser.add_argument("--warmup_steps", type=int, default=10, help="first steps left out of the figures")
    parser.add_argument("--seq_length", type=int, default=None, help="tokens per pack (default: the shape's)")
    parser.add_argument("--batch_size", type=int, default=None, help="packs per step (default: the shape's)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: the shape's)")
    parser.add_argument("--max_images_per_pack", type=int, default=None, help="image cap per pack (default: shape's)")
    parser.add_argument("--pack_buffer_size", type=int, default=None,
                        help="samples each worker packs at once (default: the shape's; held in memory with pixels)")
    parser.add_argument("--pad_to_multiple_of", type=int, default=None, help="pad packed rows to a multiple of this")
    parser.add_argument("--data", choices=["synthetic", "random"], default=None,
                        help="synthetic visual-QA rows through SampleBuilder, or FineVision-like random samples "
                             "(default: synthetic for tiny/demo, random for 460m)")
    parser.add_argument("--rows", type=int, default=2000, help="rows in the source (read again each epoch)")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                        help="pack samples (default) or one sample per row padded to --seq_length (baseline)")
    parser.add_argument("--attn_implementation", choices=ATTN_CHOICES, default="sdpa", help="attention kernel")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: the package's, on for bf16 GPUs, off on CPU)")
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in the backward pass")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model (Trainer's torch_compile)")
    parser.add_argument("--compile_regions", action="store_true",
                        help="torch.compile each repeated layer once (Accelerate's regional compilation)")
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="after --steps, profile this many more steps (bench/step_profile.py): kernel time by "
                             "kind, the top kernels, GPU busy fraction; written under 'profile'")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--pipeline_batches", type=int, default=100, help="batches for the pipeline-alone timing")
    parser.add_argument("--pipeline_only", action="store_true",
                        help="skip training: time the data pipeline and measure its real-token fraction only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"), help="JSON path")
    return parser


COLUMNS = [
    ("shape", "shape", ""), ("data", "data", ""), ("packing", "packed", ""), ("batch_size", "B", "d"),
    ("seq_length", "T", "d"), ("step_time_s", "step s", ".3f"), ("tokens_per_s", "tok/s", ".0f"),
    ("real_tokens_per_s", "real tok/s", ".0f"), ("real_token_fraction", "real frac", ".4f"),
    ("data_pct", "data %", ".1f"), ("fwd_bwd_pct", "fwd+bwd %", ".1f"), ("optimizer_pct", "optim %", ".1f"),
    ("peak_mem_mib", "peak MiB", ".0f"), ("model_tflops_per_s", "TFLOP/s", ".4f"), ("mfu", "MFU", ".3f"),
    ("pipeline_bps", "pipe batch/s", ".2f"), ("pipeline_ratio", "pipe/train", ".1f"),
]


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    row = dict(result)
    split = result.get("time_split") or {}
    row.update({f"{k}_pct": 100 * v for k, v in split.items()})
    row["data_pct"] = 100 * split["data_wait"] if split else None
    row["peak_mem_mib"] = result["peak_memory_bytes"] / 2**20 if result.get("peak_memory_bytes") else None
    row["pipeline_bps"] = result["pipeline"]["batches_per_s"]
    row["pipeline_ratio"] = result["pipeline"].get("ratio")
    if result.get("real_token_fraction") is None:
        row["real_token_fraction"] = result["pipeline"]["real_token_fraction"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_environment()
    if args.profile_steps < 0:
        raise SystemExit(f"--profile_steps must be >= 0, got {args.profile_steps}.")
    if not args.pipeline_only and args.steps <= args.warmup_steps:
        raise SystemExit(f"--steps ({args.steps}) must be greater than --warmup_steps ({args.warmup_steps}).")
    machine = machine_info(resolve_device(args.device))
    machine["torch_threads"] = args.threads or machine["torch_threads"]
    print(f"machine: {machine['cpu']} ({machine['cpus_usable']} usable cores), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {machine.get('gpu', 'no GPU')}; load {machine['load_average']}")
    with torch_threads(args.threads):
        results = [run_shape(args, shape) for shape in args.shape]
    print(format_table([table_row(r) for r in results], COLUMNS))
    for r in results:
        if r.get("profile"):
            print(f"{r['shape']} {format_profile(r['profile'])}")
    for r in results:
        print(f"{r['shape']}: load average start {r['load_average_start']}, end {r['load_average_end']}; "
              f"params {r['params']['total'] / 1e6:.2f}M; pipeline first batch {r['pipeline']['time_to_first_batch_s']:.2f} s")
    report = {"config": args_dict(args), "machine": machine, "runs": results}
    print(f"wrote {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    quiet_logging()
    main()
