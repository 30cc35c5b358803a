"""Packs -> batch tensors: one row per pack, samples isolated by position_ids and flash-attention varlen kwargs.

Non-standard on purpose:

- No `attention_mask`. Samples are kept apart by `position_ids` that restart at 0 for every sample (eager, sdpa and
  flex attention derive a packed-sequence mask from them) and by `cu_seq_lens_*` / `max_length_*` for
  `flash_attention_2`, which flattens the batch to one long sequence and needs the boundaries of every sample.
- Row padding (up to the longest row of the batch) is its own sequence: its position_ids count 0, 1, ... and it
  has its own entry in `cu_seq_lens_*`, so padding attends only to padding and real tokens never see it.
- `labels` are -100 on padding and at the first token of each sample, so no sample learns to predict its first
  token from the previous sample's last token (labels are unshifted; the loss shifts them).
- `pixel_values` concatenates every sample's tiles in token order (row 0's samples first, then row 1, ...), which
  is the order the image tokens appear in `input_ids.flatten()`.
- Bookkeeping travels beside the model inputs under one key, `batch[BOOKKEEPING_KEY]`, which the trainer pops in one
  place before the forward: `stats` (plain ints for logging), `data_state` (each pack's resume state, see
  `nanovlm.data.packing.combine_pack_states`) and `skipped` (each worker's cumulative skip counts per reason, from
  the packs that carry them; empty when the source counts no skips).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .samples import IGNORE_INDEX

logger = logging.getLogger(__name__)

BOOKKEEPING_KEY = "bookkeeping"  # the one batch key that is not a model input

__all__ = ["BOOKKEEPING_KEY", "IGNORE_INDEX", "PackedCollator"]


@dataclass
class PackedCollator:
    """Collate packs into a padded batch with one row per pack.

    A pack is `{"samples": [sample, ...], "state": ...}` (what `PackedDataset` yields) or a plain list of samples.
    A sample has `input_ids` (T,), `labels` (T,), `pixel_values` (n_tiles, 3, H, W) or None, and `n_images`;
    other keys are ignored.

    Returns a dict with `input_ids`, `labels`, `position_ids` (B, T) int64; `pixel_values` (N, 3, H, W) or None;
    `cu_seq_lens_q`, `cu_seq_lens_k` (S + 1,) int32 and `max_length_q`, `max_length_k` (int) over the flattened
    batch (every sample and every row's padding is one sequence); and under `BOOKKEEPING_KEY` a dict of `stats`
    (dict of ints: num_rows, row_length, num_samples, num_real_tokens, num_pad_tokens, num_label_tokens,
    sum_sq_sample_lengths, num_images, num_tiles), `data_state` (list of each pack's state, None where a pack had none) and `skipped` (list
    of the `{"worker", "counts"}` skip counts the packs carried).

    Args:
        pad_token_id: id written into padded `input_ids`.
        pad_to_multiple_of: round the row length up to a multiple of this (e.g. 8 or 64 for tensor cores, fewer
            recompilations); None pads to the longest row exactly.
        return_flash_attn_kwargs: add `cu_seq_lens_*` and `max_length_*` (needed by flash_attention_2 with more
            than one row; harmless otherwise, since other attention paths ignore them).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_flash_attn_kwargs: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int (the tokenizer's pad id); got {self.pad_token_id!r}.")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be None or a positive int; got {self.pad_to_multiple_of!r}.")

    def __call__(self, packs: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
        """Build the batch; see the class docstring for its keys."""
        rows = _checked_rows(packs)
        row_lengths = [sum(len(sample["input_ids"]) for sample in samples) for samples in rows]
        width = max(row_lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch, seq_lens, num_images = self._fill(rows, width)
        if self.return_flash_attn_kwargs:
            cu_seq_lens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
            cu_seq_lens[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
            batch["cu_seq_lens_q"] = cu_seq_lens
            batch["cu_seq_lens_k"] = cu_seq_lens.clone()
            batch["max_length_q"] = batch["max_length_k"] = max(seq_lens)
        num_real = sum(row_lengths)
        pixel_values = batch["pixel_values"]
        stats = {
            "num_rows": len(rows),
            "row_length": width,
            "num_samples": sum(len(samples) for samples in rows),
            "num_real_tokens": num_real,
            "num_pad_tokens": len(rows) * width - num_real,
            "num_label_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
            # sum of squared sample lengths: the causal attention pairs the FLOP estimate counts (training/flops.py)
            "sum_sq_sample_lengths": sum(len(sample["input_ids"]) ** 2 for samples in rows for sample in samples),
            "num_images": num_images,
            "num_tiles": 0 if pixel_values is None else int(pixel_values.shape[0]),
        }
        states = [pack.get("state") if isinstance(pack, Mapping) else None for pack in packs]
        # the latest cumulative skip counts of each worker seen in this batch
        skipped = [pack["skipped"] for pack in packs if isinstance(pack, Mapping) and pack.get("skipped")]
        batch[BOOKKEEPING_KEY] = {"stats": stats, "data_state": states, "skipped": skipped}
        return batch

    def _fill(self, rows: list[Sequence[Mapping[str, Any]]], width: int) -> tuple[dict[str, Any], list[int], int]:
        """(the model inputs, the length of every sequence: each sample, then its row's padding, the image count)."""
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        position_ids = torch.empty((len(rows), width), dtype=torch.long)  # (B, T)
        seq_lens: list[int] = []  # every sample, then the row's padding if any, row by row
        pixel_values: list[torch.Tensor] = []
        num_images = 0
        for r, samples in enumerate(rows):
            offset = 0
            for sample in samples:
                n = len(sample["input_ids"])
                input_ids[r, offset : offset + n] = torch.as_tensor(sample["input_ids"])
                labels[r, offset : offset + n] = torch.as_tensor(sample["labels"])
                labels[r, offset] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
                position_ids[r, offset : offset + n] = torch.arange(n)
                seq_lens.append(n)
                offset += n
                if sample.get("pixel_values") is not None:
                    pixel_values.append(sample["pixel_values"])
                    num_images += int(sample.get("n_images", 1))
            if offset < width:
                position_ids[r, offset:] = torch.arange(width - offset)  # padding: a sequence of its own
                seq_lens.append(width - offset)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,  # (N, 3, H, W)
        }
        return batch, seq_lens, num_images


def _checked_rows(packs: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> list:
    """Each pack's samples, or ValueError for an empty batch, an empty pack, or labels of another length."""
    if not packs:
        raise ValueError("got an empty list of packs: a batch needs at least one pack.")
    rows = [pack["samples"] if isinstance(pack, Mapping) else pack for pack in packs]
    for r, samples in enumerate(rows):
        if not samples:
            raise ValueError(f"pack {r} has no samples: the packer never makes empty packs; check its source.")
        for s, sample in enumerate(samples):
            if len(sample["input_ids"]) != len(sample["labels"]):
                raise ValueError(
                    f"pack {r} sample {s}: input_ids has {len(sample['input_ids'])} tokens but labels "
                    f"{len(sample['labels'])}; the processor must give one label per token."
                )
    return rows
