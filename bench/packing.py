"""Benchmark the knapsack packer against nanoVLM's balanced greedy packer on FineVision-like lengths.

Workload (an assumption; FineVision's exact length histogram is not at hand offline). It follows nanoVLM's defaults:
512 px tiles of 64 image tokens each (SigLIP 512/16 = 32x32 patches, pixel shuffle 4), images split into an r x c
grid of tiles plus one global view when r x c > 1, `max_sample_length` 4096, at most 4 images per sample, packs of
4096 tokens with at most 18 images.

- images per sample: 0 with p=0.10 (text-only subsets), 1 with p=0.75, 2/3/4 with p=0.08/0.04/0.03;
- tile grid per image: rows and columns each 1/2/3/4 with p=0.35/0.30/0.20/0.15, so 64 tokens (1x1, no global
  view) up to 17 x 64 = 1088 tokens (4x4 + global view), mean ~470;
- text tokens: log-normal with median 150 and sigma 1.1 (short VQA answers, a heavy tail of OCR, captions and
  multi-turn conversations), at least 8 tokens;
- samples over 4096 tokens are skipped, as nanoVLM does (reported as "skipped by the length filter").

Both packers see the same samples in rounds of `--buffer-size` samples (what `PackedDataset` does, no carry-over
between rounds). The pack order within a round is shuffled before batching. Reported per packer: the real-token
fraction with rows padded to the longest row of batches of `--batch-size` packs (our collator) and padded to
seq_length (nanoVLM), packing speed on one core, and the items each packer drops. A last section times the
`PackedDataset` end to end (reading samples with tiny tensors, packing, shuffling, state bookkeeping).

    python bench/packing.py --samples 100000 --out bench/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from nanovlm_packer import group_lengths, nanovlm_balanced_greedy, real_token_fraction

from nanovlm.data.packing import PackedDataset, knapsack_pack

TOKENS_PER_TILE = 64


def make_workload(n: int, seed: int, max_sample_length: int, max_grid: int = 4) -> tuple[list[int], list[int], int]:
    """Draw n FineVision-like samples: (token lengths, image counts, number skipped by the length filter).

    `max_grid` caps the tile grid's rows and columns (1: every image is one 64-token tile, so the image cap binds).
    """
    lengths, images, _, skipped = make_workload_with_tiles(n, seed, max_sample_length, max_grid)
    return lengths, images, skipped


def make_workload_with_tiles(
    n: int, seed: int, max_sample_length: int, max_grid: int = 4
) -> tuple[list[int], list[int], list[int], int]:
    """`make_workload` (the same draws), plus each sample's tile count: (lengths, images, tiles, skipped)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    images: list[int] = []
    sample_tiles: list[int] = []
    skipped = 0
    while len(lengths) < n:
        m = 2 * (n - len(lengths)) + 16
        n_img = rng.choice(5, size=m, p=[0.10, 0.75, 0.08, 0.04, 0.03])
        text = np.maximum(8, rng.lognormal(math.log(150), 1.1, size=m)).astype(int)
        grid = np.minimum(max_grid, rng.choice([1, 2, 3, 4], size=(m, 4, 2), p=[0.35, 0.30, 0.20, 0.15]))
        tiles = grid[..., 0] * grid[..., 1]
        tiles = np.where(tiles > 1, tiles + 1, tiles)  # global view when the image is split
        n_tiles = (tiles * (np.arange(4)[None, :] < n_img[:, None])).sum(1)
        total = text + n_tiles * TOKENS_PER_TILE
        keep = total <= max_sample_length
        skipped += int((~keep).sum())
        lengths += total[keep].tolist()
        images += n_img[keep].tolist()
        sample_tiles += n_tiles[keep].tolist()
    return lengths[:n], images[:n], sample_tiles[:n], skipped


def run_packer(name: str, lengths: list[int], images: list[int], args: argparse.Namespace) -> dict:
    """Pack the workload round by round with one packer; return fill, speed and drops."""
    rounds = range(0, len(lengths), args.buffer_size)
    pack_lengths: list[int] = []
    dropped = 0
    seconds = 0.0
    shuffle = random.Random(args.seed)
    for start in rounds:
        lens, imgs = lengths[start : start + args.buffer_size], images[start : start + args.buffer_size]
        t0 = time.perf_counter()
        if name == "ours (knapsack_pack)":
            groups = knapsack_pack(lens, imgs, args.seq_length, args.max_images)
        else:
            overflow = "drop" if "drop" in name else "new_bin"
            groups, lost = nanovlm_balanced_greedy(lens, imgs, args.seq_length, args.max_images, overflow=overflow)
            dropped += len(lost)
        seconds += time.perf_counter() - t0
        shuffle.shuffle(groups)
        pack_lengths += group_lengths(groups, lens)
    return {
        "packer": name,
        "packs": len(pack_lengths),
        "fraction_pad_longest": real_token_fraction(pack_lengths, args.batch_size),
        "fraction_pad_longest_x64": real_token_fraction(pack_lengths, args.batch_size, pad_to_multiple_of=64),
        "fraction_pad_to_L": real_token_fraction(pack_lengths, 1, pad_to_length=args.seq_length),
        "mean_pack_fill": sum(pack_lengths) / (len(pack_lengths) * args.seq_length),
        "samples_per_s": (len(lengths) - dropped) / seconds,
        "packs_per_s": len(pack_lengths) / seconds,
        "dropped": dropped,
    }


class _Samples:
    """Map-style source of processed samples with tiny tensors (lengths as drawn, images as 1x1 px tiles)."""

    def __init__(self, lengths: list[int], images: list[int]) -> None:
        self.lengths, self.images = lengths, images
        self.pixels = torch.zeros(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        n = self.lengths[i]
        ids = torch.empty(n, dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": ids,
            "pixel_values": self.pixels.expand(self.images[i], 3, 1, 1) if self.images[i] else None,
            "n_images": self.images[i],
        }


def run_dataset(lengths: list[int], images: list[int], args: argparse.Namespace) -> dict:
    """Time PackedDataset end to end (num_workers=0) and measure the fill of what it yields."""
    n = min(len(lengths), args.dataset_samples)
    dataset = PackedDataset(
        _Samples(lengths[:n], images[:n]), args.seq_length, args.max_images, args.buffer_size, seed=args.seed
    )
    t0 = time.perf_counter()
    pack_lengths = [sum(len(s["input_ids"]) for s in pack["samples"]) for pack in dataset]
    seconds = time.perf_counter() - t0
    return {
        "samples": n,
        "packs": len(pack_lengths),
        "fraction_pad_longest": real_token_fraction(pack_lengths, args.batch_size),
        "fraction_pad_to_L": real_token_fraction(pack_lengths, 1, pad_to_length=args.seq_length),
        "samples_per_s": n / seconds,
        "packs_per_s": len(pack_lengths) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples to pack")
    parser.add_argument("--seq_length", "--seq-length", type=int, default=4096, help="tokens per pack")
    parser.add_argument("--max_images", "--max-images", type=int, default=18, help="images per pack")
    parser.add_argument("--buffer_size", "--buffer-size", type=int, default=1024,
        help="samples packed together per round")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=2,
        help="packs per batch (rows padded to the longest)")
    parser.add_argument("--dataset_samples", "--dataset-samples", type=int, default=20_000,
        help="samples for the PackedDataset timing")
    parser.add_argument("--max_grid", "--max-grid", type=int, default=4,
        help="tile grid rows/cols cap (1: single-tile images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/packing.json"), help="JSON results path")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lengths, images, skipped = make_workload(args.samples, args.seed, args.seq_length, args.max_grid)
    print(
        f"workload: {len(lengths)} samples, mean {np.mean(lengths):.0f} tokens (median {np.median(lengths):.0f}, "
        f"p99 {np.percentile(lengths, 99):.0f}), mean {np.mean(images):.2f} images; {skipped} skipped over "
        f"{args.seq_length} tokens; seq_length {args.seq_length}, max {args.max_images} images/pack, "
        f"rounds of {args.buffer_size}, batches of {args.batch_size}"
    )
    names = ["ours (knapsack_pack)", "nanoVLM balanced greedy", "nanoVLM balanced greedy, drop"]
    results = [run_packer(name, lengths, images, args) for name in names]
    header = f"{'packer':<30} {'packs':>7} {'real/longest':>12} {'real/L':>7} {'samples/s':>10} {'packs/s':>9} {'dropped':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['packer']:<30} {r['packs']:>7} {r['fraction_pad_longest']:>12.4f} {r['fraction_pad_to_L']:>7.4f} "
            f"{r['samples_per_s']:>10.0f} {r['packs_per_s']:>9.0f} {r['dropped']:>7}"
        )
    dataset = run_dataset(lengths, images, args)
    print(
        f"PackedDataset end to end ({dataset['samples']} samples): real/longest {dataset['fraction_pad_longest']:.4f}, "
        f"real/L {dataset['fraction_pad_to_L']:.4f}, {dataset['samples_per_s']:.0f} samples/s, "
        f"{dataset['packs_per_s']:.0f} packs/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"config": config, "skipped_by_length_filter": skipped, "packers": results, "dataset": dataset}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
