"""nanovlm-convert: an original nanoVLM checkpoint (built here from a tiny random state dict in nanoVLM's layout)
converts key for key, and the converted model computes nanoVLM's math (reference forwards written in this file)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_CORPUS
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from nanovlm.cli.convert import convert_checkpoint, main, supports_exact_global_view
from nanovlm.cli.convert_weights import StateDictMismatchError, convert_state_dict, rope_inv_freq

GRID = 2  # tile tokens r1c1..r2c2, images up to 2x2 tiles
NANOVLM_CHAT_TEMPLATE = (  # nanoVLM's VLMConfig.lm_chat_template
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXTRA_TOKENS = {"image_token": "<|image|>", "global_image_token": "<|global_image|>"} | {
    f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1)
}


def base_tokenizer(path) -> int:
    """A small byte-level BPE *without* image tokens (like SmolLM2's), saved to `path`; returns its size."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.save_pretrained(path)
    return len(tokenizer)


def original_config(tokenizer_path, base_vocab: int, tie: bool = True) -> dict:
    """A tiny VLMConfig as nanoVLM's save_pretrained writes it (asdict of the dataclass)."""
    return {
        "vit_hidden_dim": 32, "vit_inter_dim": 64, "vit_patch_size": 8, "vit_img_size": 32, "vit_n_heads": 2,
        "vit_dropout": 0.0, "vit_n_blocks": 2, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
        "vit_model_type": "google/siglip2-base-patch16-512",
        "lm_hidden_dim": 64, "lm_inter_dim": 128, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
        "lm_max_position_embeddings": 8192, "lm_base_vocab_size": base_vocab, "extra_token_amount": len(EXTRA_TOKENS),
        "lm_vocab_size": base_vocab + len(EXTRA_TOKENS), "lm_n_heads": 4, "lm_n_kv_heads": 2, "lm_dropout": 0.0,
        "lm_n_blocks": 2, "lm_attn_scaling": 1.0, "lm_max_length": 4096, "lm_use_tokens": False,
        "lm_tie_weights": tie, "lm_model_type": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "lm_tokenizer": str(tokenizer_path), "lm_chat_template": NANOVLM_CHAT_TEMPLATE,
        "mp_pixel_shuffle_factor": 2, "mp_image_token_length": 4, "max_img_size": 32 * GRID,
        "resize_to_max_side_len": True, "vlm_extra_tokens": dict(EXTRA_TOKENS),
        "vlm_load_backbone_weights": True, "vlm_checkpoint_path": "checkpoints", "hf_repo_name": "nanoVLM",
    }  # fmt: skip


def original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with nanoVLM's names and shapes (`decoder.head.weight` only, when tied, as save_model keeps)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, center=0.0):
        return center + 0.3 * torch.randn(*shape, generator=g)

    d, inter, p = cfg["vit_hidden_dim"], cfg["vit_inter_dim"], cfg["vit_patch_size"]
    n_patches = (cfg["vit_img_size"] // p) ** 2
    sd = {
        "vision_encoder.patch_embedding.conv.weight": rnd(d, 3, p, p),
        "vision_encoder.patch_embedding.conv.bias": rnd(d),
        "vision_encoder.patch_embedding.position_embedding": rnd(1, n_patches, d),
        "vision_encoder.layer_norm.weight": rnd(d, center=1.0),
        "vision_encoder.layer_norm.bias": rnd(d),
    }
    for i in range(cfg["vit_n_blocks"]):
        b = f"vision_encoder.blocks.{i}."
        sd |= {
            b + "ln1.weight": rnd(d, center=1.0), b + "ln1.bias": rnd(d),
            b + "attn.qkv_proj.weight": rnd(3 * d, d), b + "attn.qkv_proj.bias": rnd(3 * d),
            b + "attn.out_proj.weight": rnd(d, d), b + "attn.out_proj.bias": rnd(d),
            b + "ln2.weight": rnd(d, center=1.0), b + "ln2.bias": rnd(d),
            b + "mlp.fc1.weight": rnd(inter, d), b + "mlp.fc1.bias": rnd(inter),
            b + "mlp.fc2.weight": rnd(d, inter), b + "mlp.fc2.bias": rnd(d),
        }  # fmt: skip
    c, lm_inter, heads, kv = cfg["lm_hidden_dim"], cfg["lm_inter_dim"], cfg["lm_n_heads"], cfg["lm_n_kv_heads"]
    hd = c // heads
    for i in range(cfg["lm_n_blocks"]):
        b = f"decoder.blocks.{i}."
        sd |= {
            b + "attn.q_proj.weight": rnd(c, c), b + "attn.k_proj.weight": rnd(kv * hd, c),
            b + "attn.v_proj.weight": rnd(kv * hd, c), b + "attn.out_proj.weight": rnd(c, c),
            b + "mlp.gate_proj.weight": rnd(lm_inter, c), b + "mlp.up_proj.weight": rnd(lm_inter, c),
            b + "mlp.down_proj.weight": rnd(c, lm_inter),
            b + "norm1.weight": rnd(c, center=1.0), b + "norm2.weight": rnd(c, center=1.0),
        }  # fmt: skip
    sd["decoder.norm.weight"] = rnd(c, center=1.0)
    sd["decoder.rotary_embd.inv_freq"] = rope_inv_freq(cfg["lm_re_base"], hd)
    sd["decoder.head.weight"] = rnd(cfg["lm_vocab_size"], c)
    if not cfg["lm_tie_weights"]:
        sd["decoder.token_embedding.weight"] = rnd(cfg["lm_vocab_size"], c)
    sd["MP.proj.weight"] = rnd(c, d * cfg["mp_pixel_shuffle_factor"] ** 2)
    return sd


def write_original(folder, cfg: dict, sd: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    base_vocab = base_tokenizer(root / "base_tokenizer")
    cfg = original_config(root / "base_tokenizer", base_vocab)
    sd = original_state_dict(cfg)
    return {"root": root, "cfg": cfg, "sd": sd, "dir": write_original(root / "nanovlm_orig", cfg, sd)}


@pytest.fixture(scope="module")
def converted(original):
    out = original["root"] / "converted"
    model, processor = convert_checkpoint(original["dir"], out)
    return {"model": model, "processor": processor, "dir": out}


# ---- nanoVLM's math, written out from its models/*.py ----------------------------------------------------------------
def ref_vision(sd: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """nanoVLM's ViT: conv patches + position embedding, pre-norm blocks with a fused qkv, final LayerNorm."""
    d, heads, eps = cfg["vit_hidden_dim"], cfg["vit_n_heads"], cfg["vit_ln_eps"]
    x = F.conv2d(pixels, sd["vision_encoder.patch_embedding.conv.weight"], sd["vision_encoder.patch_embedding.conv.bias"],
                 stride=cfg["vit_patch_size"]).flatten(2).transpose(1, 2)  # (B, N, D)
    x = x + sd["vision_encoder.patch_embedding.position_embedding"]
    bsz, n, _ = x.shape
    for i in range(cfg["vit_n_blocks"]):
        b = f"vision_encoder.blocks.{i}."
        h = F.layer_norm(x, (d,), sd[b + "ln1.weight"], sd[b + "ln1.bias"], eps)
        q, k, v = F.linear(h, sd[b + "attn.qkv_proj.weight"], sd[b + "attn.qkv_proj.bias"]).split(d, dim=-1)
        q, k, v = (t.view(bsz, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v  # bidirectional
        x = x + F.linear(att.transpose(1, 2).reshape(bsz, n, d), sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), sd[b + "ln2.weight"], sd[b + "ln2.bias"], eps)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), sd["vision_encoder.layer_norm.weight"], sd["vision_encoder.layer_norm.bias"], eps)


def ref_projector(weight: torch.Tensor, features: torch.Tensor, s: int) -> torch.Tensor:
    """Pixel shuffle by explicit loops: output token (i, j) concatenates patches (i*s+a, j*s+b), a then b; linear."""
    bsz, n, d = features.shape
    side = math.isqrt(n)
    grid = features.view(bsz, side, side, d)
    tokens = [torch.cat([grid[:, i * s + a, j * s + b] for a in range(s) for b in range(s)], dim=-1)
              for i in range(side // s) for j in range(side // s)]
    return torch.stack(tokens, dim=1) @ weight.T


def ref_decoder(sd: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """nanoVLM's LanguageModel + head on embeddings: RMSNorm, RoPE (cat(freqs, freqs), rotate_half), GQA, SiLU MLP."""
    c, heads, kv, eps = cfg["lm_hidden_dim"], cfg["lm_n_heads"], cfg["lm_n_kv_heads"], cfg["lm_rms_eps"]
    hd, (bsz, t, _) = c // heads, x.shape

    def rms(h, w):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate_half(h):
        return torch.cat((-h[..., hd // 2:], h[..., : hd // 2]), dim=-1)

    inv = 1.0 / (cfg["lm_re_base"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg["lm_n_blocks"]):
        b = f"decoder.blocks.{i}."
        h = rms(x, sd[b + "norm1.weight"])
        q = F.linear(h, sd[b + "attn.q_proj.weight"]).view(bsz, t, heads, hd).transpose(1, 2)
        k = F.linear(h, sd[b + "attn.k_proj.weight"]).view(bsz, t, kv, hd).transpose(1, 2)
        v = F.linear(h, sd[b + "attn.v_proj.weight"]).view(bsz, t, kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        att = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(bsz, t, c)
        x = x + F.linear(att, sd[b + "attn.out_proj.weight"])
        h = rms(x, sd[b + "norm2.weight"])
        gate = F.silu(F.linear(h, sd[b + "mlp.gate_proj.weight"]))
        x = x + F.linear(gate * F.linear(h, sd[b + "mlp.up_proj.weight"]), sd[b + "mlp.down_proj.weight"])
    return F.linear(rms(x, sd["decoder.norm.weight"]), sd["decoder.head.weight"])


def ref_vlm_logits(sd: dict, cfg: dict, input_ids: torch.Tensor, pixels: torch.Tensor, image_token_id: int):
    """nanoVLM's VisionLanguageModel.forward + head: image embeddings replace the image tokens' embeddings in order."""
    embed = sd.get("decoder.token_embedding.weight", sd["decoder.head.weight"])
    x = embed[input_ids].clone()
    image = ref_projector(sd["MP.proj.weight"], ref_vision(sd, cfg, pixels), cfg["mp_pixel_shuffle_factor"])
    x[input_ids == image_token_id] = image.reshape(-1, image.shape[-1])
    return ref_decoder(sd, cfg, x)


def nanovlm_reference_inputs(cfg: dict, image: Image.Image, prompt: str):
    """nanoVLM's preprocessing written out (data/processors.py, data/custom_transforms.py, generate.py): resize the
    long side to max_img_size (bicubic), [0, 1] pixels, global view (bilinear antialiased) + row-major tiles; the
    image string prepended to the prompt, chat template, tokenizer with `vlm_extra_tokens`."""
    s, m = cfg["vit_img_size"], cfg["max_img_size"]
    long, short = max(image.size), min(image.size)
    new_short = max(s, math.ceil(short * (m / long) / s) * s)
    new_w, new_h = (m, new_short) if image.width >= image.height else (new_short, m)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255  # (3, H, W)
    rows, cols = new_h // s, new_w // s
    tiles = x.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
    global_view = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    pixels = tiles if rows * cols == 1 else torch.cat([global_view, tiles])

    tok = AutoTokenizer.from_pretrained(cfg["lm_tokenizer"], use_fast=True, extra_special_tokens=cfg["vlm_extra_tokens"],
                                        chat_template=cfg["lm_chat_template"])
    block = tok.image_token * cfg["mp_image_token_length"]
    image_string = tok.global_image_token + block
    if rows * cols > 1:
        image_string += "".join(getattr(tok, f"r{r + 1}c{c + 1}") + block for r in range(rows) for c in range(cols))
    ids = tok.apply_chat_template([{"role": "user", "content": image_string + prompt}], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)
    return torch.tensor([ids]), pixels, tok.convert_tokens_to_ids(tok.image_token)


# ---- keys -------------------------------------------------------------------------------------------------------------
def test_every_source_key_consumed_and_every_parameter_filled(original, converted):
    cfg, sd, model = original["cfg"], original["sd"], converted["model"]
    mapped = convert_state_dict(sd, cfg)
    assert set(mapped) == set(model.state_dict())
    source_numel = sum(v.numel() for k, v in sd.items() if k != "decoder.rotary_embd.inv_freq")
    assert sum(p.numel() for p in model.parameters()) == source_numel  # tied head counted once on both sides
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, mapped[name]), name
    lm = "model.language_model."
    assert torch.equal(model.state_dict()[f"{lm}embed_tokens.weight"], sd["decoder.head.weight"])
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.state_dict()["model.vision_tower.embeddings.position_embedding.weight"],
                       sd["vision_encoder.patch_embedding.position_embedding"][0])
    assert torch.equal(model.state_dict()[f"{lm}layers.1.self_attn.o_proj.weight"],
                       sd["decoder.blocks.1.attn.out_proj.weight"])
    assert torch.equal(model.state_dict()[f"{lm}layers.0.post_attention_layernorm.weight"],
                       sd["decoder.blocks.0.norm2.weight"])


def test_vision_qkv_split_follows_nanovlm_order(original, converted):
    d, sd = original["cfg"]["vit_hidden_dim"], original["sd"]
    for i, layer in enumerate(converted["model"].model.vision_tower.encoder.layers):
        fused_w, fused_b = sd[f"vision_encoder.blocks.{i}.attn.qkv_proj.weight"], sd[f"vision_encoder.blocks.{i}.attn.qkv_proj.bias"]
        for j, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
            assert torch.equal(proj.weight, fused_w[j * d:(j + 1) * d])
            assert torch.equal(proj.bias, fused_b[j * d:(j + 1) * d])


def test_projector_equals_nanovlm_pixel_shuffle_and_linear(original, converted):
    cfg = original["cfg"]
    features = torch.randn(3, (cfg["vit_img_size"] // cfg["vit_patch_size"]) ** 2, cfg["vit_hidden_dim"])
    with torch.no_grad():
        ours = converted["model"].model.multi_modal_projector(features)
    ref = ref_projector(original["sd"]["MP.proj.weight"], features, cfg["mp_pixel_shuffle_factor"])
    assert ours.shape == (3, cfg["mp_image_token_length"], cfg["lm_hidden_dim"])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_vision_tower_and_decoder_compute_nanovlm_math(original, converted):
    cfg, sd, model = original["cfg"], original["sd"], converted["model"]
    pixels = torch.rand(2, 3, cfg["vit_img_size"], cfg["vit_img_size"])
    embeds = torch.randn(1, 9, cfg["lm_hidden_dim"])
    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden)
    torch.testing.assert_close(vision, ref_vision(sd, cfg, pixels), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_decoder(sd, cfg, embeds), rtol=1e-4, atol=1e-4)


# ---- preprocessing and end to end ------------------------------------------------------------------------------------
def test_processor_reproduces_nanovlm_preprocessing(original, converted):
    cfg, processor = original["cfg"], converted["processor"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 50, 3), dtype=np.uint8))
    ref_ids, ref_pixels, ref_image_id = nanovlm_reference_inputs(cfg, image, "What is this?")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ip = processor.image_processor
    assert (ip.do_normalize, ip.global_image_position, ip.upscale, ip.max_image_size, ip.tile_size) == (
        False, "first", True, cfg["max_img_size"], cfg["vit_img_size"])
    assert torch.equal(inputs["input_ids"], ref_ids)  # same extra-token ids, image string and chat template
    assert processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token) == ref_image_id
    assert inputs["pixel_values"].shape == ref_pixels.shape == (3, 3, 32, 32)  # global view + 1x2 tiles
    assert torch.equal(inputs["pixel_values"][1:], ref_pixels[1:])


@pytest.mark.skipif(not supports_exact_global_view(), reason="image processor lacks global_view_from='resized'")
def test_global_view_matches_nanovlm(original, converted):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    _, ref_pixels, _ = nanovlm_reference_inputs(original["cfg"], image, "x")
    pixels = converted["processor"].image_processor(image)["pixel_values"]
    assert torch.equal(pixels[0], ref_pixels[0])


def test_converted_logits_equal_nanovlm_reference(original, converted):
    cfg, sd = original["cfg"], original["sd"]
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    ids, pixels, image_id = nanovlm_reference_inputs(cfg, image, "How many shapes are there?")
    with torch.no_grad():
        logits = converted["model"](input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits, ref_vlm_logits(sd, cfg, ids, pixels, image_id), rtol=1e-4, atol=1e-4)


def test_cli_output_loads_with_auto_classes(original, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert main(["--input", str(original["dir"]), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"Saved the converted checkpoint to {out}"
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert model.config.text_config.rope_parameters["rope_theta"] == 100000.0
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image|>") == 300
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == [300]  # the image token
    cfg, sd = original["cfg"], original["sd"]
    ids, pixels, image_id = nanovlm_reference_inputs(cfg, Image.new("RGB", (64, 64), (10, 200, 30)), "Hi")
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits, ref_vlm_logits(sd, cfg, ids, pixels, image_id), rtol=1e-4, atol=1e-4)


def test_untied_head_and_bfloat16_source(original, tmp_path):
    cfg = dict(original["cfg"], lm_tie_weights=False)
    sd = {k: v.to(torch.bfloat16) for k, v in original_state_dict(cfg, seed=1).items()}
    model, _ = convert_checkpoint(write_original(tmp_path / "untied", cfg, sd), tmp_path / "out")
    assert model.dtype == torch.bfloat16  # the source dtype by default
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, sd["decoder.head.weight"])
    assert torch.equal(model.get_input_embeddings().weight, sd["decoder.token_embedding.weight"])


# ---- errors -----------------------------------------------------------------------------------------------------------
def test_missing_and_unconsumed_keys_are_listed(original):
    sd = dict(original["sd"])
    del sd["vision_encoder.blocks.1.mlp.fc2.bias"]
    sd["decoder.blocks.2.norm1.weight"] = torch.ones(64)
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): vision_encoder\.blocks\.1\.mlp\.fc2\.bias; "
                       r"unconsumed keys \(1\): decoder\.blocks\.2\.norm1\.weight") as info:
        convert_state_dict(sd, original["cfg"])
    assert info.value.missing == ["vision_encoder.blocks.1.mlp.fc2.bias"]
    assert info.value.unexpected == ["decoder.blocks.2.norm1.weight"]


def test_untied_checkpoint_declared_tied_is_refused(original):
    sd = dict(original["sd"], **{"decoder.token_embedding.weight": torch.zeros_like(original["sd"]["decoder.head.weight"])})
    with pytest.raises(ValueError, match="lm_tie_weights=true but decoder.head.weight differs"):
        convert_state_dict(sd, original["cfg"])


def test_cli_reports_key_mismatch_in_one_line(original, tmp_path, capsys):
    sd = {k: v for k, v in original["sd"].items() if k != "MP.proj.weight"}
    src = write_original(tmp_path / "broken", original["cfg"], sd)
    assert main(["--input", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nanovlm-convert: error: The nanoVLM checkpoint does not match its config.json")
    assert "missing keys (1): MP.proj.weight" in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vit_cls_flag": True}, "vit_cls_flag=true .* has no SigLIP equivalent"),
        ({"lm_attn_scaling": 2.0}, "lm_attn_scaling=2.0 scales RoPE's cos/sin"),
        ({"mp_image_token_length": 16}, r"mp_image_token_length=16 but the pixel shuffle yields \(4/2\)\^2=4"),
        ({"max_img_size": 48}, "max_img_size=48 is not a multiple of vit_img_size=32"),
        ({"lm_n_blocks": None}, r"lacks \['lm_n_blocks'\]"),
    ],
)
def test_unconvertible_configs_name_the_field(original, tmp_path, change, message):
    cfg = {k: v for k, v in dict(original["cfg"], **change).items() if v is not None}
    src = write_original(tmp_path / "src", cfg, original["sd"])
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, tmp_path / "out")


def test_extra_tokens_in_another_order_are_refused(original, tmp_path):
    extra = dict(reversed(list(EXTRA_TOKENS.items())))
    src = write_original(tmp_path / "src", dict(original["cfg"], vlm_extra_tokens=extra), original["sd"])
    with pytest.raises(ValueError, match=r"gives nanoVLM's extra tokens other ids \(6\): r2c2: nanovlm "
                                         r"<row_2_col_2>=305, nanoVLM <row_2_col_2>=300"):
        convert_checkpoint(src, tmp_path / "out")


def test_missing_input_and_unknown_hub_id(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "no such folder, and not a hub id" in capsys.readouterr().err
    assert main(["--input", "nobody-here/not-a-model-xyz", "--output", str(tmp_path / "out")]) == 2
    assert "could not be fetched from the hub" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    assert "lacks config.json, model.safetensors" in capsys.readouterr().err


def test_output_into_the_input_folder_is_refused(original, tmp_path, capsys):
    src = write_original(tmp_path / "src", original["cfg"], {"x": torch.zeros(1)})
    before = (src / "config.json").read_bytes(), (src / "model.safetensors").read_bytes()
    assert main(["--input", str(src), "--output", str(src / ".." / "src")]) == 2
    assert capsys.readouterr().err == (
        f"nanovlm-convert: error: --output {src / '..' / 'src'} is the --input folder, which it would overwrite; pass "
        "a folder outside it\n"
    )
    assert ((src / "config.json").read_bytes(), (src / "model.safetensors").read_bytes()) == before


def test_corrupt_weights_file(original, tmp_path, capsys):
    src = write_original(tmp_path / "src", original["cfg"], {"x": torch.zeros(1)})
    (src / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["--input", str(src), "--output", str(tmp_path / "out")]) == 2
    assert f"{src / 'model.safetensors'} is not a readable safetensors file" in capsys.readouterr().err


def test_non_empty_output_is_refused_and_overwrite_replaces_it(original, tmp_path):
    """Converting into a trained checkpoint's folder used to replace its weights and config silently and keep its
    model card and training files, which then described another model. Now a non-empty --output is one line (the
    folder untouched) and --overwrite replaces the whole folder; the result loads in a fresh process outside the
    repository. Run as `python -m nanovlm.cli.convert`, as a user would."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "trained"
    out.mkdir()
    (out / "README.md").write_text("a trained model's card")
    (out / "config.json").write_text("{}")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nanovlm.cli.convert", "--input", str(original["dir"]), "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (f"nanovlm-convert: error: --output {out} exists and is not empty; pass a "
                                            "new folder, or --overwrite to replace its contents")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]
    assert (out / "config.json").read_text() == "{}"

    proc = subprocess.run([*cmd, "--overwrite", "--dtype", "bfloat16"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "README.md").exists()
    env.pop("PYTHONPATH")
    check = ("import sys; sys.modules['nanovlm'] = None; from transformers import AutoModel; "
             f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True); print(type(m).__name__, m.dtype)")
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["NanoVLMForConditionalGeneration", "torch.bfloat16"]


def test_output_inside_or_holding_the_input_is_refused(original, tmp_path, capsys):
    """An --output inside the original folder mixed the two checkpoints; one holding it was deleted by --overwrite."""
    src = write_original(tmp_path / "src", original["cfg"], original["sd"])
    assert main(["--input", str(src), "--output", str(src / "converted")]) == 2
    assert capsys.readouterr().err == (f"nanovlm-convert: error: --output {src / 'converted'} lies inside the --input "
                                       f"folder {src}; pass a folder outside it\n")
    assert main(["--input", str(src), "--output", str(tmp_path), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"nanovlm-convert: error: --output {tmp_path} holds the --input folder {src}, "
                                       "which --overwrite would delete; pass a folder outside it\n")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_batched_generation_of_a_converted_checkpoint_equals_one_by_one(converted):
    """The converted tokenizer (like SmolLM2's) pads on the right, so a batch of prompts of different lengths was
    continued from pad tokens: 2 of 3 greedy answers differed from the same prompts one by one (transformers only
    warned). The processor now pads on the left; loaded from the converted folder as a user would."""
    model = AutoModel.from_pretrained(converted["dir"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted["dir"], trust_remote_code=True)
    assert processor.tokenizer.padding_side == "left"
    red, wide = Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (64, 32), (20, 200, 40))
    texts = ["<|image|>What is it?", "<|image|><|image|>Compare the two images, in detail please", "No image"]
    images = [[red], [wide, red], []]
    with torch.no_grad():
        alone = []
        for text, imgs in zip(texts, images):
            inputs = processor(text=text, images=imgs or None, return_tensors="pt")
            alone.append(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:])
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        batched = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1, 0]  # padded on the left
    assert [row.tolist() for row in batched] == [row.tolist() for row in alone]


def test_tilde_paths_after_equals_signs(original, tmp_path, monkeypatch, capsys):
    """`--input=~/x` (the shell leaves that `~` alone) was "no such folder", and `--output=~/y` wrote a folder
    literally named `~` in the working directory."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(original["dir"], tmp_path / "home" / "orig")
    assert main(["--input=~/orig", "--output=~/converted"]) == 0, capsys.readouterr().err
    assert (tmp_path / "home" / "converted" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()
