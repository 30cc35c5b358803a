"""The pure packers: groups of item indices from integers (token lengths, image counts, costs), no tensors.

- `knapsack_pack` groups items into packs under two caps, the sequence length and the number of images per pack
  (best-fit decreasing, or a balanced worst-fit when the image cap binds).
- `balanced_groups` deals packs into equal-size groups of near-equal cost (a worker's batches under
  `--balance_batches`), and `_split_to_multiple` splits packs so that a round fills whole groups.

Pure functions on integers, so they are tested and benchmarked without tensors; `packing.PackedDataset` uses them
(and `packing` re-exports them, where they lived first).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Sequence

NANOVLM_EXTRA_PACKS = 5  # nanoVLM opens ceil(total length / seq_length) + 5 packs up front

__all__ = ["NANOVLM_EXTRA_PACKS", "balanced_groups", "knapsack_pack"]


def _check_items(lengths: Sequence[int], n_images: Sequence[int], seq_length: int, max_images: int | None) -> None:
    """Raise ValueError unless every item fits in an empty pack on its own."""
    if len(lengths) != len(n_images):
        raise ValueError(
            f"lengths and n_images must have one entry per item; got {len(lengths)} lengths and "
            f"{len(n_images)} image counts."
        )
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive int; got {seq_length!r}.")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 0):
        raise ValueError(f"max_images must be None (no cap) or an int >= 0; got {max_images!r}.")
    if not lengths:
        return
    # Builtins over the whole list first (fast); locate the offender only when something is wrong.
    if max(lengths) > seq_length or min(lengths) < 1:
        i = next(i for i, n in enumerate(lengths) if n > seq_length or n < 1)
        raise ValueError(
            f"item {i} has length {lengths[i]}, outside [1, seq_length={seq_length}]: upstream must skip samples "
            f"longer than the sequence length (set the processor's max sample length <= {seq_length})."
        )
    if min(n_images) < 0 or (max_images is not None and max(n_images) > max_images):
        i = next(i for i, m in enumerate(n_images) if m < 0 or (max_images is not None and m > max_images))
        raise ValueError(
            f"item {i} has {n_images[i]} images, outside [0, max_images={max_images}]: upstream must skip samples "
            f"with more images than the per-pack cap (or raise max_images_per_pack)."
        )


def _best_fit_decreasing(
    lengths: Sequence[int], n_images: Sequence[int], seq_length: int, max_images: int | None
) -> list[list[int]]:
    """Longest item first, into the open pack with the least room left that fits it and has image room.

    Packs with room are kept in a list sorted by room left, so the tightest fit is one bisect away; only when that
    pack lacks image room do we scan on to roomier packs. Full packs, except a few at the end.
    """
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)  # stable: ties keep index order
    stride = n + 1  # a pack's key is room * stride + pack id: one int sorts by room, then by id
    keys: list[int] = []  # keys of the packs that still have room, ascending
    groups: list[list[int]] = []
    pack_images: list[int] = []
    capped = max_images is not None
    for i in order:
        length, images = lengths[i], n_images[i]
        pos = bisect_left(keys, length * stride)
        if capped and images:
            while pos < len(keys) and pack_images[keys[pos] % stride] + images > max_images:
                pos += 1  # tightest pack is out of image room: try the next roomier one
        if pos < len(keys):
            key = keys.pop(pos)
            pack, room = key % stride, key // stride - length
            groups[pack].append(i)
            pack_images[pack] += images
        else:
            pack, room = len(groups), seq_length - length
            groups.append([i])
            pack_images.append(images)
        if room > 0:
            insort(keys, room * stride + pack)
    return groups


def _worst_fit_balanced(
    lengths: Sequence[int], n_images: Sequence[int], seq_length: int, max_images: int | None, n_packs: int
) -> list[list[int]]:
    """Longest item first, into the least-loaded of `n_packs` packs that fits it and has image room (else a new one).

    Spreads items, and with them images, evenly: the right shape when the image cap, not the length, is what
    limits packs. Packs are kept sorted by load, so the least-loaded pack is at the front.
    """
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)
    cap = math.inf if max_images is None else max_images
    stride = n + n_packs + 1
    keys = list(range(n_packs))  # load * stride + pack id, ascending; all packs start empty
    loads, pack_images = [0] * n_packs, [0] * n_packs
    groups: list[list[int]] = [[] for _ in range(n_packs)]
    for i in order:
        length, images = lengths[i], n_images[i]
        pos, pack = 0, -1
        while pos < len(keys):
            candidate = keys[pos] % stride
            if loads[candidate] + length > seq_length:
                break  # every later pack is at least as loaded
            if pack_images[candidate] + images <= cap:
                pack = candidate
                del keys[pos]
                break
            pos += 1
        if pack < 0:
            pack = len(groups)
            groups.append([])
            loads.append(0)
            pack_images.append(0)
        groups[pack].append(i)
        loads[pack] += length
        pack_images[pack] += images
        insort(keys, loads[pack] * stride + pack)
    return [g for g in groups if g]


def knapsack_pack(
    lengths: Sequence[int], n_images: Sequence[int], seq_length: int, max_images: int | None = None
) -> list[list[int]]:
    """Group items into as few packs as we can under a length cap and an image cap.

    Up to three greedy passes, all longest item first, and the one with the fewest packs wins:

    1. best-fit decreasing: full packs; the winner when length is the binding cap. Returned at once when it
       reaches the lower bound max(ceil(total length / seq_length), ceil(total images / max_images)).
    2. balanced worst-fit over lower-bound many packs: spreads items and images evenly; the winner when the image
       cap binds.
    3. balanced worst-fit over ceil(total length / seq_length) + 5 packs: this is nanoVLM's packer (same choices,
       sorted keys instead of a sort per item), so we never need more packs than nanoVLM.

    On a tie a balanced result wins: its even loads waste less when rows are padded to the longest row.

    Args:
        lengths: token count of each item.
        n_images: image count of each item.
        seq_length: the most tokens a pack may hold.
        max_images: the most images a pack may hold; None for no cap.

    Returns:
        Groups of item indices, each item in exactly one group, items within a group longest first. Every group's
        total length is <= seq_length and its image count <= max_images. Deterministic for given inputs.

    Raises:
        ValueError: an item is longer than seq_length (or shorter than 1), or has more images than max_images.
    """
    _check_items(lengths, n_images, seq_length, max_images)
    if not lengths:
        return []
    length_bound = -(-sum(lengths) // seq_length)
    lower_bound = max(length_bound, -(-sum(n_images) // max_images) if max_images else 0)
    full = _best_fit_decreasing(lengths, n_images, seq_length, max_images)
    if len(full) <= lower_bound:
        return full
    best = _worst_fit_balanced(lengths, n_images, seq_length, max_images, lower_bound)
    if len(best) > lower_bound and length_bound + NANOVLM_EXTRA_PACKS != lower_bound:
        nanovlm = _worst_fit_balanced(lengths, n_images, seq_length, max_images, length_bound + NANOVLM_EXTRA_PACKS)
        best = nanovlm if len(nanovlm) < len(best) else best
    return best if len(best) <= len(full) else full


# ----------------------------------------------------------------------------------------------------------------
# Resumable state


def balanced_groups(costs: Sequence[float], group_size: int) -> list[list[int]]:
    """Deal items into groups of `group_size` (the last ones one smaller when it does not divide) whose cost sums
    are close: sorted by cost, dealt in a serpentine (0..G-1, G-1..0, ...), so with 2 per group the heaviest goes
    with the lightest. Returns the groups as lists of item indices.

    Why hand-written: a serpentine deal is the standard near-balanced partition into fixed-size groups, a few lines
    over a sort; no library we depend on has it.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}.")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    n_groups = max(1, math.ceil(len(costs) / group_size))
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for k, i in enumerate(order):
        turn, pos = divmod(k, n_groups)
        groups[pos if turn % 2 == 0 else n_groups - 1 - pos].append(i)
    return [g for g in groups if g]


def _split_to_multiple(groups: list[list[int]], multiple: int) -> list[list[int]]:
    """Split the packs with the most samples in two until the pack count is a multiple of `multiple` (while some
    pack has two samples): each round then fills whole batches, so a worker's batches stay aligned with the
    balanced groups from one round to the next (DataLoader batches consecutive packs). Costs at most
    `multiple - 1` less-full packs per round."""
    groups = list(groups)
    while len(groups) % multiple:
        k = max(range(len(groups)), key=lambda j: (len(groups[j]), -j))
        if len(groups[k]) < 2:
            break
        groups[k : k + 1] = [groups[k][0::2], groups[k][1::2]]
    return groups
