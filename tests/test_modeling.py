"""Model: shapes, loss, generation with/without cache, batched left padding, config and input errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration
from nanovlm.modeling_nanovlm import CACHE_KEY, pixel_shuffle


def _inputs(processor, images, question: str, answer: str | None = None):
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=answer is None, return_tensors="pt"
    )


def test_pixel_shuffle_layout():
    # 4x4 grid of patches, 1 channel holding the patch index; factor 2 -> 4 tokens of 4 channels.
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    # token 0 = the top-left 2x2 block (patches 0, 1, 4, 5) in row-major order
    assert y[0, 0].tolist() == [0, 1, 4, 5]
    assert y[0, 1].tolist() == [2, 3, 6, 7]
    assert y[0, 3].tolist() == [10, 11, 14, 15]


def test_forward_backward_shapes_and_loss(tiny_model, tiny_processor, tiny_config):
    image = Image.new("RGB", (64, 32), (200, 30, 30))
    batch = _inputs(tiny_processor, [image], "What color is it?", "red")
    labels = batch["input_ids"].clone()
    tiny_model.train()
    out = tiny_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=labels)
    T = batch["input_ids"].shape[1]
    assert out.logits.shape == (1, T, tiny_config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (3, tiny_config.image_seq_len, tiny_config.text_config.hidden_size)
    assert getattr(out, CACHE_KEY) is None  # training runs without a cache
    # the loss is the mean next-token cross entropy
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:])
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert tiny_model.model.multi_modal_projector.proj.weight.grad.abs().sum() > 0
    assert tiny_model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_num_items_in_batch_sums_loss(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32))], "What color is it?", "black")
    labels = batch["input_ids"].clone()
    mean = tiny_model(**batch, labels=labels).loss
    summed = tiny_model(**batch, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    n = labels.shape[1] - 1
    torch.testing.assert_close(summed, mean * n)


def test_image_features_replace_image_tokens(tiny_model, tiny_processor, tiny_config):
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32), (0, 0, 255))], "What color?")
    base = tiny_model.model
    embeds = base.get_input_embeddings()(batch["input_ids"])
    feats = base.get_image_features(batch["pixel_values"])
    merged = base.merge_image_features(batch["input_ids"], embeds, feats)
    mask = batch["input_ids"][0] == tiny_config.image_token_id
    assert int(mask.sum()) == tiny_config.image_seq_len
    torch.testing.assert_close(merged[0, mask], feats.reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(merged[0, ~mask], embeds[0, ~mask])


def test_greedy_generation_same_with_and_without_cache(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (64, 64), (10, 200, 10))], "What color is the circle?")
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with_cache = tiny_model.generate(**batch, use_cache=True, **kw)
    without = tiny_model.generate(**batch, use_cache=False, **kw)
    assert with_cache.shape[1] == batch["input_ids"].shape[1] + 12
    assert torch.equal(with_cache, without)


class _ForceTokenAt(LogitsProcessor):
    """Make `token` the only choice when the sequence is `length` tokens long."""

    def __init__(self, token: int, length: int):
        self.token, self.length = token, length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.length:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


def test_generated_image_token_decodes_with_cache_like_no_cache_greedy(tiny_model, tiny_processor, tiny_config):
    # A decode step whose input is the image token: transformers >= 5.25 passes the cache as `cache=`, and the
    # image-token check must still see a decode step (the token is text there, with no image features).
    batch = _inputs(tiny_processor, [Image.new("RGB", (64, 32), (200, 10, 10))], "What color is the circle?")
    prompt_len, steps, image_token = batch["input_ids"].shape[1], 6, tiny_config.image_token_id
    force = _ForceTokenAt(image_token, prompt_len + 1)  # the 2nd new token: the 3rd step decodes it
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True)
    out = tiny_model.generate(**batch, **kw, logits_processor=LogitsProcessorList([force]))
    new = out[0, prompt_len:]
    assert new[1] == image_token

    # Reference: greedy without any cache, the whole sequence re-run at every step from its embeddings; `generate`
    # suppresses the image token (generation_config.suppress_tokens) before the forcing processor runs.
    base = tiny_model.model
    with torch.no_grad():
        embeds = base.get_input_embeddings()(batch["input_ids"])
        embeds = base.merge_image_features(batch["input_ids"], embeds, base.get_image_features(batch["pixel_values"]))
        ids = batch["input_ids"]
        for _ in range(steps):
            logits = tiny_model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
            logits[:, image_token] = -float("inf")
            next_id = force(ids, logits).argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            embeds = torch.cat([embeds, base.get_input_embeddings()(next_id)], dim=1)
    assert out.tolist() == ids.tolist()


def test_generate_emits_no_deprecation_warnings(tiny_model, tiny_processor):
    # transformers 5.25 renamed `past_key_values` to `cache` and warns (Python FutureWarning, and a logged
    # "deprecated" line) when our code uses the old name.
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32))], "Describe")
    hf_logging.get_logger("transformers").warning_once.cache_clear()  # warning_once would hide a repeat
    logged = []
    handler = hf_logging.logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    hf_logging.add_handler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = tiny_model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            tiny_model(**batch, use_cache=True)
    finally:
        hf_logging.remove_handler(handler)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    assert [m for m in logged if "deprecated" in m.lower()] == []


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_processor):
    tok = tiny_processor.tokenizer
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (96, 32), (0, 0, 255))]
    questions = ["What color?", "Which image has a blue triangle? Answer in one word."]
    texts = [
        tiny_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    single = []
    for text, image in zip(texts, images):
        inputs = tiny_processor(text=text, images=[image], return_tensors="pt")
        out = tiny_model.generate(**inputs, **kw)
        single.append(out[0, inputs["input_ids"].shape[1] :])
    tok.padding_side = "left"
    try:
        batch = tiny_processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"
    assert batch["attention_mask"][0, 0] == 0 or batch["attention_mask"][1, 0] == 0  # really padded
    out = tiny_model.generate(**batch, **kw)
    prompt_len = batch["input_ids"].shape[1]
    for i in range(2):
        assert out[i, prompt_len:].tolist() == single[i].tolist()


def test_sampling_generation_respects_options(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32))], "Describe")
    torch.manual_seed(0)
    a = tiny_model.generate(**batch, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=6)
    torch.manual_seed(0)
    b = tiny_model.generate(**batch, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=6)
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy
    greedy = tiny_model.generate(**batch, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    k1 = tiny_model.generate(**batch, do_sample=True, top_k=1, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(greedy, k1)


def test_generation_stops_at_eos(tiny_model, tiny_processor, tiny_config):
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32))], "Describe")
    eos = tiny_config.text_config.eos_token_id
    # Make EOS the argmax at every step: generation must stop after one token.
    with torch.no_grad():
        tiny_model.lm_head.weight.data = tiny_model.lm_head.weight.data.clone()  # untie for this test
        tiny_model.config.tie_word_embeddings = False
        tiny_model.lm_head.weight[eos] = tiny_model.lm_head.weight[eos] * 0 + 1e3 * torch.sign(
            tiny_model.model(**batch).last_hidden_state[0, -1]
        )
    out = tiny_model.generate(**batch, max_new_tokens=10, do_sample=False)
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    assert new == [eos]


def test_gradient_checkpointing_same_gradients(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (64, 32), (5, 5, 5))], "What color?", "black")
    labels = batch["input_ids"].clone()
    tiny_model.train()
    tiny_model(**batch, labels=labels).loss.backward()
    ref = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    tiny_model.activation_checkpointing_enable()
    tiny_model(**batch, labels=labels).loss.backward()
    for r, p in zip(ref, tiny_model.parameters()):
        torch.testing.assert_close(p.grad, r)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementations_agree(tiny_config, tiny_processor, impl):
    torch.manual_seed(0)
    ref = NanoVLMForConditionalGeneration(tiny_config).eval()
    model = NanoVLMForConditionalGeneration._from_config(tiny_config, attn_implementation=impl).eval()
    model.load_state_dict(ref.state_dict())
    assert model.model.language_model.config._attn_implementation == impl
    assert model.model.vision_tower.config._attn_implementation == impl
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 64), (1, 2, 3))], "What?")
    torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_image_token_feature_mismatch_raises(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (64, 32))], "What?")  # 3 tiles
    with pytest.raises(ValueError, match=r"image tokens: 12, image features: 4 \(1 tiles x 4 tokens\)"):
        tiny_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"image tokens: 12, image features: 0"):
        tiny_model(input_ids=batch["input_ids"])


def test_wrong_pixel_values_shape_raises(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (32, 32))], "What?")
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_tiles, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        tiny_model(input_ids=batch["input_ids"], pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)"):
        tiny_model(input_ids=batch["input_ids"], pixel_values=torch.zeros(3, 32, 32))


def test_config_errors():
    with pytest.raises(ValueError, match=r"image_size \(30\) must be a multiple of vision_config.patch_size \(8\)"):
        NanoVLMConfig(vision_config={"image_size": 30, "patch_size": 8})
    with pytest.raises(ValueError, match=r"patch grid \(6x6.*divisible by pixel_shuffle_factor \(4\)"):
        NanoVLMConfig(vision_config={"image_size": 48, "patch_size": 8}, pixel_shuffle_factor=4)
    with pytest.raises(ValueError, match=r"pixel_shuffle_factor` must be a positive int, got 0"):
        NanoVLMConfig(pixel_shuffle_factor=0)
    with pytest.raises(TypeError, match=r"`text_config` must be None, a dict or a PreTrainedConfig, got str"):
        NanoVLMConfig(text_config="llama")
    with pytest.raises(TypeError, match=r"must be a SigLIP vision config .* got LlamaConfig"):
        NanoVLMConfig(vision_config={"model_type": "llama"})
    with pytest.raises(ValueError, match=r"image_token_id \(5000\) is outside the text vocabulary \(vocab_size 100\)"):
        NanoVLMConfig(text_config={"vocab_size": 100}, image_token_id=5000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_config": {"hidden_size": 64, "num_attention_heads": 5}},
         "text_config.hidden_size (64) must be divisible by text_config.num_attention_heads (5); choose a head count "
         "that divides 64."),
        ({"text_config": {"num_attention_heads": 4, "num_key_value_heads": 3}},
         "text_config.num_attention_heads (4) must be a multiple of text_config.num_key_value_heads (3) (each key/value "
         "head serves a whole group of query heads); choose a key/value head count that divides 4."),
        ({"vision_config": {"hidden_size": 128, "num_attention_heads": 5}},
         "vision_config.hidden_size (128) must be divisible by vision_config.num_attention_heads (5); choose a head "
         "count that divides 128."),
        ({"vision_config": {"patch_size": 0}}, "vision_config.patch_size must be a positive int, got 0."),
        ({"text_config": {"hidden_size": 0}}, "text_config.hidden_size must be a positive int, got 0."),
        ({"text_config": {"num_hidden_layers": -1}}, "text_config.num_hidden_layers must be a positive int, got -1."),
        ({"text_config": {"vocab_size": 0}}, "text_config.vocab_size must be a positive int, got 0."),
    ],
)
def test_inconsistent_sizes_fail_at_config_time_in_one_line(kwargs, message):
    """Each of these built a config before: then a shape error in the first forward, a ZeroDivisionError, a model
    without layers, or transformers' two-line validator error."""
    with pytest.raises(ValueError) as info:
        NanoVLMConfig(**kwargs)
    assert str(info.value) == message


def test_config_defaults_mirror_nanovlm():
    config = NanoVLMConfig()
    assert config.vision_config.image_size == 512 and config.vision_config.patch_size == 16
    assert config.pixel_shuffle_factor == 4 and config.image_seq_len == 64
    assert config.vision_config.vision_use_head is False
    assert config.text_config.hidden_size == 960 and config.text_config.num_hidden_layers == 32
    assert config.tie_word_embeddings is True


def test_bf16_forward_and_generate(tiny_model, tiny_processor):
    batch = _inputs(tiny_processor, [Image.new("RGB", (64, 32), (50, 100, 150))], "What color?")
    ref = tiny_model(**batch).logits
    model = tiny_model.to(torch.bfloat16)
    out = model(**batch).logits  # pixel_values are cast to the vision tower's dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_a_packed_training_forward_compiles_to_one_graph():
    """torch.compile sees the whole forward of a packed batch with images as one graph: the image-token count check
    (a device-to-host read) is left to eager runs. Before, dynamo split the forward into 5 graphs (4 breaks at
    `Tensor.item()`), as the H200 run of bench/gpu_suite.py showed."""
    from training_helpers import packed_dataset, synthetic_rows, tiny_setup

    from nanovlm.data import PackedCollator
    from nanovlm.data.collator import BOOKKEEPING_KEY

    model, processor = tiny_setup()
    model.train()
    packs = [pack for _, pack in zip(range(2), packed_dataset(synthetic_rows(8), processor, infinite=False))]
    batch = PackedCollator(processor.tokenizer.pad_token_id)(packs)
    batch.pop(BOOKKEEPING_KEY, None)
    assert batch["pixel_values"].shape[0] > 0
    explained = torch._dynamo.explain(model)(**batch, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
