"""Measure -> pack -> build: a row's measure (text through the chat template, image sizes from headers, no pixel
decoded) equals the sample built from it, for every row of the synthetic data and of a FineVision-like set with
images of many sizes, aspect ratios, modes and formats; a corrupt image found at build time drops only its sample;
and uint8 tiles normalised in the model give the float path's loss."""

from __future__ import annotations

import gc
import io
import pickle
import random
import weakref

import pytest
import torch
from conftest import TOKENIZER_CORPUS, make_tiny_config
from PIL import Image

import nanovlm.data.readers as readers_module
import nanovlm.data.samples as samples_module
from nanovlm import NanoVLMProcessor, train_tokenizer
from nanovlm.data.collator import PackedCollator
from nanovlm.data.conversations import RatingThresholds
from nanovlm.data.packing import Measured, PackedDataset
from nanovlm.data.readers import SampleDataset, SampleStream, SpilledRow
from nanovlm.data.samples import SampleBuilder
from nanovlm.data.synthetic import generate_split
from nanovlm.training.build import record_normalization

MODES = ("RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "P+transparency")
FORMATS = {"RGB": ("JPEG", "PNG", "WEBP", "BMP"), "L": ("JPEG", "PNG", "GIF"), "CMYK": ("JPEG", "TIFF"),
           "P": ("PNG", "GIF"), "RGBA": ("PNG", "WEBP"), "LA": ("PNG",), "I;16": ("PNG",), "1": ("PNG", "BMP"),
           "P+transparency": ("PNG", "GIF")}


def _encoded(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    image = Image.effect_noise((width, height), 40 + seed % 50).convert("RGB")
    if mode == "P":
        image = image.quantize(16)
    elif mode == "P+transparency":
        image = image.quantize(8)
        image.info["transparency"] = 0
    elif mode == "I;16":
        image = image.convert("I").point(lambda v: v * 200).convert("I;16")
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def finevision_like(n: int, seed: int, max_side: int) -> list[dict]:
    """n FineVision-schema rows: 0-4 images each of random size (1 px strips to `max_side`, every aspect ratio),
    mode and format; 1-3 turns with explicit placeholders in some rows; rating lists that drop some turns."""
    rng = random.Random(seed)
    words = "what color is the circle how many shapes left right red blue green describe the picture".split()
    rows = []
    for i in range(n):
        n_images = rng.choice([0, 1, 1, 1, 2, 3, 4])
        images = []
        for k in range(n_images):
            width = rng.choice([1, 2, 7, rng.randint(1, max_side), rng.randint(1, max_side), max_side])
            height = rng.choice([1, 3, rng.randint(1, max_side), rng.randint(1, max_side), max_side])
            mode = rng.choice(MODES)
            data = _encoded(width, height, mode, rng.choice(FORMATS[mode]), seed * 1000 + i * 10 + k)
            images.append({"bytes": data, "path": None} if rng.random() < 0.7 else data)
        turns = rng.randint(1, 3)
        texts = [{"user": " ".join(rng.choices(words, k=rng.randint(1, 12))) + "?",
                  "assistant": " ".join(rng.choices(words, k=rng.randint(1, 30)))} for _ in range(turns)]
        if n_images and rng.random() < 0.3:  # the placeholders place the images
            texts[0]["user"] = "<|image|>" * n_images + " " + texts[0]["user"]
        rows.append({"images": images, "texts": texts, "relevance_ratings": [rng.randint(2, 5) for _ in texts]})
    return rows


def _assert_measures_match(builder: SampleBuilder, rows) -> int:
    """Every row measures to its built sample's length, images and tiles (or both skip for the same reason)."""
    built = 0
    for i, row in enumerate(rows):
        measured, reason = builder.measure(row, index=i)
        sample, build_reason = builder.build(row, index=i)
        if measured is None:
            assert sample is None and build_reason == reason, (i, reason, build_reason)
            continue
        assert sample is not None, (i, build_reason)
        tiles = 0 if sample["pixel_values"] is None else sample["pixel_values"].shape[0]
        assert (measured.length, measured.n_images, measured.n_tiles) == (
            len(sample["input_ids"]), sample["n_images"], tiles), i
        # and building from the measure agrees with it (no "measure_mismatch")
        assert builder.build(row, index=i, measure=measured)[1] is None
        built += 1
    assert "measure_mismatch" not in builder.counter.reasons
    return built


def test_measure_equals_build_on_the_synthetic_data(tiny_processor):
    rows = generate_split(120, "train", seed=3).with_format("arrow")[:].to_pylist()
    builder = SampleBuilder(tiny_processor, thresholds=RatingThresholds.uniform(3), max_sample_length=400)
    assert _assert_measures_match(builder, rows) >= 100
    assert sum(len(r["images"]) > 1 for r in rows) > 0  # multi-image rows are covered


def test_measure_equals_build_on_finevision_like_rows_of_many_sizes_and_modes(tiny_processor):
    builder = SampleBuilder(tiny_processor, thresholds=RatingThresholds(relevance=3), max_sample_length=150,
                            max_images_per_example=3)
    rows = finevision_like(150, seed=1, max_side=300)
    built = _assert_measures_match(builder, rows)
    assert built >= 40
    # every skip rule that needs no pixels is met and decided by the measure alone
    assert {"too_many_images", "too_long", "no_turns_after_rating_filter"} <= set(builder.counter.reasons)


def test_measure_equals_build_at_the_460m_image_settings():
    tokenizer = train_tokenizer(TOKENIZER_CORPUS, vocab_size=400, max_grid=8)
    config = make_tiny_config(tokenizer, tile=512, patch=16, shuffle=4)  # 64 tokens per 512 px tile
    processor = NanoVLMProcessor.from_config(tokenizer, config, max_image_size=2048, max_grid=8)
    builder = SampleBuilder(processor, max_sample_length=4096, max_images_per_example=4)
    rows = finevision_like(12, seed=2, max_side=2600)
    assert _assert_measures_match(builder, rows) >= 6


def test_measure_decodes_no_pixels(tiny_processor, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("measure decoded an image")

    monkeypatch.setattr(samples_module, "load_image", no_decode)
    builder = SampleBuilder(tiny_processor)
    measured, reason = builder.measure(finevision_like(1, seed=5, max_side=90)[0] | {"relevance_ratings": None})
    assert reason is None and isinstance(measured, Measured)


def _truncated_jpeg() -> bytes:
    data = _encoded(64, 48, "RGB", "JPEG", 0)
    return data[: len(data) // 2]  # header intact, pixels cut off


@pytest.mark.parametrize("source_cls", [SampleDataset, SampleStream])
def test_a_corrupt_image_found_at_build_time_drops_only_its_sample(tiny_processor, source_cls):
    good = _encoded(40, 30, "RGB", "PNG", 1)
    rows = [{"images": [_truncated_jpeg() if i == 2 else good], "texts": [{"user": f"q{i}?", "assistant": f"a{i}"}]}
            for i in range(6)]
    builder = SampleBuilder(tiny_processor)
    assert builder.measure(rows[2])[1] is None  # the header is fine: only decoding finds it
    packed = PackedDataset(source_cls(rows, builder), seq_length=4096, buffer_size=16)
    packs = list(packed)
    assert len(packs) == 1 and len(packs[0]["samples"]) == 5
    assert packs[0]["skipped"]["counts"] == {"bad_image": 1}
    assert builder.counter.built == 5


def test_a_pack_left_empty_at_build_time_is_not_yielded_and_resume_stays_exact(tiny_processor):
    bad = _truncated_jpeg()
    # the first round (5 positions) holds only rows whose image fails to decode: all its packs end up empty
    rows = [{"images": [bad], "texts": [{"user": f"q{i}?", "assistant": f"a{i}"}]} for i in range(5)]
    rows += [{"images": None, "texts": [{"user": f"q{i}?", "assistant": f"b{i}" * 8}]} for i in range(6)]
    builder = SampleBuilder(tiny_processor)
    packed = PackedDataset(SampleDataset(rows, builder), seq_length=90, buffer_size=5)
    packs = list(packed)
    assert all(p["samples"] for p in packs)
    answers = [tiny_processor.tokenizer.decode(s["input_ids"]) for p in packs for s in p["samples"]]
    assert len(answers) == 6 and builder.counter.reasons == {"bad_image": 5}
    for k in range(len(packs)):  # resume after every pack gives the rest exactly
        again = PackedDataset(SampleDataset(rows, SampleBuilder(tiny_processor)), seq_length=90, buffer_size=5)
        again.load_state_dict(packs[k]["state"])
        rest = [tiny_processor.tokenizer.decode(s["input_ids"]) for p in again for s in p["samples"]]
        assert rest == answers[sum(len(p["samples"]) for p in packs[: k + 1]):]


# ---- a stream's buffered rows live in a spill file, not in memory ------------------------------------------------


def _image_rows(n: int) -> list[dict]:
    return [{"images": [_encoded(30 + i, 20 + 2 * i, "RGB", "PNG", i)],
             "texts": [{"user": f"question {i}?", "assistant": f"answer {i} " * (1 + i % 4)}]} for i in range(n)]


def test_a_stream_measure_holds_where_its_row_was_spilled_not_the_row(tiny_processor):
    rows = _image_rows(5)
    stream = SampleStream(rows, SampleBuilder(tiny_processor))
    items = list(stream.measure_from(0, 1))
    assert all(isinstance(item.key, SpilledRow) for item in items)
    assert [item.key.position for item in items] == [0, 1, 2, 3, 4]
    assert stream.spilled_bytes >= sum(len(r["images"][0]) for r in rows)  # the image bytes are in the file
    reference = SampleBuilder(tiny_processor)
    for item, row in zip(items, rows):
        built, want = stream.build_measured(item), reference.build(row)[0]
        assert torch.equal(built["input_ids"], want["input_ids"]) and torch.equal(built["labels"], want["labels"])
        assert torch.equal(built["pixel_values"], want["pixel_values"])
    # a new round starts a new file; the old one goes with the last key that points into it
    old = weakref.ref(items[0].key.spill)
    stream.new_round()
    assert stream.spilled_bytes == 0
    del items, item  # the loop's last item too
    gc.collect()
    assert old() is None
    # the stream pickles (into DataLoader workers) without its open file
    next(stream.measure_from(0, 1))
    assert stream.spilled_bytes > 0 and pickle.loads(pickle.dumps(stream)).spilled_bytes == 0


def test_packing_a_stream_over_several_rounds_uses_one_spill_per_round_and_packs_as_a_map_source(
    tiny_processor, monkeypatch
):
    spills = []

    class RecordedSpill(readers_module.RowSpill):
        def __init__(self, directory=None):
            super().__init__(directory)
            spills.append(weakref.ref(self))

    monkeypatch.setattr(readers_module, "RowSpill", RecordedSpill)
    rows = _image_rows(11)

    def answers(source) -> list[list[str]]:
        packed = PackedDataset(source, seq_length=200, buffer_size=4)
        return [[tiny_processor.tokenizer.decode(s["input_ids"]) for s in p["samples"]] for p in packed]

    from_stream = answers(SampleStream(rows, SampleBuilder(tiny_processor)))
    assert from_stream == answers(SampleDataset(rows, SampleBuilder(tiny_processor)))
    assert sum(len(p) for p in from_stream) == 11
    assert len(spills) == 3  # rounds of 4, 4 and 3 rows
    gc.collect()
    assert all(ref() is None for ref in spills[:-1])  # earlier rounds' files are gone


def test_a_row_that_cannot_be_pickled_stays_in_memory(tiny_processor, caplog):
    rows = [{**row, "extra": lambda: None} for row in _image_rows(2)]
    stream = SampleStream(rows, SampleBuilder(tiny_processor))
    items = list(stream.measure_from(0, 1))
    assert [item.key[0] for item in items] == [0, 1] and items[1].key[1] is rows[1]
    assert stream.build_measured(items[1]) is not None
    assert sum("cannot be pickled" in r.getMessage() for r in caplog.records) == 1


def test_spill_errors_name_the_folder_and_the_fix(tiny_processor, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="spill_dir=.*is not a folder: give an existing folder, or None for"):
        SampleStream([], SampleBuilder(tiny_processor), spill_dir=str(tmp_path / "missing"))

    def disk_full(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(readers_module.RowSpill, "put", disk_full)
    stream = SampleStream(_image_rows(1), SampleBuilder(tiny_processor), spill_dir=str(tmp_path))
    with pytest.raises(OSError, match=f"spill file in {tmp_path} .*No space left.*set TMPDIR"):
        next(stream.measure_from(0, 1))


# ---- uint8 tiles, normalised on the device ------------------------------------------------------------------------


def test_uint8_tiles_normalised_in_the_model_give_the_float_path_loss(tiny_processor, tiny_model):
    record_normalization(tiny_model.config, tiny_processor)
    rows = generate_split(8, "train", seed=4).with_format("arrow")[:].to_pylist()
    batches = {}
    for uint8 in (True, False):
        builder = SampleBuilder(tiny_processor, uint8_tiles=uint8)
        packs = list(PackedDataset(SampleDataset(rows, builder), seq_length=512, buffer_size=8))
        batches[uint8] = PackedCollator(tiny_processor.tokenizer.pad_token_id)(packs[:2])
    assert batches[True]["pixel_values"].dtype == torch.uint8
    assert batches[False]["pixel_values"].dtype == torch.float32
    assert torch.equal(tiny_processor.image_processor.normalize_tiles(batches[True]["pixel_values"]),
                       batches[False]["pixel_values"])
    losses = {}
    for uint8, batch in batches.items():
        inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "pixel_values")}
        losses[uint8] = tiny_model(**inputs).loss
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-6, atol=1e-6)


def test_config_records_the_processors_normalisation(tiny_tokenizer, tiny_config):
    processor = NanoVLMProcessor.from_config(tiny_tokenizer, tiny_config, max_grid=4, do_normalize=False)
    config = make_tiny_config(tiny_tokenizer)
    assert (config.image_mean, config.image_std) == ([0.5] * 3, [0.5] * 3)
    record_normalization(config, processor)
    assert (config.image_mean, config.image_std) == ([0.0] * 3, [1.0] * 3)
    tiles = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(processor.image_processor.normalize_tiles(tiles), tiles.float() / 255)


def _inference_path(processor, builder, row):
    """The sample as the processor's public chat API makes it: images attached to the message blocks, taken back out
    and regrouped by transformers' apply_chat_template (what inference does)."""
    from nanovlm.data.conversations import as_image_list, attach_images, filter_turns, turns_to_messages
    from nanovlm.image_processing_nanovlm import load_image

    images = as_image_list(row.get("images"))
    turns, _ = filter_turns(row, builder.thresholds)
    messages = turns_to_messages(turns, len(images), processor.image_token, builder.reserved_tokens)
    if images:
        messages = attach_images(messages, [load_image(im) for im in images])
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


@pytest.mark.parametrize("data", ["synthetic", "finevision_like"])
def test_built_sample_equals_the_processors_chat_template_output(tiny_processor, data):
    """The builder keeps the row's image list from row to sample (no regrouping by placeholders) and still makes
    exactly what `processor.apply_chat_template(tokenize=True)` makes: ids, answer mask, pixels."""
    if data == "synthetic":
        rows = generate_split(40, "train", seed=4).with_format("arrow")[:].to_pylist()
    else:
        rows = finevision_like(60, seed=7, max_side=200)
    builder = SampleBuilder(tiny_processor, uint8_tiles=False)
    compared = 0
    for i, row in enumerate(rows):
        sample, _ = builder.build(row, index=i)
        if sample is None:
            continue
        want = _inference_path(tiny_processor, builder, row)
        assert sample["input_ids"].tolist() == list(want["input_ids"][0]), i
        assert (sample["labels"] != samples_module.IGNORE_INDEX).tolist() == [bool(m) for m in want["assistant_masks"][0]]
        if sample["pixel_values"] is None:
            assert "pixel_values" not in want or want["pixel_values"] is None
        else:
            assert torch.equal(sample["pixel_values"], torch.as_tensor(want["pixel_values"]).float()), i
        compared += 1
    assert compared >= 25
