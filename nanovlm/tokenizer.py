"""Tokenizers for NanoVLM: extend a pretrained one, or train a small byte-level BPE locally.

Both give the same special tokens and chat template:
- `image_token` `<|image|>` (the placeholder and the image-feature token) and `global_image_token` `<|global_image|>`,
  stored as named special tokens (their attribute names end in `_token`, which is what survives a reload);
- `<row_i_col_j>` for every tile of a grid up to `max_grid` x `max_grid` (nanoVLM's 8x8 -> 64 tokens);
- ChatML (`<|im_start|>`, `<|im_end|>`) with generation markers for assistant masks.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .processing_nanovlm import CHAT_TEMPLATE, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, tile_token

logger = logging.getLogger(__name__)

NAMED_IMAGE_TOKENS = {"image_token": IMAGE_TOKEN, "global_image_token": GLOBAL_IMAGE_TOKEN}
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The role names the chat template writes after every `<|im_start|>`. They are not in the dataset's texts, so a BPE
# trained on those alone spelled "assistant" in 7 pieces and "user" in 3, 8 extra tokens per turn (a demo training
# row went from 89.6 to 71.6 tokens when they became one token each).
CHAT_ROLES = ("user", "assistant")


def tile_tokens(max_grid: int) -> list[str]:
    """`<row_i_col_j>` for 1 <= i, j <= max_grid, row-major."""
    if max_grid < 1:
        raise ValueError(f"max_grid must be >= 1, got {max_grid}.")
    return [tile_token(r, c) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


def _finish(tokenizer: PreTrainedTokenizerBase, max_grid: int) -> PreTrainedTokenizerBase:
    tokenizer.add_tokens(tile_tokens(max_grid), special_tokens=True)
    if tokenizer.pad_token is None:
        pad = "<|endoftext|>" if tokenizer.convert_tokens_to_ids("<|endoftext|>") != tokenizer.unk_token_id else None
        tokenizer.pad_token = pad or tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def extend_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase, max_grid: int = 8, **kwargs):
    """Add NanoVLM's image and tile tokens and the ChatML template to a pretrained tokenizer (hub id, folder or
    object). Returns a new tokenizer; the caller resizes the model's embeddings to `len(tokenizer)`."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        if not tokenizer.is_fast:
            raise TypeError("A fast (tokenizers-backed) tokenizer is needed for assistant masks and offsets.")
        # Named special tokens are only registered at construction: round-trip through a folder (public API only).
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return extend_tokenizer(tmp, max_grid=max_grid, **kwargs)
    extended = AutoTokenizer.from_pretrained(tokenizer, extra_special_tokens=dict(NAMED_IMAGE_TOKENS), **kwargs)
    missing = [t for t in CHATML_TOKENS[1:] if extended.convert_tokens_to_ids(t) == extended.unk_token_id]
    if missing:
        extended.add_tokens(missing, special_tokens=True)
        logger.info("Added ChatML tokens %s to the tokenizer.", missing)
    if extended.eos_token is None:
        extended.eos_token = "<|im_end|>"
    return _finish(extended, max_grid)


def _with_role_headers(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        yield text
        yield from (f"{role}\n" for role in CHAT_ROLES)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, max_grid: int = 8, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on local `texts` with NanoVLM's special tokens and chat template.

    Used by the embedded demo and the tests, since no pretrained tokenizer can be downloaded there. `vocab_size`
    counts the BPE vocabulary only; special tokens come on top. Byte-level means any text can be encoded. The chat
    template's role headers ("user\n", "assistant\n") are trained on once beside every text, so each role name is
    among the most frequent words and becomes a single token (given a vocabulary of a few hundred merges).
    """
    if vocab_size < 256 + len(CHATML_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(CHATML_TOKENS)} (all bytes + ChatML), got {vocab_size}.")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(CHATML_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_with_role_headers(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_IMAGE_TOKENS),
    )
    return _finish(tokenizer, max_grid)


__all__ = ["extend_tokenizer", "train_tokenizer", "tile_tokens", "NAMED_IMAGE_TOKENS"]
