"""A packed sample must not attend to another: packed logits and loss equal the samples run one by one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nanovlm import NanoVLMForConditionalGeneration
from nanovlm.data.collator import BOOKKEEPING_KEY, PackedCollator


def _sample(processor, images, turns):
    messages = []
    for i, (user, assistant) in enumerate(turns):
        content = ([{"type": "image", "image": im} for im in images] if i == 0 else []) + [
            {"type": "text", "text": user}
        ]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": assistant}]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids = out["input_ids"][0]
    labels = torch.where(out["assistant_masks"][0].bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels, "pixel_values": out.get("pixel_values"), "n_images": len(images)}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_logits_and_loss_equal_unpacked(tiny_config, tiny_processor, impl):
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation=impl).eval()
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (96, 32), (0, 0, 255))
    samples = [
        _sample(tiny_processor, [red], [("What color?", "red")]),
        _sample(tiny_processor, [blue, red], [("Which image is wider?", "image 1"), ("Color of image 2?", "red")]),
        _sample(tiny_processor, [], [("How many shapes are there?", "three")]),
        _sample(tiny_processor, [blue], [("Describe the picture.", "A blue picture.")]),
    ]
    packs = [{"samples": samples[:2]}, {"samples": samples[2:]}]  # two rows of different lengths
    batch = PackedCollator(tiny_processor.tokenizer.pad_token_id)(packs)
    batch.pop(BOOKKEEPING_KEY)
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch

    n_labels = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    with torch.no_grad():
        packed = model(**batch, num_items_in_batch=torch.tensor(n_labels))
        separate_sum = torch.zeros(())
        offsets = {0: 0, 1: 0}
        for k, s in enumerate(samples):
            row = 0 if k < 2 else 1
            single = model(
                input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], labels=s["labels"][None],
                num_items_in_batch=torch.tensor(1),
            )
            T = len(s["input_ids"])
            start = offsets[row]
            torch.testing.assert_close(packed.logits[row, start : start + T], single.logits[0], atol=1e-5, rtol=1e-5)
            offsets[row] += T
            separate_sum += single.loss
    # packed loss = (sum over every label token) / (global label count), the same as summing per-sample losses
    torch.testing.assert_close(packed.loss, separate_sum / n_labels, atol=1e-5, rtol=1e-5)
    # padding really exists in the shorter row, and it changes nothing above
    assert batch["labels"][1, offsets[1]:].eq(-100).all() or offsets[1] == batch["input_ids"].shape[1]
