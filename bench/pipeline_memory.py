"""One DataLoader worker's memory and speed through measure -> pack -> build, at the 460m recipe's settings.

Workload: FineVision-like streaming rows of JPEG photos (sizes 640x480 to 1600x1200, quality 75-85; 0-4 images per
row, 1.5 on average; 1-4 turns of random words; about 1,500-1,800 tokens per built sample), read as a stream
through `datasets` (`IterableDataset.from_generator`, images undecoded, with its shuffle buffer of
`--shuffle_buffer` rows) -> `SampleStream` -> `PackedDataset` (4096-token packs, at most 18 images each) ->
`PackedCollator` (2 packs per batch). Every row holds its own copy of its JPEG bytes, as a real stream's rows do.
The tokenizer is a byte-level BPE trained locally (nothing is downloaded); the tiles are 512 px (64 tokens each),
long side up to 2048 px, as configs/train/nanovlm_460m.yaml.

For each `--buffers` size a fresh process (one worker: one torch thread) records its RSS right before reading,
then reads one round (measures `buffer` rows), builds the first `--packs` packs in pairs through the collator,
and reports the peak RSS above that start (sampled every 2 ms), plus its seconds per row read and measured
(the stream's reading included) and per sample built. The real-token fraction (rows of 2 packs padded to the longer one) comes from the measured lengths of the
largest buffer's round, resampled to `--fraction_samples` samples, packed round by round at each buffer size
(measured lengths equal built lengths: tests/test_data_measure.py).

Memory also reports the bytes of undecoded rows the stream spilled to its temporary file for the round (on disk,
not in the worker's RSS; see `nanovlm.data.readers.RowSpill`).

Speed, like for like, in one more fresh process: the first `--speed_rows` rows of the same stream (read once into
a list, so the stream's reading is left out of both), each one through the old builder (a full build of every row:
decode, tile, tokenize; a row then found too long was built for nothing) and through the new pipeline (measure and
spill every row, build the kept ones from the spill), row by row in turn so that the machine's load hits both
alike. samples/s = samples built / seconds. The new pipeline's token rate for 4 workers is compared with what one
H100 consumes at 40% MFU by the FLOP model of `nanovlm.training.flops` (460m model, the largest buffer's batches'
tokens and tiles; 989 TFLOP/s bf16 dense peak).

    python bench/pipeline_memory.py --out bench/results/pipeline_memory.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    args_dict,
    build_config,
    build_processor_for_shape,
    build_tokenizer,
    format_table,
    get_shape,
    machine_info,
    photo_like_image,
    quiet_logging,
    setup_environment,
    write_json,
)

SIZES = [(640, 480), (1024, 768), (800, 1200), (1600, 1200), (512, 512), (1200, 900)]
WORDS = (
    "what is shown in the image describe the chart table value year total left right top bottom color red blue "
    "green how many people are there read the text on the sign answer with a single word the document says that"
).split()
H100_PEAK, MFU = 989e12, 0.40


def jpeg_pool(seed: int) -> list[bytes]:
    """Encoded JPEG photos of the SIZES at two qualities (12 distinct images)."""
    pool = []
    for k, (w, h) in enumerate(SIZES):
        for quality in (75, 85):
            buffer = io.BytesIO()
            photo_like_image(w, h, seed + k).save(buffer, format="JPEG", quality=quality)
            pool.append(buffer.getvalue())
    return pool


def row_generator(seed: int, pool: list[bytes]):
    """Endless FineVision-like rows; each row holds its own copy of its images' bytes."""
    rng = np.random.default_rng(seed)
    while True:
        n_images = int(rng.choice(5, p=[0.10, 0.45, 0.30, 0.10, 0.05]))
        turns = int(rng.integers(1, 5))
        texts = []
        for _ in range(turns):
            question = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 30)))) + "?"
            answer = " ".join(rng.choice(WORDS, size=max(1, int(rng.lognormal(np.log(120), 1.0)))))
            texts.append({"user": question, "assistant": answer})
        images = [{"bytes": bytes(bytearray(pool[int(rng.integers(len(pool)))])), "path": None}
                  for _ in range(n_images)]
        yield {"images": images, "texts": texts, "relevance_ratings": [5] * turns}


def stream(seed: int, pool: list[bytes], shuffle_buffer: int):
    """The rows as a `datasets` stream with images undecoded, shuffled through its buffer."""
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image(decode=False)),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        "relevance_ratings": datasets.List(datasets.Value("int64")),
    })
    rows = datasets.IterableDataset.from_generator(
        row_generator, features=features, gen_kwargs={"seed": seed, "pool": pool}
    )
    return rows.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else rows


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Samples this process's RSS every `interval` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One worker at one buffer size: RSS above start, seconds per measured row and per built sample."""
    import torch

    from nanovlm.data import PackedCollator, PackedDataset, SampleBuilder, SampleStream
    from nanovlm.data.collator import BOOKKEEPING_KEY
    from nanovlm.data.packing import Measured
    from nanovlm.training.flops import estimate_flops

    torch.set_num_threads(1)  # what a DataLoader worker gets
    spec = get_shape("460m")
    tokenizer = build_tokenizer(spec)
    config = build_config(spec, tokenizer)
    processor = build_processor_for_shape(spec, tokenizer, config)
    builder = SampleBuilder(processor, max_sample_length=spec.max_sample_length,
                            max_images_per_example=spec.max_images_per_example)
    source = SampleStream(stream(args.seed, jpeg_pool(args.seed), args.shuffle_buffer), builder)
    packed = PackedDataset(source, seq_length=spec.seq_length, max_images_per_pack=spec.max_images_per_pack,
                           buffer_size=args.child)
    collator = PackedCollator(tokenizer.pad_token_id)

    measured: list[Measured] = []
    measure_from = source.measure_from
    spilled = [0]

    measure_seconds = [0.0]

    def recording(start, stride):  # time each measure; keep the round's lengths for the fill figure
        items = measure_from(start, stride)
        while True:
            t0 = time.perf_counter()
            item = next(items, StopIteration)
            measure_seconds[0] += time.perf_counter() - t0
            if item is StopIteration:
                return
            spilled[0] = source.spilled_bytes
            if item is not None:
                measured.append(Measured(item.length, item.n_images, item.n_tiles, None))
            yield item

    source.measure_from = recording
    build_seconds = [0.0]
    build_measured = source.build_measured

    def timed_build(item):
        t0 = time.perf_counter()
        out = build_measured(item)
        build_seconds[0] += time.perf_counter() - t0
        return out

    source.build_measured = timed_build
    import gc

    gc.collect()
    sampler = PeakSampler()
    start_rss = rss_bytes()
    sampler.start()
    iterator = iter(packed)
    first = next(iterator)
    packs, flops, tokens, tiles = [first], 0.0, 0, 0
    batches = 0
    while batches < args.packs // 2:
        packs.append(next(iterator))
        if len(packs) == 2:
            batch = collator(packs)
            flops += estimate_flops(config, batch[BOOKKEEPING_KEY]["stats"])
            tokens += batch[BOOKKEEPING_KEY]["stats"]["num_real_tokens"]
            tiles += batch[BOOKKEEPING_KEY]["stats"]["num_tiles"]
            batches += 1
            packs = []
            del batch
    sampler.running = False
    sampler.join()
    samples_built = builder.counter.built
    measure_s = measure_seconds[0]  # reading the stream included (the first row waits for the shuffle buffer)
    return {
        "buffer": args.child, "start_rss_mib": start_rss / 2**20, "peak_rss_mib": sampler.peak / 2**20,
        "above_start_mib": (sampler.peak - start_rss) / 2**20, "rows_measured": len(measured),
        "spilled_mib": spilled[0] / 2**20,
        "measure_ms_per_row": 1e3 * max(measure_s, 0.0) / max(len(measured), 1),
        "build_ms_per_sample": 1e3 * build_seconds[0] / max(samples_built, 1), "samples_built": samples_built,
        "tokens_per_sample": tokens / max(samples_built, 1), "flops_per_token": flops / max(tokens, 1),
        "tiles": tiles, "lengths": [m.length for m in measured], "images": [m.n_images for m in measured],
        "skipped": builder.counter.as_dict(),
    }


def speed_child(args: argparse.Namespace) -> dict[str, Any]:
    """Old builder (full build of every row) vs new pipeline (measure + spill every row, build the kept ones) on
    the same rows, row by row in turn: seconds, samples built and tokens of each."""
    import torch

    from nanovlm.data import SampleBuilder, SampleStream

    torch.set_num_threads(1)
    spec = get_shape("460m")
    tokenizer = build_tokenizer(spec)
    processor = build_processor_for_shape(spec, tokenizer, build_config(spec, tokenizer))

    def builder() -> SampleBuilder:
        return SampleBuilder(processor, max_sample_length=spec.max_sample_length,
                             max_images_per_example=spec.max_images_per_example)

    rows = list(itertools.islice(stream(args.seed, jpeg_pool(args.seed), args.shuffle_buffer), args.speed_rows + 1))
    old, new = builder(), SampleStream(rows, builder())
    old.build(rows[0])  # warm-up, not timed
    warm = next(new.measure_from(0, 1))
    if warm is not None:
        new.build_measured(warm)
    old.counter.reset()
    new.counter.reset()
    old_s = new_s = 0.0
    tokens = 0
    for position in range(1, len(rows)):
        t0 = time.perf_counter()
        old.build(rows[position])
        t1 = time.perf_counter()
        item = next(new.measure_from(position, 1))
        sample = None if item is None else new.build_measured(item)
        t2 = time.perf_counter()
        old_s, new_s = old_s + t1 - t0, new_s + t2 - t1
        tokens += 0 if sample is None else len(sample["input_ids"])
    new_built = new.counter.built
    return {
        "rows": len(rows) - 1, "old_seconds": old_s, "old_built": old.counter.built, "new_seconds": new_s,
        "new_built": new_built, "old_samples_per_s": old.counter.built / old_s,
        "new_samples_per_s": new_built / new_s, "tokens_per_sample": tokens / max(new_built, 1),
        "old_skipped": old.counter.as_dict(), "new_skipped": new.counter.as_dict(),
    }


def fractions(lengths: list[int], images: list[int], buffers: list[int], n: int, seed: int) -> dict[int, float]:
    """Real-token fraction (2 packs per batch, padded to the longer) at each buffer on n resampled samples."""
    from nanovlm_packer import real_token_fraction

    from nanovlm.data.packing import knapsack_pack

    rng = random.Random(seed)
    picks = [rng.randrange(len(lengths)) for _ in range(n)]
    out = {}
    for buffer in buffers:
        pack_lengths = []
        for start in range(0, n, buffer):
            idx = picks[start : start + buffer]
            groups = knapsack_pack([lengths[i] for i in idx], [images[i] for i in idx], 4096, 18)
            rng.shuffle(groups)
            pack_lengths += [sum(lengths[idx[i]] for i in g) for g in groups]
        out[buffer] = real_token_fraction(pack_lengths, batch_size=2)
    return out


COLUMNS = [
    ("buffer", "buffer", "d"), ("start_rss_mib", "start MiB", ".0f"), ("peak_rss_mib", "peak MiB", ".0f"),
    ("above_start_mib", "above start MiB", ".0f"), ("measure_ms_per_row", "read+measure ms/row", ".1f"),
    ("build_ms_per_sample", "build ms/sample", ".0f"), ("samples_built", "built", "d"),
    ("spilled_mib", "spilled MiB (disk)", ".0f"),
    ("real_token_fraction", "real-token fraction", ".4f"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buffers", nargs="+", type=int, default=[16, 128, 512, 2048], help="pack buffer sizes")
    parser.add_argument("--packs", type=int, default=8, help="packs built (in batches of 2) per buffer size")
    parser.add_argument("--shuffle_buffer", type=int, default=1000, help="datasets' stream shuffle buffer (rows)")
    parser.add_argument("--fraction_samples", type=int, default=32768, help="samples for the fill figure")
    parser.add_argument("--speed_rows", type=int, default=64, help="rows of the old-vs-new speed comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_memory.json"), help="JSON path")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_environment()
    if args.child is not None or args.speed_child:
        print(json.dumps(speed_child(args) if args.speed_child else child(args)))
        return {}
    machine = machine_info("cpu")
    runs = []
    for buffer in args.buffers:
        cmd = [sys.executable, __file__, "--child", str(buffer), "--packs", str(args.packs),
               "--shuffle_buffer", str(args.shuffle_buffer), "--seed", str(args.seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"buffer {buffer}: {runs[-1]['above_start_mib']:.0f} MiB above start", flush=True)
    cmd = [sys.executable, __file__, "--speed_child", "--speed_rows", str(args.speed_rows),
           "--shuffle_buffer", str(args.shuffle_buffer), "--seed", str(args.seed)]
    speed = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    largest = max(runs, key=lambda r: r["buffer"])
    fill = fractions(largest["lengths"], largest["images"], args.buffers, args.fraction_samples, args.seed)
    for run in runs:
        run["real_token_fraction"] = fill[run["buffer"]]
        del run["lengths"], run["images"]
    print(format_table(runs, COLUMNS))
    pipeline_rate, old_rate = speed["new_samples_per_s"], speed["old_samples_per_s"]
    tokens_per_s_4 = 4 * pipeline_rate * speed["tokens_per_sample"]
    h100_tokens_per_s = H100_PEAK * MFU / largest["flops_per_token"]
    small = min(runs, key=lambda r: r["buffer"])
    summary = {
        "largest_above_start_mib": largest["above_start_mib"],
        "largest_vs_smallest": largest["above_start_mib"] / small["above_start_mib"],
        "pipeline_samples_per_s": pipeline_rate, "old_builder_samples_per_s": old_rate,
        "pipeline_over_old_builder": pipeline_rate / old_rate,
        "tokens_per_s_4_workers": tokens_per_s_4, "h100_40pct_mfu_tokens_per_s": h100_tokens_per_s,
        "workers4_over_h100": tokens_per_s_4 / h100_tokens_per_s,
    }
    print(f"buffer {largest['buffer']} vs {small['buffer']}: {summary['largest_vs_smallest']:.2f}x the memory above "
          f"start; pipeline {pipeline_rate:.2f} samples/s per worker, old builder {old_rate:.2f} "
          f"({pipeline_rate / old_rate:.2f}x, {speed['rows']} rows); 4 workers "
          f"{tokens_per_s_4:.0f} tokens/s = {summary['workers4_over_h100']:.2f}x one H100 at 40% MFU "
          f"({h100_tokens_per_s:.0f} tokens/s at {largest['flops_per_token'] / 1e9:.2f} GFLOP/token)")
    report = {"config": args_dict(args), "machine": machine, "runs": runs, "speed": speed, "summary": summary}
    print(f"wrote {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    quiet_logging()
    main()
