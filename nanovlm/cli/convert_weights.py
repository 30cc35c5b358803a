"""The weight half of `nanovlm-convert`: an original nanoVLM state dict renamed (and reshaped) onto nanovlm's
parameter names, then loaded into a `NanoVLMForConditionalGeneration`. `nanovlm/cli/convert.py` reads the checkpoint,
converts config, tokenizer and processor, and calls these.

Weights (nanoVLM key -> nanovlm key; i = block index):
    vision_encoder.patch_embedding.conv.{weight,bias}   model.vision_tower.embeddings.patch_embedding.*
    vision_encoder.patch_embedding.position_embedding   model.vision_tower.embeddings.position_embedding.weight
                                                        ((1, N, D) -> (N, D))
    vision_encoder.blocks.i.ln1 / ln2                   ...encoder.layers.i.layer_norm1 / layer_norm2
    vision_encoder.blocks.i.attn.qkv_proj               ...encoder.layers.i.self_attn.{q,k,v}_proj: the fused
                                                        (3D, D) weight and (3D,) bias split in thirds, q then k then v
    vision_encoder.blocks.i.attn.out_proj, mlp.fc1/fc2  ...self_attn.out_proj, mlp.fc1/fc2
    vision_encoder.layer_norm                           model.vision_tower.post_layernorm
    MP.proj.weight                                      model.multi_modal_projector.proj.weight (same pixel-shuffle
                                                        channel order, so the matrix loads unchanged)
    decoder.token_embedding.weight                      model.language_model.embed_tokens.weight
    decoder.blocks.i.attn.{q,k,v,out}_proj              ...layers.i.self_attn.{q,k,v,o}_proj
    decoder.blocks.i.mlp.{gate,up,down}_proj            ...layers.i.mlp.*
    decoder.blocks.i.norm1 / norm2                      ...layers.i.input_layernorm / post_attention_layernorm
    decoder.norm.weight                                 model.language_model.norm.weight
    decoder.head.weight                                 lm_head.weight; with `lm_tie_weights` safetensors keeps only
                                                        one of the tied pair (`decoder.head.weight`), which then
                                                        fills the embeddings too
    decoder.rotary_embd.inv_freq                        checked against `lm_re_base`, then dropped (a buffer)

Every source key must be consumed and every target parameter filled, else a `StateDictMismatchError` lists both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from nanovlm.modeling_nanovlm import NanoVLMForConditionalGeneration

logger = logging.getLogger(__name__)

VISION, VISION_SRC = "model.vision_tower.", "vision_encoder."
TEXT, TEXT_SRC = "model.language_model.", "decoder."


class StateDictMismatchError(ValueError):
    """The checkpoint's tensors do not match what its config.json describes (missing or unconsumed keys)."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str], context: str = ""):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {preview(self.missing)}")
        if self.unexpected:
            parts.append(f"unconsumed keys ({len(self.unexpected)}): {preview(self.unexpected)}")
        super().__init__(
            "The nanoVLM checkpoint does not match its config.json"
            + (f" ({context})" if context else "")
            + ": "
            + "; ".join(parts)
            + ". Check that config.json belongs to these weights (block counts, lm_tie_weights)."
        )


def preview(keys: Sequence[str], limit: int = 8) -> str:
    """The first `limit` items joined by commas, then how many more there are (for one-line error messages)."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def rope_inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies as both nanoVLM and Llama compute them: base^(-2i/d)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


class _KeyMap:
    """Bookkeeping of one conversion: the source keys not consumed yet, the keys that were absent, and the output.

    Hand-written because the point is the complete account: every key either moves, is checked and dropped, or
    ends up in the mismatch error (`load_state_dict(strict=True)` would only see the renamed side).
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.remaining = dict(state)
        self.missing: list[str] = []
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str, optional: bool = False) -> torch.Tensor | None:
        """Consume `key`; a required key that is absent is recorded as missing (and None returned)."""
        if key in self.remaining:
            return self.remaining.pop(key)
        if not optional:
            self.missing.append(key)
        return None

    def move(self, src: str, dst: str) -> None:
        """Consume `src` and store it unchanged under `dst`."""
        tensor = self.take(src)
        if tensor is not None:
            self.out[dst] = tensor


def _convert_vision_tower(keys: _KeyMap, cfg: Mapping) -> None:
    """SigLIP's embeddings, blocks (the fused qkv split in thirds) and post-layernorm."""
    vt, vs = VISION, VISION_SRC
    for name in ("weight", "bias"):
        keys.move(f"{vs}patch_embedding.conv.{name}", f"{vt}embeddings.patch_embedding.{name}")
        keys.move(f"{vs}layer_norm.{name}", f"{vt}post_layernorm.{name}")
    pos = keys.take(f"{vs}patch_embedding.position_embedding")
    if pos is not None:
        pos = pos.reshape(pos.shape[-2], pos.shape[-1])  # (1, N, D) -> (N, D)
        keys.out[f"{vt}embeddings.position_embedding.weight"] = pos
    for i in range(cfg["vit_n_blocks"]):
        src, dst = f"{vs}blocks.{i}.", f"{vt}encoder.layers.{i}."
        for name in ("weight", "bias"):
            keys.move(f"{src}ln1.{name}", f"{dst}layer_norm1.{name}")
            keys.move(f"{src}ln2.{name}", f"{dst}layer_norm2.{name}")
            keys.move(f"{src}attn.out_proj.{name}", f"{dst}self_attn.out_proj.{name}")
            keys.move(f"{src}mlp.fc1.{name}", f"{dst}mlp.fc1.{name}")
            keys.move(f"{src}mlp.fc2.{name}", f"{dst}mlp.fc2.{name}")
            fused = keys.take(f"{src}attn.qkv_proj.{name}")
            if fused is not None:
                if fused.shape[0] % 3:
                    raise ValueError(
                        f"{src}attn.qkv_proj.{name} has {fused.shape[0]} rows, not divisible by 3 (q, k, v)."
                    )
                # nanoVLM: q, k, v = qkv_proj(x).split(C, dim=-1): the rows are [q; k; v].
                for part, chunk in zip(("q", "k", "v"), fused.chunk(3, dim=0)):
                    keys.out[f"{dst}self_attn.{part}_proj.{name}"] = chunk.clone()


def _convert_decoder(keys: _KeyMap, cfg: Mapping) -> None:
    """The Llama blocks and final norm (embeddings and head: `_convert_head`)."""
    lm, ds = TEXT, TEXT_SRC
    keys.move(f"{ds}norm.weight", f"{lm}norm.weight")
    for i in range(cfg["lm_n_blocks"]):
        src, dst = f"{ds}blocks.{i}.", f"{lm}layers.{i}."
        for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            keys.move(f"{src}attn.{a}.weight", f"{dst}self_attn.{b}.weight")
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys.move(f"{src}mlp.{name}.weight", f"{dst}mlp.{name}.weight")
        keys.move(f"{src}norm1.weight", f"{dst}input_layernorm.weight")
        keys.move(f"{src}norm2.weight", f"{dst}post_attention_layernorm.weight")


def _convert_head(keys: _KeyMap, cfg: Mapping) -> None:
    """Token embeddings and LM head: one shared tensor under `lm_tie_weights`, else two."""
    lm, ds = TEXT, TEXT_SRC
    if not cfg["lm_tie_weights"]:
        keys.move(f"{ds}token_embedding.weight", f"{lm}embed_tokens.weight")
        keys.move(f"{ds}head.weight", "lm_head.weight")
        return
    # safetensors stores one tensor of a tied pair (nanoVLM's save_model keeps `decoder.head.weight`).
    head = keys.take(f"{ds}head.weight", optional=True)
    embed = keys.take(f"{ds}token_embedding.weight", optional=True)
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ValueError(
            "lm_tie_weights=true but decoder.head.weight differs from decoder.token_embedding.weight; set "
            "lm_tie_weights to false in config.json if the checkpoint really has an untied head."
        )
    shared = embed if embed is not None else head
    if shared is None:
        keys.missing.append(f"{ds}head.weight (or {ds}token_embedding.weight)")
    else:
        keys.out[f"{lm}embed_tokens.weight"] = shared
        keys.out["lm_head.weight"] = shared


def _check_rope(keys: _KeyMap, cfg: Mapping) -> None:
    """Consume nanoVLM's RoPE buffer (if saved), refusing frequencies that contradict `lm_re_base`."""
    inv_freq = keys.take(f"{TEXT_SRC}rotary_embd.inv_freq", optional=True)
    if inv_freq is None:
        return
    expected = rope_inv_freq(cfg["lm_re_base"], cfg["lm_hidden_dim"] // cfg["lm_n_heads"])
    rtol = 1e-5 if inv_freq.dtype == torch.float32 else 1e-2  # a bf16/fp16 buffer holds rounded frequencies
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=rtol, atol=0):
        raise ValueError(
            f"decoder.rotary_embd.inv_freq does not match lm_re_base={cfg['lm_re_base']} and head_dim "
            f"{cfg['lm_hidden_dim'] // cfg['lm_n_heads']}; fix lm_re_base in config.json."
        )
    if inv_freq.dtype != torch.float32:
        logger.warning(
            "decoder.rotary_embd.inv_freq is stored in %s: nanoVLM would rotate with these rounded frequencies, "
            "the converted model recomputes them in float32 (logits differ slightly).", inv_freq.dtype
        )


def convert_state_dict(state: Mapping[str, torch.Tensor], cfg: Mapping) -> dict[str, torch.Tensor]:
    """Map an original nanoVLM state dict onto nanovlm parameter names (see the module docstring).

    Raises StateDictMismatchError listing every missing and every unconsumed key, and ValueError for tensors whose
    content contradicts the config (fused qkv not divisible by 3, untied head/embeddings under lm_tie_weights, RoPE
    frequencies that disagree with lm_re_base).
    """
    keys = _KeyMap(state)
    _convert_vision_tower(keys, cfg)
    keys.move("MP.proj.weight", "model.multi_modal_projector.proj.weight")
    _convert_decoder(keys, cfg)
    _convert_head(keys, cfg)
    _check_rope(keys, cfg)
    if keys.missing or keys.remaining:
        raise StateDictMismatchError(
            keys.missing,
            list(keys.remaining),
            context=f"vit_n_blocks={cfg['vit_n_blocks']}, lm_n_blocks={cfg['lm_n_blocks']}",
        )
    return keys.out


def load_into_model(model: NanoVLMForConditionalGeneration, converted: Mapping[str, torch.Tensor]) -> None:
    """Copy converted tensors into `model`, checking names and shapes against its state dict first."""
    target = model.state_dict()
    missing = [k for k in target if k not in converted]
    unexpected = [k for k in converted if k not in target]
    if missing or unexpected:
        raise StateDictMismatchError(missing, unexpected, context="after renaming, against the nanovlm model")
    wrong = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(target[k].shape)}"
             for k in target if converted[k].shape != target[k].shape]
    if wrong:
        raise ValueError(
            f"Tensor shapes disagree with config.json ({len(wrong)}): {preview(wrong, 5)}. Check the vit_*/lm_* "
            "sizes and lm_vocab_size in config.json."
        )
    model.load_state_dict(dict(converted), strict=True)


__all__ = [
    "StateDictMismatchError",
    "convert_state_dict",
    "load_into_model",
    "preview",
    "rope_inv_freq",
]
