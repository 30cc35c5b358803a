"""Image processor and processor: resize, tiles, token strings, assistant masks, tokenizers, error paths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm import NanoVLMImageProcessor, NanoVLMProcessor, extend_tokenizer, train_tokenizer
from nanovlm.image_processing_nanovlm import load_image, resized_size, to_rgb
from nanovlm.tokenizer import tile_tokens


def count(ids, tokenizer, token: str) -> int:
    return int((torch.as_tensor(ids) == tokenizer.convert_tokens_to_ids(token)).sum())


# ---- image processor ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "upscale", "expected"),
    [
        ((32, 32), False, (32, 32)),  # exactly one tile
        ((20, 10), False, (32, 32)),  # small image rounds up to one tile
        ((64, 96), False, (64, 96)),  # 2x3 grid
        ((50, 90), False, (64, 96)),  # long side up to the next multiple, short side never undershoots
        ((1000, 500), False, (128, 64)),  # long side capped at max_image_size
        ((20, 10), True, (128, 64)),  # upscale: long side always max_image_size
    ],
)
def test_resized_size(hw, upscale, expected):
    assert resized_size(*hw, tile_size=32, max_image_size=128, upscale=upscale) == expected


def test_tiles_are_row_major_with_global_view_first():
    proc = NanoVLMImageProcessor(tile_size=2, max_image_size=8, max_grid=4, do_normalize=False)
    # A 4x6 image whose pixel value encodes its tile: tile (r, c) has value 10*r + c.
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            arr[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 10 * r + c
    out = proc(Image.fromarray(arr))
    assert out["image_grids"].tolist() == [[2, 3]]
    pv = out["pixel_values"]
    assert pv.shape == (7, 3, 2, 2)  # global view + 6 tiles
    tile_values = [round(float(t.mean()) * 255) for t in pv[1:]]
    assert tile_values == [0, 1, 2, 10, 11, 12]
    last = NanoVLMImageProcessor(tile_size=2, max_image_size=8, max_grid=4, do_normalize=False,
                                 global_image_position="last")(Image.fromarray(arr))["pixel_values"]
    torch.testing.assert_close(last[:6], pv[1:])
    torch.testing.assert_close(last[6], pv[0])


def test_normalisation_and_single_tile():
    img = Image.new("RGB", (32, 32), (255, 0, 128))
    norm = NanoVLMImageProcessor(tile_size=32, max_image_size=64, max_grid=4)(img)["pixel_values"]
    raw = NanoVLMImageProcessor(tile_size=32, max_image_size=64, max_grid=4, do_normalize=False)(img)["pixel_values"]
    assert norm.shape == raw.shape == (1, 3, 32, 32)  # one tile: no global view
    torch.testing.assert_close(norm, (raw - 0.5) / 0.5)
    assert raw[0, 0, 0, 0].item() == pytest.approx(1.0) and raw[0, 1, 0, 0].item() == pytest.approx(0.0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "I;16", "I", "F", "1", "YCbCr", "HSV"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (8, 8), (255, 255, 255)).convert(mode) if mode not in ("I;16",) else Image.new(mode, (8, 8))
    assert to_rgb(base).mode == "RGB"


def test_transparency_and_16bit_conversion():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    rgb = to_rgb(i16)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((1, 0))[0] == round(1000 / 4000 * 255)  # rescaled, not clipped at 255


def test_load_image_errors(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    data = buf.getvalue()
    assert load_image(data).size == (16, 16)
    with pytest.raises(ValueError, match="Cannot decode image"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot decode image"):
        load_image(b"not an image")
    with pytest.raises(ValueError, match=r"zero size \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"100x100 = 10000 pixels exceeds the cap of 5000"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5000)
    with pytest.raises(ValueError, match="Image file not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="Unsupported image type int"):
        load_image(3)


def test_image_processor_config_errors():
    with pytest.raises(ValueError, match=r"max_image_size \(100\) must be a multiple of tile_size \(32\)"):
        NanoVLMImageProcessor(tile_size=32, max_image_size=100)
    with pytest.raises(ValueError, match=r"9 tiles per side exceeds max_grid \(8\)"):
        NanoVLMImageProcessor(tile_size=32, max_image_size=288, max_grid=8)
    with pytest.raises(ValueError, match="global_image_position must be 'first' or 'last'"):
        NanoVLMImageProcessor(global_image_position="middle")


# ---- processor ---------------------------------------------------------------------------------------------------


def test_token_counts_1x1_grid(tiny_processor):
    tok = tiny_processor.tokenizer
    out = tiny_processor(text="<|image|>What?", images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    ids = out["input_ids"][0]
    assert count(ids, tok, "<|image|>") == 4  # one tile x 4 tokens
    assert count(ids, tok, "<|global_image|>") == 1
    assert count(ids, tok, "<row_1_col_1>") == 0
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert "image_grids" not in out


def test_token_counts_2x3_grid(tiny_processor):
    tok = tiny_processor.tokenizer
    out = tiny_processor(text="<|image|>What?", images=[Image.new("RGB", (96, 64))], return_tensors="pt")
    ids = out["input_ids"][0]
    assert out["pixel_values"].shape == (7, 3, 32, 32)
    assert count(ids, tok, "<|image|>") == 7 * 4
    text = tok.decode(ids)
    expected = "<|global_image|>" + "<|image|>" * 4 + "".join(
        f"<row_{r}_col_{c}>" + "<|image|>" * 4 for r in (1, 2) for c in (1, 2, 3)
    )
    assert text.startswith(expected)


def test_multi_image_conversation_and_assistant_mask(tiny_processor):
    tok = tiny_processor.tokenizer
    messages = [
        {"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (32, 32))},
            {"type": "image", "image": Image.new("RGB", (64, 32))},
            {"type": "text", "text": "Which image is wider?"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "image 2"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the color?"}]},
        {"role": "assistant", "content": "black"},
    ]
    out = tiny_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert out["pixel_values"].shape == (1 + 3, 3, 32, 32)  # 1 tile + (global + 2 tiles)
    assert count(ids, tok, "<|image|>") == 4 * 4
    assert count(ids, tok, "<|global_image|>") == 2
    text = tok.decode(ids)
    assert "<image: 0><|global_image|>" in text and "<image: 1><|global_image|>" in text
    assert tok.decode(ids[mask]) == "image 2<|im_end|>black<|im_end|>"
    # a single image gets no <image: k> prefix
    single = tiny_processor(text="<|image|>x", images=Image.new("RGB", (32, 32)))
    assert "<image:" not in tok.decode(single["input_ids"][0])


def test_batch_of_texts_with_flat_images(tiny_processor):
    tok = tiny_processor.tokenizer
    out = tiny_processor(
        text=["<|image|>one", "no image", "<|image|><|image|>two"],
        images=[Image.new("RGB", (32, 32))] * 3,
        padding=True,
        return_tensors="pt",
    )
    assert [count(row, tok, "<|global_image|>") for row in out["input_ids"]] == [1, 0, 2]
    # <image: k> counts within one text, not across the batch
    assert "<image: 0>" in tok.decode(out["input_ids"][2]) and "<image:" not in tok.decode(out["input_ids"][0])


def test_processor_placeholder_errors(tiny_processor):
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"Found 1 <\|image\|> placeholders in the text but 2 images"):
        tiny_processor(text="<|image|>x", images=[img, img])
    with pytest.raises(ValueError, match=r"placeholders per text \[1, 0\], images per text \[1, 1\]"):
        tiny_processor(text=["<|image|>x", "y"], images=[[img], [img]])
    with pytest.raises(ValueError, match="Images were given without text"):
        tiny_processor(images=[img])
    too_big = NanoVLMImageProcessor(tile_size=32, max_image_size=128, max_grid=4)
    too_big.max_image_size = 256  # more tiles than the grid tokens cover
    proc = NanoVLMProcessor(too_big, tiny_processor.tokenizer, image_seq_len=4)
    with pytest.raises(ValueError, match=r"Image grid 1x8 exceeds max_grid 4"):
        proc(text="<|image|>x", images=[Image.new("RGB", (256, 32))])


def test_processor_requires_extended_tokenizer(tiny_tokenizer):
    small = train_tokenizer(["a b c"] * 5, vocab_size=300, max_grid=2)
    with pytest.raises(ValueError, match=r"lacks the special tokens \['<row_4_col_1>'\]"):
        NanoVLMProcessor(NanoVLMImageProcessor(tile_size=32, max_image_size=128, max_grid=4), small, image_seq_len=4)


# ---- tokenizers --------------------------------------------------------------------------------------------------


def test_trained_tokenizer_special_tokens_survive_reload(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.image_token == "<|image|>" and reloaded.global_image_token == "<|global_image|>"
    for t in ["<|image|>", "<|global_image|>", "<|im_start|>", "<|im_end|>"] + tile_tokens(4):
        assert len(reloaded.encode(t, add_special_tokens=False)) == 1, t
    assert reloaded.encode("<row_2_col_3>") == tiny_tokenizer.encode("<row_2_col_3>")
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == "<|endoftext|>"


def test_trained_tokenizer_spells_the_chat_roles_in_one_token_each():
    # The role names are not in the texts; the template writes them before every turn.
    texts = ["How many shapes are there?", "2", "What color is the circle?", "red"] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300, max_grid=1)
    assert tokenizer.tokenize("user") == ["user"] and tokenizer.tokenize("assistant") == ["assistant"]
    turn = [{"role": "user", "content": "What color is the circle?"}, {"role": "assistant", "content": "red"}]
    tokens = tokenizer.convert_ids_to_tokens(
        tokenizer.apply_chat_template(turn, tokenize=True, return_dict=True)["input_ids"]
    )
    # Per message: <|im_start|> role \n text <|im_end|> \n, i.e. 5 tokens around its text.
    texts_tokens = tokenizer.tokenize(turn[0]["content"]) + tokenizer.tokenize(turn[1]["content"])
    assert len(tokens) == len(texts_tokens) + 2 * 5
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"] and tokens[-6:-3] == ["<|im_start|>", "assistant", "Ċ"]


def test_extend_pretrained_tokenizer(tmp_path):
    # A plain byte-level BPE "pretrained" tokenizer without any image tokens, saved locally.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(tmp_path / "base")
    base_len = len(PreTrainedTokenizerFast.from_pretrained(tmp_path / "base"))

    tok = extend_tokenizer(str(tmp_path / "base"), max_grid=8)
    # 2 ChatML + 2 named image tokens + 64 tile tokens
    assert len(tok) == base_len + 2 + 2 + 64
    assert tok.image_token == "<|image|>" and len(tok.encode("<row_8_col_8>", add_special_tokens=False)) == 1
    tok.save_pretrained(tmp_path / "ext")
    proc = NanoVLMProcessor.from_config(tok, type("C", (), {"tile_size": 32, "image_seq_len": 4})(), max_grid=4)
    out = proc.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    ids = torch.tensor(out["input_ids"][0])
    assert tok.decode(ids[torch.tensor(out["assistant_masks"][0]).bool()]) == "hello<|im_end|>"
    # extending an object gives the same result
    assert len(extend_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp_path / "base"))) == len(tok)


def test_truncated_image_fails_even_if_a_library_allows_truncated_images(monkeypatch):
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what lmms-eval does at import
    with pytest.raises(ValueError, match="Cannot decode image"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
