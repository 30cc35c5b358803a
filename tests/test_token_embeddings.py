"""Every token the model reads trains its input embedding, the pad token (`<|im_end|>` with SmolLM2) included.

transformers builds the text embedding with `padding_idx=text_config.pad_token_id`: that row gets no gradient from
its lookups and is zeroed at random init. With SmolLM2's tokenizer (and the original nanoVLM's) the pad token is
`<|im_end|>`, which ends every turn, so NanoVLMModel drops the padding row (the original's embedding has none
either). These tests use such a tokenizer, with its pad id in the text config as every NanoVLM config has it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_config
from training_helpers import TINY_CORPUS, make_trainer, packed_dataset, synthetic_rows, training_args

from nanovlm import NanoVLMForConditionalGeneration, NanoVLMProcessor, train_tokenizer
from nanovlm.data import PackedCollator


def smollm2_like_tokenizer():
    """The tiny tokenizer with SmolLM2's choice of pad token: `<|im_end|>`, the end of every turn."""
    tokenizer = train_tokenizer(TINY_CORPUS, vocab_size=300, max_grid=2)
    tokenizer.pad_token = "<|im_end|>"
    return tokenizer


def model_with_text_pad_id(tokenizer, tied: bool = True):
    """A tiny model whose text config names the pad id (as SmolLM2's config.json does)."""
    config = make_tiny_config(tokenizer, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return NanoVLMForConditionalGeneration(config), config


def test_no_padding_row_and_the_pad_row_is_initialised():
    tokenizer = smollm2_like_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == im_end
    model, config = model_with_text_pad_id(tokenizer)
    assert config.text_config.pad_token_id == im_end  # generation and the collator still know the pad id
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx is None
    row_norms = embedding.weight.detach().norm(dim=-1)
    assert row_norms[im_end] > 0.5 * row_norms.median()  # drawn like every other row, not zeroed
    model.resize_token_embeddings(len(tokenizer) + 8, mean_resizing=False)  # what resize_for_tokenizer does
    assert model.get_input_embeddings().padding_idx is None


def test_a_checkpoint_whose_config_names_a_pad_id_loads_without_a_padding_row(tmp_path):
    tokenizer = smollm2_like_tokenizer()
    im_end = tokenizer.pad_token_id
    model, _ = model_with_text_pad_id(tokenizer)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["pad_token_id"] == im_end

    loaded = NanoVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.get_input_embeddings().padding_idx is None
    torch.testing.assert_close(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


class RecordingCollator(PackedCollator):
    """PackedCollator that remembers every token id of the real (unpadded) samples it batched."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.used: set[int] = set()

    def __call__(self, packs):
        for pack in packs:
            for sample in pack["samples"] if isinstance(pack, dict) else pack:
                self.used.update(int(t) for t in sample["input_ids"])
        return super().__call__(packs)


def lookup_gradient_probe(embedding: torch.nn.Embedding) -> torch.Tensor:
    """A zero tensor shaped like the embedding whose `.grad` collects the gradient of the input LOOKUPS only.

    With tied weights the embedding matrix also gets the LM head's gradient (every row, every step), which would
    hide a row that its lookups never train. The hook adds `F.embedding(ids, probe, padding_idx)` (value 0) to the
    embedding's output: the probe gets exactly the gradient that the embedding's own lookup gives each row, with
    the same `padding_idx` rule.
    """
    probe = torch.zeros_like(embedding.weight, requires_grad=True)

    def hook(module, args, output):
        return output + F.embedding(args[0], probe, module.padding_idx)

    embedding.register_forward_hook(hook)
    return probe


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_token_read_in_training_gets_an_input_embedding_gradient(tmp_path, tied):
    tokenizer = smollm2_like_tokenizer()
    model, config = model_with_text_pad_id(tokenizer, tied=tied)
    assert model.config.tie_word_embeddings is tied
    processor = NanoVLMProcessor.from_config(tokenizer, config, max_grid=2)
    embedding = model.get_input_embeddings()
    before = embedding.weight.detach().clone()
    probe = lookup_gradient_probe(embedding)

    trainer = make_trainer(
        model, processor, training_args(tmp_path, max_steps=1, warmup_steps=0), packed_dataset(synthetic_rows(24), processor)
    )  # no warmup: the default one's first step has LR 0 and would move no weight
    trainer.data_collator = collator = RecordingCollator(tokenizer.pad_token_id)
    trainer.train()

    image = config.image_token_id
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|im_end|>", "<|im_start|>", "<|global_image|>")}
    for role in ("user", "assistant"):  # the chat template's role headers
        ids[role] = tokenizer.encode(f"{role}\n", add_special_tokens=False)[0]
    assert set(ids.values()) <= collator.used, ids  # the tokens this test is about were in the batch
    trained = collator.used - {image}  # image tokens' embeddings are replaced by image features
    grad_norms = probe.grad.norm(dim=-1)
    untrained = sorted(tokenizer.convert_ids_to_tokens(i) for i in trained if grad_norms[i] == 0)
    assert untrained == []
    assert grad_norms[image] == 0  # the probe does see rows that get no lookup gradient
    if not tied:
        # one AdamW step (embeddings are exempt from decay) moves exactly the rows that were read
        changed = set((embedding.weight.detach() != before).any(-1).nonzero().flatten().tolist())
        assert changed == trained
