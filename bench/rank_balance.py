"""Balance across ranks: the per-step max/mean over 8 ranks of the training FLOP estimate, with and without balancing.

A data-parallel step waits for its slowest rank, and a rank's cost depends on its packs: tokens for the LM, tiles
for the ViT (at the 460m shapes one 512 px tile costs about as much as 220 LM tokens, so a 4096-token pack of 64
single tiles costs ~4x a text-only one). This simulation draws each rank's samples from the FineVision-like
distribution of `bench/packing.py` (with each sample's tile count), packs them with `PackedDataset` itself
(rounds of `--buffer-size` measured samples, `knapsack_pack`, its pack order), batches `--batch-size` packs per
micro-batch and `--accumulation` micro-batches per optimizer step (the 460m recipe: 2 x 8), and prices every
micro-batch with the trainer's FLOP model (`nanovlm.training.flops.estimate_flops`, the 460m `NanoVLMConfig()`).
Each rank is one pack stream (a rank's DataLoader workers each pack such a stream; interleaving them does not
change the distribution).

Reported per variant: mean and p95/max over steps of (max over ranks / mean over ranks), per optimizer step (what
DDP waits for: gradients are all-reduced once per step) and per micro-batch (FSDP gathers every micro-batch), and
the real-token fraction and the samples a cap skips (what a variant costs). Variants:

- `images<=18`: today's recipe (at most 18 images per pack);
- `tiles<=T`: the cap counts tiles instead (`PackedDataset(image_unit="tiles")`), which bounds a pack's ViT work;
- `..., balanced`: the same caps, packs ordered by `PackedDataset(pack_cost=pack_flops, balance_group=batch
  size)` (`--balance_batches`): each round's packs are dealt by FLOP cost into micro-batches, heavy with light.

    python bench/rank_balance.py --steps 200 --out bench/results/rank_balance.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import numpy as np
from packing import make_workload_with_tiles

from nanovlm import NanoVLMConfig
from nanovlm.data.packing import Measured, PackedDataset
from nanovlm.training.flops import estimate_flops, pack_flops


class MeasuredWorkload:
    """A measuring source over drawn (length, images, tiles): `PackedDataset` plans and orders packs exactly as it
    does on real rows; building a sample only returns its (length, tiles)."""

    def __init__(self, lengths: list[int], images: list[int], tiles: list[int]) -> None:
        self.items = list(zip(lengths, images, tiles))

    def measure_from(self, start: int, stride: int):
        for i in range(start, len(self.items), stride):
            length, images, tiles = self.items[i]
            yield Measured(length, images, tiles, i)

    def build_measured(self, item: Measured) -> dict:
        return {"length": item.length, "tiles": item.n_tiles}


def rank_packs(
    config, rank: int, n_packs: int, args: argparse.Namespace, cap: int, unit: str, balanced: bool
) -> tuple[list[tuple[int, int]], float]:
    """`n_packs` packs of one rank as (real tokens, tiles), from `PackedDataset` (rounds of `args.buffer_size`), and
    the fraction of drawn samples skipped for having more images (or tiles) than the cap."""
    lengths, images, tiles, _ = make_workload_with_tiles(
        int(n_packs * 4096 / 600) + args.buffer_size, args.seed * 1000 + rank, args.seq_length
    )
    units = tiles if unit == "tiles" else images
    keep = [i for i in range(len(lengths)) if units[i] <= cap]  # over the cap: skipped upstream, as the builder does
    dropped = len(lengths) - len(keep)
    source = MeasuredWorkload([lengths[i] for i in keep], [images[i] for i in keep], [tiles[i] for i in keep])
    balance = {"pack_cost": functools.partial(pack_flops, config), "balance_group": args.batch_size}
    dataset = PackedDataset(source, args.seq_length, cap, buffer_size=args.buffer_size, seed=args.seed + rank,
                            image_unit=unit, **(balance if balanced else {}))
    packs = [(sum(s["length"] for s in p["samples"]), sum(s["tiles"] for s in p["samples"]))
             for p in itertools.islice(dataset, n_packs)]
    if len(packs) < n_packs:
        raise ValueError(f"rank {rank} drew only {len(packs)} of {n_packs} packs: raise the workload size")
    return packs, dropped / len(lengths)


def micro_batch_flops(config, packs: list[tuple[int, int]]) -> float:
    """The trainer's FLOP estimate of one micro-batch (rows padded to the longest pack, as the collator does)."""
    width = max(tokens for tokens, _ in packs)
    real = sum(tokens for tokens, _ in packs)
    stats = {
        "num_rows": len(packs), "row_length": width, "num_real_tokens": real,
        "num_pad_tokens": len(packs) * width - real, "num_tiles": sum(t for _, t in packs),
    }
    return estimate_flops(config, stats)


def simulate(config, args: argparse.Namespace, name: str, cap: int, unit: str, balanced: bool) -> dict:
    """One variant's figures (see the module docstring)."""
    per_step = args.batch_size * args.accumulation
    n_packs = args.steps * per_step
    micro = np.zeros((args.ranks, args.steps * args.accumulation))  # FLOPs per rank per micro-batch
    real = padded = 0
    dropped = []
    for rank in range(args.ranks):
        packs, drop = rank_packs(config, rank, n_packs, args, cap, unit, balanced)
        dropped.append(drop)
        for m in range(args.steps * args.accumulation):
            batch = packs[m * args.batch_size : (m + 1) * args.batch_size]
            micro[rank, m] = micro_batch_flops(config, batch)
            real += sum(t for t, _ in batch)
            padded += len(batch) * max(t for t, _ in batch)
    step = micro.reshape(args.ranks, args.steps, args.accumulation).sum(-1)
    step_ratio = step.max(0) / step.mean(0)
    micro_ratio = micro.max(0) / micro.mean(0)
    return {
        "variant": name,
        "step_max_over_mean": float(step_ratio.mean()),
        "step_max_over_mean_p95": float(np.percentile(step_ratio, 95)),
        "step_max_over_mean_max": float(step_ratio.max()),
        "micro_max_over_mean": float(micro_ratio.mean()),
        "micro_max_over_mean_p95": float(np.percentile(micro_ratio, 95)),
        "real_token_fraction": real / padded,
        "samples_skipped_by_cap": float(np.mean(dropped)),
        "tflops_per_step_mean": float(step.mean() / 1e12),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps simulated per rank")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=2, help="packs per micro-batch (460m: 2)")
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per step (460m: 8)")
    parser.add_argument("--seq_length", "--seq-length", type=int, default=4096)
    parser.add_argument("--max_images", "--max-images", type=int, default=18, help="today's per-pack image cap")
    parser.add_argument("--tile_caps", "--tile-caps", type=int, nargs="*", default=[48, 32],
        help="per-pack tile caps to try")
    parser.add_argument("--buffer_size", "--buffer-size", type=int, default=2048,
        help="samples packed per round (460m: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/rank_balance.json"))
    args = parser.parse_args()

    config = NanoVLMConfig()  # the 460m shapes (SigLIP2-B/16-512 + SmolLM2-360M)
    variants = [(f"images<={args.max_images}", args.max_images, "images", False)]
    variants += [(f"tiles<={cap}", cap, "tiles", False) for cap in args.tile_caps]
    variants += [(f"images<={args.max_images}, balanced", args.max_images, "images", True)]
    variants += [(f"tiles<={cap}, balanced", cap, "tiles", True) for cap in args.tile_caps[-1:]]
    results = [simulate(config, args, *v) for v in variants]

    print(f"{args.ranks} ranks, {args.steps} steps of {args.batch_size} packs x {args.accumulation} micro-batches, "
          f"{args.seq_length}-token packs, rounds of {args.buffer_size} samples; FLOPs: 460m estimate_flops")
    header = (f"{'variant':<28} {'step max/mean':>13} {'p95':>6} {'max':>6} {'micro max/mean':>14} {'p95':>6} "
              f"{'real frac':>9} {'skipped':>7} {'TFLOP/step':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['variant']:<28} {r['step_max_over_mean']:>13.3f} {r['step_max_over_mean_p95']:>6.3f} "
              f"{r['step_max_over_mean_max']:>6.3f} {r['micro_max_over_mean']:>14.3f} "
              f"{r['micro_max_over_mean_p95']:>6.3f} {r['real_token_fraction']:>9.4f} "
              f"{r['samples_skipped_by_cap']:>7.4f} {r['tflops_per_step_mean']:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config_out = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config_out, "variants": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
