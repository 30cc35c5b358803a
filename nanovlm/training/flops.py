"""Model-FLOPs estimate for the MFU figure (training: forward + backward = 3x forward).

Per optimizer micro-step, with N_text / N_vision / N_proj the non-embedding parameter counts:
    text      6 * N_text * real_tokens            + 12 * L_text * d_text * sum_i(L_i^2) / 2   (causal attention)
    vision    6 * N_vision * patches * tiles      + 12 * L_vis * d_vis * patches^2 * tiles
    projector 6 * N_proj * image_tokens_per_tile * tiles
These are the FLOPs the model needs for the batch's samples: padding is not counted, and causal attention counts
pairs within each packed sample i of length L_i only (packed samples never attend to each other; the collator's
`stats["sum_sq_sample_lengths"]`). Stats without that sum fall back to attention over whole rows (rows * T^2), an
upper bound. The trainer's logged MFU and bench/gpu_suite.py's use this one function; on the H200 the old
whole-row, padding-included count read 7% above (BENCHMARKS.md). Embedding lookups are free; the LM head counts as a
matmul (it is in N_text when untied, and added explicitly when tied).
"""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s by device-name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12}


def _non_embedding_params(cfg, kind: str) -> int:
    if kind == "text":
        d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", heads) or heads
        head_dim = getattr(cfg, "head_dim", None) or d // heads
        attn = d * head_dim * (heads + 2 * kv) + heads * head_dim * d
        return layers * (attn + 3 * d * inter) + d * cfg.vocab_size  # + LM head
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return layers * (4 * d * d + 2 * d * inter)


def _sizes(config) -> tuple[int, int, int, int]:
    """(N_text, N_vision, N_proj, patches per tile). Computed per call (a few products): a cache keyed by id(config)
    could hand a new config the sizes of a freed one with the same id."""
    text, vision = config.text_config, config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    proj = vision.hidden_size * config.pixel_shuffle_factor**2 * text.hidden_size
    return _non_embedding_params(text, "text"), _non_embedding_params(vision, "vision"), proj, patches


def estimate_flops(config, stats: dict) -> float:
    """Training FLOPs of one micro-batch described by the collator's `stats`."""
    if not stats:
        return 0.0
    n_text, n_vis, n_proj, patches = _sizes(config)
    text, vision = config.text_config, config.vision_config
    rows, row_len = stats.get("num_rows", 0), stats.get("row_length", 0)
    pairs = stats.get("sum_sq_sample_lengths", rows * row_len**2)  # sum of L_i^2: causal pairs * 2
    tiles = stats.get("num_tiles", 0)
    flops = 6 * n_text * stats.get("num_real_tokens", 0) + 6 * text.num_hidden_layers * text.hidden_size * pairs
    flops += 6 * n_vis * patches * tiles + 12 * vision.num_hidden_layers * vision.hidden_size * patches**2 * tiles
    flops += 6 * n_proj * config.image_seq_len * tiles
    return float(flops)


def pack_flops(config, tokens: int, tiles: int) -> float:
    """Training FLOPs of one pack of `tokens` tokens and `tiles` image tiles (a one-row batch): the cost that
    `PackedDataset(pack_cost=functools.partial(pack_flops, config))` balances batches by."""
    stats = {"num_rows": 1, "row_length": tokens, "num_real_tokens": tokens, "num_tiles": tiles}  # whole-pack attention
    return estimate_flops(config, stats)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the current CUDA device, or None (CPU, unknown GPU): then no MFU is logged."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


__all__ = ["estimate_flops", "pack_flops", "peak_flops", "PEAK_BF16"]
