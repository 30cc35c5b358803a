"""`attn_implementation="torch_varlen"`: packed samples through PyTorch's own flash-attention varlen kernel.

Why: packed training must keep samples apart. With sdpa that takes a (B, 1, T, T) block-diagonal mask, which sends
sdpa to its masked kernel: it computes every block of the 4096 x 4096 row and costs 10% of the 460m step on an
H200 against plain causal attention (BENCHMARKS.md). flash-attention's varlen kernel skips the other samples'
blocks instead, but `flash_attention_2` needs the flash-attn package (a CUDA build per torch version; not on the
GPU machines). PyTorch ships the same kernel as `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10); this
module plugs it into transformers' attention interface under its own name. Hand-written because transformers
(5.17-5.25) has no entry for it.

What runs where:
- a packed forward (the collator's `cu_seq_lens_q/k` and `max_length_q/k` kwargs, no cache): `varlen_attn` over
  the flattened batch, causal within each sample (the collator makes each row's padding its own sample);
- everything else (no `cu_seq_lens_*`: generation, evaluation of unpacked rows, the vision tower): sdpa, with
  the mask transformers builds for sdpa (registered below), so results equal `attn_implementation="sdpa"`.
The kernel is CUDA-only: a packed forward on another device raises (use sdpa there) rather than quietly running a
different kernel. Importing nanovlm registers the name, so it works with `from_pretrained(...,
attn_implementation="torch_varlen")` and `--attn_implementation torch_varlen` in any process that imported nanovlm.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "torch_varlen"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: the name stays registered and says what is missing when used
    varlen_attn = None

_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
KERNEL_DEVICES = ("cuda",)  # where varlen_attn has a kernel (flash-attention: CUDA only)


def _causal_kwargs() -> dict:
    """How this torch's varlen_attn asks for causal attention: `window_size=(-1, 0)` from 2.11, `is_causal=True`
    in 2.10."""
    return {"window_size": (-1, 0)} if "window_size" in _PARAMS else {"is_causal": True}


def varlen_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale):
    """Causal varlen attention on (total, heads, head_dim) tensors; key/value may have fewer heads (GQA)."""
    if varlen_attn is None:
        raise RuntimeError(f"attn_implementation={NAME!r} needs torch >= 2.10 (torch.nn.attention.varlen); this is "
                           f"torch {torch.__version__}: use sdpa.")
    extra = _causal_kwargs()
    if "scale" in _PARAMS:
        extra["scale"] = scale
    elif scale != query.shape[-1] ** -0.5:  # torch 2.10 always scales by 1 / sqrt(head_dim)
        raise RuntimeError(f"attn_implementation={NAME!r}: this torch's varlen_attn has no scale argument and the "
                           f"model scales by {scale}; use sdpa or torch >= 2.11.")
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in _PARAMS:  # torch >= 2.12 shares each KV head with its group of query heads
            extra["enable_gqa"] = True
        else:  # each KV head repeated for its group of query heads, as transformers' repeat_kv
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **extra)


def torch_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, T, D) query, (B, H_kv, S, D) key/value -> ((B, T, H, D)
    output, None). Packed rows (`cu_seq_lens_q` given, T == S) run the varlen kernel; the rest runs sdpa."""
    cu_seq_q, cu_seq_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seq_q is None or cu_seq_k is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.device.type not in KERNEL_DEVICES:
        raise RuntimeError(f"attn_implementation={NAME!r} runs PyTorch's flash-attention varlen kernel, which needs a "
                           f"CUDA GPU; this forward is on {query.device.type}: use sdpa there.")
    if dropout and module.training:
        raise ValueError(f"attn_implementation={NAME!r} has no attention dropout (got {dropout}); use sdpa.")
    batch, heads, length, head_dim = query.shape
    scale = scaling if scaling is not None else head_dim**-0.5
    # (B, H, T, D) -> (B * T, H, D): the collator's cu_seq_lens index the flattened batch, row by row
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value)]
    out = varlen_kernel(*flat, cu_seq_q, cu_seq_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), scale)
    return out.reshape(batch, length, heads, head_dim), None


AttentionInterface.register(NAME, torch_varlen_attention_forward)
# The unpacked paths run sdpa, so they get sdpa's mask (None for plain causal rows, 4-D with padding or packing).
AttentionMaskInterface.register(NAME, sdpa_mask)

__all__ = ["NAME", "torch_varlen_attention_forward", "varlen_kernel"]
