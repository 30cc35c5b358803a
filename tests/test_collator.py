"""Tests for nanovlm.data.collator.PackedCollator: exact tensors on hand-made packs."""

from __future__ import annotations

import pytest
import torch

from nanovlm.data.collator import BOOKKEEPING_KEY, IGNORE_INDEX, PackedCollator

X = IGNORE_INDEX
PAD = 0


def _sample(ids: list[int], labels: list[int], tiles: list[float] | None = None) -> dict:
    pixels = None if tiles is None else torch.stack([torch.full((3, 2, 2), v) for v in tiles])
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": pixels,
        "n_images": 0 if tiles is None else 1,
        "source": "ignored",
    }


def _two_packs() -> list[dict]:
    a = _sample([11, 12, 13], [X, 12, 13], tiles=[1.0, 2.0])  # one image in two tiles
    b = _sample([21, 22], [21, 22])  # text only; its first label must be masked by the collator
    c = _sample([31, 32, 33, 34], [X, X, 33, 34], tiles=[3.0])
    return [
        {"samples": [a, b], "state": {"worker": 0, "packs_done": 1}},
        {"samples": [c], "state": {"worker": 0, "packs_done": 2}},
    ]


def test_two_pack_batch_exact_tensors():
    batch = PackedCollator(pad_token_id=PAD)(_two_packs())
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, PAD]]
    assert batch["labels"].tolist() == [[X, 12, 13, X, 22], [X, X, 33, 34, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert "attention_mask" not in batch
    # every sample and the padding of row 1 is one sequence of the flattened batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert isinstance(batch["max_length_q"], int)
    # tiles in token order: sample a's two tiles, then sample c's
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch[BOOKKEEPING_KEY]["stats"] == {
        "num_rows": 2,
        "row_length": 5,
        "num_samples": 3,
        "num_real_tokens": 9,
        "num_pad_tokens": 1,
        "num_label_tokens": 5,
        "sum_sq_sample_lengths": 3**2 + 2**2 + 4**2,  # causal attention within each sample (training/flops.py)
        "num_images": 2,
        "num_tiles": 3,
    }
    assert batch[BOOKKEEPING_KEY]["data_state"] == [{"worker": 0, "packs_done": 1}, {"worker": 0, "packs_done": 2}]


def test_cu_seq_lens_match_transformers_position_id_derivation():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = PackedCollator(pad_token_id=PAD, pad_to_multiple_of=8)(_two_packs())
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(cu_q, batch["cu_seq_lens_q"]) and torch.equal(cu_k, batch["cu_seq_lens_k"])
    assert int(max_q) == batch["max_length_q"]


def test_pad_to_multiple_of():
    batch = PackedCollator(pad_token_id=PAD, pad_to_multiple_of=8)(_two_packs())
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, PAD, PAD, PAD], [31, 32, 33, 34, PAD, PAD, PAD, PAD]]
    assert batch["labels"][:, 5:].eq(X).all() and batch["labels"][1, 4:].eq(X).all()
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 12, 16]
    assert batch["max_length_q"] == 4
    assert batch[BOOKKEEPING_KEY]["stats"]["row_length"] == 8 and batch[BOOKKEEPING_KEY]["stats"]["num_pad_tokens"] == 7


def test_no_image_batch_and_plain_sample_lists():
    packs = [[_sample([1, 2], [1, 2])], [_sample([3], [3]), _sample([4, 5], [X, 5])]]
    batch = PackedCollator(pad_token_id=9)(packs)
    assert batch["pixel_values"] is None
    assert batch["input_ids"].tolist() == [[1, 2, 9], [3, 4, 5]]
    assert batch["labels"].tolist() == [[X, 2, X], [X, X, 5]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 3, 4, 6]
    assert batch[BOOKKEEPING_KEY]["stats"]["num_images"] == 0 and batch[BOOKKEEPING_KEY]["stats"]["num_tiles"] == 0
    assert batch[BOOKKEEPING_KEY]["data_state"] == [None, None]


def test_single_full_row_has_no_padding_sequence():
    batch = PackedCollator(pad_token_id=PAD)([[_sample([1, 2, 3], [1, 2, 3])]])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3]
    assert batch[BOOKKEEPING_KEY]["stats"]["num_pad_tokens"] == 0


def test_collator_errors():
    with pytest.raises(ValueError, match="pack 0 sample 1: input_ids has 2 tokens but labels 3"):
        PackedCollator(pad_token_id=PAD)([[_sample([1], [1]), _sample([1, 2], [1, 2, 3])]])
    with pytest.raises(ValueError, match="empty list of packs"):
        PackedCollator(pad_token_id=PAD)([])
    with pytest.raises(ValueError, match="pack 1 has no samples"):
        PackedCollator(pad_token_id=PAD)([[_sample([1], [1])], {"samples": []}])
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or a positive int; got 0"):
        PackedCollator(pad_token_id=PAD, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        PackedCollator(pad_token_id=None)
