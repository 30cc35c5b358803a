"""Bench-only baselines: the original nanoVLM packer, and how much of a batch is real tokens.

- `nanovlm_balanced_greedy` re-implements the original nanoVLM packer, the baseline of `bench/packing.py`.
- `real_token_fraction` measures how much of a batch is real tokens, for rows padded to the longest row of each
  batch (what `PackedCollator` does) or to a fixed length (what nanoVLM does).

Imported by the bench scripts as a sibling module (like `common`); the library's packer is
`nanovlm.data.packing.knapsack_pack`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

from nanovlm.data.knapsack import NANOVLM_EXTRA_PACKS

__all__ = ["group_lengths", "nanovlm_balanced_greedy", "real_token_fraction"]


def nanovlm_balanced_greedy(
    lengths: Sequence[int],
    n_images: Sequence[int],
    seq_length: int,
    max_images: int | None = None,
    delta: int = NANOVLM_EXTRA_PACKS,
    overflow: Literal["new_bin", "drop"] = "new_bin",
) -> tuple[list[list[int]], list[int]]:
    """The original nanoVLM packer ("balanced greedy knapsack"), kept as a baseline for benchmarks.

    Items are taken longest first. It opens ceil(total length / seq_length) + `delta` packs up front and puts
    each item into the least-loaded pack (packs re-sorted by load for every item) that fits its length and has
    image room. nanoVLM then left-pads every pack to `seq_length`.

    Args:
        lengths: token count of each item.
        n_images: image count of each item.
        seq_length: the most tokens a pack may hold.
        max_images: the most images a pack may hold; None for no cap.
        delta: extra packs opened up front (nanoVLM uses 5).
        overflow: what to do with an item that fits in no open pack: "new_bin" opens a pack for it (what the
            nanoVLM code does), "drop" leaves it out and reports it.

    Returns:
        (groups, dropped): non-empty groups of item indices, and the indices left out (items that do not fit an
        empty pack, which nanoVLM filters out before packing, plus with overflow="drop" the items that fit nowhere).
    """
    if overflow not in ("new_bin", "drop"):
        raise ValueError(f"overflow must be 'new_bin' or 'drop'; got {overflow!r}.")
    if len(lengths) != len(n_images):
        raise ValueError(f"got {len(lengths)} lengths but {len(n_images)} image counts; give one of each per item.")
    cap = math.inf if max_images is None else max_images
    items = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    dropped = [i for i in items if lengths[i] > seq_length or n_images[i] > cap]
    items = [i for i in items if lengths[i] <= seq_length and n_images[i] <= cap]
    n_bins = -(-sum(lengths[i] for i in items) // seq_length) + delta
    loads, images, groups = [0] * n_bins, [0] * n_bins, [[] for _ in range(n_bins)]
    for i in items:
        chosen = None
        for b in sorted(range(len(loads)), key=loads.__getitem__):  # least-loaded first
            if loads[b] + lengths[i] <= seq_length and images[b] + n_images[i] <= cap:
                chosen = b
                break
        if chosen is None:
            if overflow == "drop":
                dropped.append(i)
                continue
            chosen = len(loads)
            loads.append(0)
            images.append(0)
            groups.append([])
        groups[chosen].append(i)
        loads[chosen] += lengths[i]
        images[chosen] += n_images[i]
    return [g for g in groups if g], sorted(dropped)


def group_lengths(groups: Iterable[Sequence[int]], lengths: Sequence[int]) -> list[int]:
    """Total token length of each group of item indices."""
    return [sum(lengths[i] for i in group) for group in groups]


def real_token_fraction(
    pack_lengths: Sequence[int],
    batch_size: int = 1,
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> float:
    """Fraction of batch tokens that are real (not padding), packs batched in the given order.

    Args:
        pack_lengths: real tokens in each pack (one pack = one row).
        batch_size: rows per batch; consecutive packs form a batch, the last one may be short.
        pad_to_length: pad every row to this length (nanoVLM pads to seq_length); None pads each row to the longest
            row of its batch (what `PackedCollator` does).
        pad_to_multiple_of: round the padded row length up to a multiple of this.

    Returns:
        real tokens / (rows x padded row length), summed over batches; 1.0 for no packs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    real = sum(pack_lengths)
    total = 0
    for start in range(0, len(pack_lengths), batch_size):
        rows = pack_lengths[start : start + batch_size]
        width = max(rows) if pad_to_length is None else pad_to_length
        if width < max(rows):
            raise ValueError(f"a pack holds {max(rows)} tokens, more than pad_to_length={pad_to_length}.")
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        total += width * len(rows)
    return real / total if total else 1.0
