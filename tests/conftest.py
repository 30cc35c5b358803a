"""Shared tiny fixtures: one locally trained tokenizer, one tiny config, processor and model (CPU, no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration, NanoVLMProcessor, train_tokenizer  # noqa: E402

TOKENIZER_CORPUS = [
    "What color is the circle? red blue green yellow purple orange",
    "How many shapes are there? one two three four five",
    "Is the square on the left or the right? left right top bottom",
    "Which image has a blue triangle? image 1 image 2 image 3 first second third",
    "What word is written in the image? cat dog sun car tree",
    "Describe the picture. A small red square next to a big green circle.",
] * 20

TINY_MAX_GRID = 4


def make_tiny_config(tokenizer, tile: int = 32, patch: int = 8, shuffle: int = 2, **text_overrides) -> NanoVLMConfig:
    """A ~0.2M-parameter NanoVLM: 32 px tiles, 8 px patches, pixel shuffle 2 -> 4 image tokens per tile."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text.update(text_overrides)
    vision = dict(
        image_size=tile, patch_size=patch, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    return NanoVLMConfig(
        vision_config=vision,
        text_config=text,
        pixel_shuffle_factor=shuffle,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TOKENIZER_CORPUS, vocab_size=400, max_grid=TINY_MAX_GRID)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    return make_tiny_config(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer, tiny_config):
    return NanoVLMProcessor.from_config(tiny_tokenizer, tiny_config, max_grid=TINY_MAX_GRID)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration(tiny_config)
    model.generation_config.pad_token_id = tiny_config.text_config.pad_token_id
    model.generation_config.eos_token_id = tiny_config.text_config.eos_token_id
    return model.eval()


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread, and far faster on a busy machine (no OpenMP spin-waiting); the
    environment variable reaches evaluation subprocesses. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
