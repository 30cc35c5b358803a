"""attn_implementation="torch_varlen" (nanovlm/attention.py): packed rows through PyTorch's varlen kernel.

The kernel (flash-attention) is CUDA-only, so on CPU these tests check everything around it: the model's packed
loss and gradients through the glue equal sdpa's when the kernel is replaced by a per-sample sdpa reference with
the same signature (for each torch signature the glue supports); unpacked forwards and generation run sdpa; and
the real kernel on CPU refuses in one line. bench/gpu_suite.py checks the kernel itself on a GPU
(`packed_equivalence_varlen`, `train_varlen_b2`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_packed_equivalence import _sample

from nanovlm import NanoVLMForConditionalGeneration, attention
from nanovlm.data.collator import BOOKKEEPING_KEY, PackedCollator

# The keyword arguments of torch's varlen_attn, by version: (2.10) is_causal; (2.11) scale + window_size;
# (2.12+) also enable_gqa.
SIGNATURES = {
    "torch-2.10": {"is_causal"},
    "torch-2.11": {"scale", "window_size"},
    "torch-2.12": {"scale", "window_size", "enable_gqa"},
}
CALLS: list[dict] = []


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          is_causal=False, enable_gqa=False):
    """varlen_attn's contract, one sample at a time through sdpa (which, as the flash kernel, refuses fewer KV heads
    unless enable_gqa is set)."""
    CALLS.append({"cu_seq_q": cu_seq_q.clone(), "max_q": max_q, "heads": (query.shape[1], key.shape[1])})
    assert query.ndim == 3 and cu_seq_q.dtype == torch.int32 and int(cu_seq_q[-1]) == query.shape[0]
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert is_causal or tuple(window_size) == (-1, 0)  # the glue always asks for causal attention
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        assert end - start <= max_q
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, length, head_dim)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                        enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.fixture
def packed_batch(tiny_processor):
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (96, 32), (0, 0, 255))
    samples = [
        _sample(tiny_processor, [red], [("What color?", "red")]),
        _sample(tiny_processor, [blue, red], [("Which image is wider?", "image 1"), ("Color of image 2?", "red")]),
        _sample(tiny_processor, [], [("How many shapes are there?", "three")]),
    ]
    batch = PackedCollator(tiny_processor.tokenizer.pad_token_id)([{"samples": samples[:2]}, {"samples": samples[2:]}])
    batch.pop(BOOKKEEPING_KEY)
    assert batch["input_ids"].shape[1] > len(samples[2]["input_ids"])  # row 2 is padded: padding is a sample too
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("signature", list(SIGNATURES))
def test_packed_loss_and_gradients_equal_sdpa(tiny_config, packed_batch, monkeypatch, signature):
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    monkeypatch.setattr(attention, "_PARAMS", SIGNATURES[signature])
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))  # the reference runs anywhere
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation="sdpa").train()
    sdpa_loss, sdpa_grads = _loss_and_grads(model, packed_batch)
    model.set_attn_implementation("torch_varlen")
    CALLS.clear()
    varlen_loss, varlen_grads = _loss_and_grads(model, packed_batch)

    torch.testing.assert_close(varlen_loss, sdpa_loss, atol=1e-6, rtol=1e-6)
    assert sdpa_grads.keys() == varlen_grads.keys()
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # one kernel call per decoder layer, over the collator's boundaries of the flattened batch; the vision tower
    # (no cu_seq_lens) ran sdpa
    text = tiny_config.text_config
    assert len(CALLS) == text.num_hidden_layers
    assert all(torch.equal(c["cu_seq_q"], packed_batch["cu_seq_lens_q"]) for c in CALLS)
    assert text.num_key_value_heads < text.num_attention_heads  # GQA: the kernel shares or gets repeated KV heads
    gqa = "enable_gqa" in SIGNATURES[signature]
    kv_heads = text.num_key_value_heads if gqa else text.num_attention_heads  # repeated by the glue otherwise
    assert CALLS[0]["heads"] == (text.num_attention_heads, kv_heads)


def test_packed_forward_with_the_real_kernel_on_cpu_refuses_in_one_line(tiny_config, packed_batch):
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation="torch_varlen")
    with pytest.raises(RuntimeError, match=r"^attn_implementation='torch_varlen' runs PyTorch's flash-attention "
                                           r"varlen kernel, which needs a CUDA GPU; this forward is on cpu: use sdpa"):
        model(**packed_batch)


def test_unpacked_forward_and_generation_run_sdpa(tiny_config, tiny_processor):
    torch.manual_seed(0)
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation="sdpa").eval()
    image = Image.new("RGB", (64, 32), (0, 128, 255))
    prompts = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": t}]}]
               for t in ("What color?", "Is the picture wider than it is tall?")]
    inputs = tiny_processor.apply_chat_template(prompts, tokenize=True, return_dict=True, return_tensors="pt",
                                                add_generation_prompt=True, padding=True)
    assert (inputs["attention_mask"] == 0).any()  # left padding: the 4-D sdpa mask is needed and built
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        sdpa_logits, sdpa_tokens = model(**inputs).logits, model.generate(**inputs, **kw)
        model.set_attn_implementation("torch_varlen")
        varlen_logits, varlen_tokens = model(**inputs).logits, model.generate(**inputs, **kw)
    torch.testing.assert_close(varlen_logits, sdpa_logits, atol=0, rtol=0)
    assert torch.equal(varlen_tokens, sdpa_tokens)


def test_trainer_steps_reach_the_kernel_and_match_sdpa(monkeypatch, tmp_path):
    """bench/train_throughput.py's NanoVLMTrainer steps (what the GPU suite's train_varlen items run): the
    collator's cu_seq_lens reach the kernel through the Trainer, and every step's loss equals sdpa's."""
    from test_bench_scripts import TRAIN_ARGS, load_script

    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))
    bench = load_script("train_throughput")
    losses = {}
    for impl in ("sdpa", "torch_varlen"):
        CALLS.clear()
        args = bench.build_parser().parse_args(TRAIN_ARGS + ["--attn_implementation", impl, "--steps", "3"])
        run = bench.build_run(args, "tiny", str(tmp_path / impl))
        run["trainer"].train()
        losses[impl] = [float(r["loss"]) for r in run["trainer"].timer.records]
        calls = len(CALLS)
    assert len(losses["sdpa"]) == 3 and losses["torch_varlen"] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert calls == 3 * run["model"].config.text_config.num_hidden_layers  # every decoder layer of every step


def test_a_decoder_layer_compiles_to_one_graph_around_the_kernel(tiny_config, monkeypatch):
    """What `--compile_regions` compiles (one decoder layer) traces as a single graph with the installed torch's
    varlen op in it: no graph break in the glue. Tracing needs no kernel (fake tensors); the backend stops before
    anything runs."""
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation="torch_varlen").train()
    text = model.model.language_model
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [*range(12), 0, 1, 2, 3]])
    hidden = torch.randn(2, 16, tiny_config.text_config.hidden_size, requires_grad=True)
    cu_seq_lens = torch.tensor([0, 6, 16, 28, 32], dtype=torch.int32)
    graphs = []

    class Traced(Exception):
        pass

    def backend(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        raise Traced

    compiled = torch.compile(text.layers[0], backend=backend, fullgraph=True)  # a graph break would raise here
    with pytest.raises(Exception, match="Traced"):
        compiled(hidden, attention_mask=None, position_ids=positions,
                 position_embeddings=text.rotary_emb(hidden, positions), cu_seq_lens_q=cu_seq_lens,
                 cu_seq_lens_k=cu_seq_lens, max_length_q=12, max_length_k=12)
    assert len(graphs) == 1
    assert any("varlen" in target for target in graphs[0]), graphs[0]
