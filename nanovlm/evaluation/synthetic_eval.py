"""Held-out accuracy on the synthetic dataset, per question type, beside the blind-guess baseline.

Every turn of every row is asked with the previous turns (and their reference answers) as context; the reply is
generated greedily and compared with `answer_is_correct` (normalised exact match).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from ..data.synthetic import answer_is_correct
from ..image_processing_nanovlm import load_image

logger = logging.getLogger(__name__)


def _questions(rows):
    """(images, messages up to a question, reference, question type) for every turn of every row."""
    for row in rows:
        images = [load_image(im) for im in row["images"]]
        history = []
        for i, turn in enumerate(row["texts"]):
            content = [{"type": "text", "text": turn["user"]}]
            if i == 0:
                content = [{"type": "image"} for _ in images] + content
            messages = history + [{"role": "user", "content": content}]
            yield images, messages, turn["assistant"], row["question_type"][i]
            history = messages + [{"role": "assistant", "content": turn["assistant"]}]


@torch.no_grad()
def evaluate_synthetic(model, processor, rows, batch_size: int = 32, max_new_tokens: int = 8) -> dict[str, float]:
    """{question type: accuracy, ..., "overall": accuracy} of greedy answers on `rows` (a Dataset split)."""
    model.eval()
    tokenizer = processor.tokenizer
    correct, total = defaultdict(int), defaultdict(int)
    batch = []

    def flush():
        texts = [processor.apply_chat_template(m, add_generation_prompt=True) for _, m, _, _ in batch]
        old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = processor(text=texts, images=[ims for ims, _, _, _ in batch], padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = old_side
        inputs = inputs.to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for (_, _, reference, qtype), reply in zip(batch, replies):
            total[qtype] += 1
            correct[qtype] += answer_is_correct(reply, reference)
        batch.clear()

    for item in _questions(rows):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    result = {q: correct[q] / total[q] for q in sorted(total)}
    result["overall"] = sum(correct.values()) / max(sum(total.values()), 1)
    return result


def format_accuracy_table(accuracy: dict[str, float], blind: dict[str, float]) -> str:
    """A text table: question type, model accuracy, blind-guess accuracy, ratio."""
    lines = [f"{'question type':<14} {'model':>7} {'blind':>7} {'x blind':>8}"]
    for qtype in [k for k in accuracy if k != "overall"] + ["overall"]:
        acc, base = accuracy.get(qtype, 0.0), blind.get(qtype, 0.0)
        ratio = f"{acc / base:8.1f}" if base > 0 else f"{'-':>8}"
        lines.append(f"{qtype:<14} {acc:7.3f} {base:7.3f} {ratio}")
    return "\n".join(lines)


__all__ = ["evaluate_synthetic", "format_accuracy_table"]
