"""Tests for nanovlm.data.conversations and nanovlm.data.samples: rating filters, messages, labels, skips, adapters."""

from __future__ import annotations

import io
import logging
import pickle

import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from nanovlm.data.conversations import RatingThresholds, attach_images, filter_turns, row_to_messages
from nanovlm.data.packing import PackedDataset
from nanovlm.data.readers import SampleDataset, SampleStream
from nanovlm.data.samples import IGNORE_INDEX, SKIP_REASONS, SampleBuilder, SkipCounter

RED, BLUE = (220, 40, 40), (40, 80, 225)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _row(*turns: tuple[str, str], images=None, **extra) -> dict:
    return {"images": images, "texts": [{"user": u, "assistant": a} for u, a in turns], **extra}


def _text(processor, sample: dict) -> str:
    return processor.tokenizer.decode(sample["input_ids"], skip_special_tokens=False)


@pytest.fixture
def builder(tiny_processor) -> SampleBuilder:
    return SampleBuilder(tiny_processor, max_sample_length=2048, max_images_per_example=4)


# ---- rating filter -----------------------------------------------------------------------------------------------


def test_rating_filter_drops_turns_under_any_threshold(tiny_processor):
    builder = SampleBuilder(tiny_processor, thresholds=RatingThresholds(relevance=3, formatting=2))
    row = _row(
        ("What color is the circle?", "red"),
        ("How many shapes are there?", "three"),
        ("Is the square on the left?", "left"),
        images=[Image.new("RGB", (32, 32), RED)],
        relevance_ratings=[5, 2, 4],  # turn 1 under relevance
        formatting_ratings=[5, 5, 1],  # turn 2 under formatting
        question_type=["color", "count", "position"],  # extra columns are ignored
    )
    sample, reason = builder.build(row)
    assert reason is None
    text = _text(tiny_processor, sample)
    assert "What color is the circle?" in text and "How many" not in text and "left" not in text
    assert builder.counter.turns_dropped == 2 and builder.counter.built == 1 and builder.counter.as_dict() == {}
    # the turn keeps the images even though the later turns were dropped
    assert text.count("<|global_image|>") == 1


def test_all_turns_filtered_is_a_counted_skip():
    row = _row(("a?", "b"), ("c?", "d"), visual_dependency_ratings=[1, 2])
    assert row_to_messages(row, RatingThresholds(visual_dependency=3)) == (None, "no_turns_after_rating_filter")
    # each turn fails a different rating: "under ANY threshold" drops both
    crossed = _row(("a?", "b"), ("c?", "d"), relevance_ratings=[5, 1], formatting_ratings=[1, 5])
    assert row_to_messages(crossed, RatingThresholds.uniform(2)) == (None, "no_turns_after_rating_filter")
    kept, dropped = filter_turns(row, RatingThresholds(visual_dependency=2))
    assert kept == [("c?", "d")] and dropped == 1


def test_missing_or_none_rating_column_filters_nothing():
    thresholds = RatingThresholds.uniform(5)
    assert filter_turns(_row(("a?", "b")), thresholds) == ([("a?", "b")], 0)
    assert filter_turns(_row(("a?", "b"), relevance_ratings=None), thresholds) == ([("a?", "b")], 0)


def test_rating_thresholds_validate():
    with pytest.raises(ValueError, match=r"RatingThresholds.relevance must be an int in 1..5.*got 6"):
        RatingThresholds(relevance=6)
    with pytest.raises(ValueError, match=r"formatting must be an int .* got '3'"):
        RatingThresholds(formatting="3")


def test_rating_filter_counted_by_builder(tiny_processor):
    builder = SampleBuilder(tiny_processor, thresholds=RatingThresholds(relevance=4))
    assert builder.build(_row(("a?", "b"), relevance_ratings=[3]), index=5) == (None, "no_turns_after_rating_filter")
    assert builder.counter.as_dict() == {"no_turns_after_rating_filter": 1}
    assert builder.counter.totals() == {"seen": 1, "built": 0, "skipped": 1, "turns_dropped": 0}


# ---- labels, images, placement -----------------------------------------------------------------------------------


def test_labels_are_the_assistant_replies_with_im_end(builder, tiny_processor):
    answers = ["red", "two shapes", "the blue one is on the left"]
    row = _row(
        ("What color is the circle?", answers[0]),
        ("How many shapes are there?", answers[1]),
        ("Which image has a blue triangle?", answers[2]),
        images=[Image.new("RGB", (70, 40), RED), _png(Image.new("RGB", (20, 20), BLUE))],
    )
    sample, reason = builder.build(row)
    assert reason is None
    assert set(sample) == {"input_ids", "labels", "pixel_values", "n_images"}
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and ids.dim() == 1
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], ids[labelled])
    decoded = tiny_processor.tokenizer.decode(ids[labelled], skip_special_tokens=False)
    assert decoded == "".join(a + "<|im_end|>" for a in answers)
    # images: 70x40 -> 2x3 tiles + global view (7 tiles), 20x20 -> 1 tile; 4 image tokens per tile
    assert sample["n_images"] == 2
    # tiles stay uint8 until the model normalises them (SampleBuilder's uint8_tiles)
    assert sample["pixel_values"].shape == (8, 3, 32, 32) and sample["pixel_values"].dtype == torch.uint8
    image_id = tiny_processor.image_token_id
    assert int((ids == image_id).sum()) == 8 * tiny_processor.image_seq_len
    assert not labels[ids == image_id].ne(IGNORE_INDEX).any()


def test_sample_matches_the_processors_own_tensor_output(builder, tiny_processor):
    # The builder asks apply_chat_template for lists (much faster, see SampleBuilder._build); what it returns must
    # be exactly what the tensor path gives: ids, assistant mask and pixels, also across image-token expansion.
    images = [Image.new("RGB", (70, 40), RED), Image.new("RGB", (20, 20), BLUE)]
    row = _row(("What color is the circle?", "red"), ("And now?", "two shapes"), images=images)
    sample, _ = builder.build(row)
    messages, _ = row_to_messages(row, image_token=builder.image_token, reserved_tokens=builder.reserved_tokens)
    messages = attach_images(messages, images)
    reference = tiny_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    assert torch.equal(sample["input_ids"], reference["input_ids"][0])
    mask = torch.as_tensor(reference["assistant_masks"])[0].bool()
    assert torch.equal(sample["labels"] != IGNORE_INDEX, mask)
    pixels = tiny_processor.image_processor.normalize_tiles(sample["pixel_values"])  # what the model does to uint8
    assert torch.equal(pixels, reference["pixel_values"].float())


def test_text_only_sample_has_no_pixel_values(builder):
    for images in (None, []):
        sample, reason = builder.build(_row(("Describe the picture.", "A cat."), images=images))
        assert reason is None and sample["pixel_values"] is None and sample["n_images"] == 0


def _global_positions(processor, sample) -> list[int]:
    global_id = processor.tokenizer.convert_tokens_to_ids(processor.global_image_token)
    return (sample["input_ids"] == global_id).nonzero().flatten().tolist()


def _first_index(processor, sample, token: str) -> int:
    ids = sample["input_ids"].tolist()
    return ids.index(processor.tokenizer.convert_tokens_to_ids(token))


def test_images_go_into_the_first_user_turn_before_its_text(builder, tiny_processor):
    images = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    sample, _ = builder.build(_row(("What color?", "red"), ("And the other?", "blue"), images=images))
    positions = _global_positions(tiny_processor, sample)
    first_end = _first_index(tiny_processor, sample, "<|im_end|>")
    assert len(positions) == 2 and max(positions) < first_end
    text = _text(tiny_processor, sample)
    assert text.index("<|global_image|>") < text.index("What color?")
    assert text.rindex("<|image|>") < text.index("What color?")


def test_explicit_placeholders_place_the_images(builder, tiny_processor):
    images = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    row = _row(("Compare <|image|> with <|image|> please.", "red, blue"), images=images)
    messages, _ = row_to_messages(row)
    assert [b["type"] for b in messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    sample, _ = builder.build(row)
    text = _text(tiny_processor, sample)
    first, second = text.index("<image: 0><|global_image|>"), text.index("<image: 1><|global_image|>")
    assert text.index("Compare ") < first < text.index(" with ") < second < text.index(" please.")
    assert len(_global_positions(tiny_processor, sample)) == 2


def test_explicit_placeholder_in_a_later_turn(builder, tiny_processor):
    row = _row(("Hello.", "Hi."), ("What color is <|image|>?", "red"), images=[Image.new("RGB", (32, 32), RED)])
    sample, _ = builder.build(row)
    [position] = _global_positions(tiny_processor, sample)
    assert position > _first_index(tiny_processor, sample, "<|im_end|>")  # after the first turn
    text = _text(tiny_processor, sample)
    assert (
        text.index("What color is ")
        < text.index("<|global_image|>")
        < text.index("?<|im_end|>\n<|im_start|>assistant\nred")
    )


@pytest.mark.parametrize("n_images", [0, 2])
def test_placeholder_count_mismatch_is_skipped(builder, n_images):
    row = _row(("What is in <|image|>?", "a cat"), images=[Image.new("RGB", (8, 8))] * n_images)
    assert builder.build(row) == (None, "image_placeholder_mismatch")


# ---- bad inputs ------------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = _png(Image.effect_noise((64, 64), 50).convert("RGB"))
    return data[: len(data) // 2]


GOOD_TURN = ("What color?", "red")

BAD_ROWS = {
    "truncated_png": (_row(GOOD_TURN, images=[_truncated_png()]), "bad_image"),
    "garbage_bytes": (_row(GOOD_TURN, images=[b"not an image"]), "bad_image"),
    "empty_bytes_dict": (_row(GOOD_TURN, images=[{"bytes": b"", "path": None}]), "bad_image"),
    "missing_file": (_row(GOOD_TURN, images=[{"bytes": None, "path": "/nonexistent/x.png"}]), "bad_image"),
    "zero_size": (_row(GOOD_TURN, images=[Image.new("RGB", (0, 0))]), "bad_image"),
    "none_image": (_row(GOOD_TURN, images=[Image.new("RGB", (8, 8)), None]), "bad_image"),
    "int_image": (_row(GOOD_TURN, images=[7]), "bad_image"),
    "bomb": (_row(GOOD_TURN, images=[_png(Image.new("1", (8000, 8000)))]), "image_too_large"),  # 64M px > 50M
    "texts_missing": ({"images": None}, "no_texts"),
    "texts_none": ({"images": None, "texts": None}, "no_texts"),
    "texts_empty": ({"images": None, "texts": []}, "no_texts"),
    "texts_string": ({"images": None, "texts": "What color? red"}, "bad_texts"),
    "turn_string": ({"texts": ["What color? red"]}, "bad_turn"),
    "turn_none": ({"texts": [None]}, "bad_turn"),
    "user_int": ({"texts": [{"user": 5, "assistant": "red"}]}, "bad_turn"),
    "user_empty": ({"texts": [{"user": "  ", "assistant": "red"}]}, "bad_turn"),
    "assistant_missing": ({"texts": [{"user": "What color?"}]}, "bad_turn"),
    "assistant_none": ({"texts": [{"user": "What color?", "assistant": None}]}, "bad_turn"),
    "ratings_length": (_row(GOOD_TURN, ("q?", "a"), relevance_ratings=[5]), "bad_ratings"),
    "ratings_string": (_row(GOOD_TURN, formatting_ratings="5"), "bad_ratings"),
    "ratings_none_entry": (_row(GOOD_TURN, formatting_ratings=[None]), "bad_ratings"),
    "rating_above_scale": (_row(GOOD_TURN, relevance_ratings=[7]), "bad_ratings"),  # would pass every filter
    "rating_below_scale": (_row(GOOD_TURN, image_correspondence_ratings=[0]), "bad_ratings"),
    "row_none": (None, "bad_row"),
    "row_string": ("What color? red", "bad_row"),
    "im_end_in_answer": (_row(("What color?", "red<|im_end|>")), "special_token_in_text"),
    "tile_token_in_question": (_row(("What is <row_1_col_1>?", "red")), "special_token_in_text"),
    "placeholder_in_answer": (_row(("What color?", "<|image|>")), "special_token_in_text"),
    "too_many_images": (_row(GOOD_TURN, images=[Image.new("RGB", (8, 8))] * 5), "too_many_images"),
    "too_long": (_row(("What color? " * 600, "red")), "too_long"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_input_is_a_counted_skip(builder, name):
    row, reason = BAD_ROWS[name]
    assert reason in SKIP_REASONS
    assert builder.build(row, index=3) == (None, reason)
    assert builder.counter.as_dict() == {reason: 1} and builder.counter.built == 0


def test_image_cap_is_configurable(tiny_processor):
    builder = SampleBuilder(tiny_processor, max_image_pixels=100)
    assert builder.build(_row(GOOD_TURN, images=[Image.new("RGB", (11, 10))])) == (None, "image_too_large")
    assert builder.build(_row(GOOD_TURN, images=[Image.new("RGB", (10, 10))]))[1] is None


def test_all_bad_rows_in_one_builder_are_counted_and_logged_once_per_reason(builder, caplog):
    caplog.set_level(logging.INFO, logger="nanovlm.data.samples")
    for _ in range(2):
        for row, _reason in BAD_ROWS.values():
            builder.build(row)
    expected = {}
    for _, reason in BAD_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 2
    assert builder.counter.as_dict() == expected
    assert builder.counter.skipped == 2 * len(BAD_ROWS)
    first_logs = [r for r in caplog.records if "first '" in r.getMessage()]
    assert len(first_logs) == len(expected)
    builder.counter.log_summary()
    assert (
        f"{2 * len(BAD_ROWS)} rows: 0 built, {2 * len(BAD_ROWS)} skipped (bad_image 14"
        in caplog.records[-1].getMessage()
    )


class _ExplodingRow(dict):
    def get(self, key, default=None):
        raise RuntimeError("boom")


def test_unexpected_error_is_counted_and_logged_once(builder, caplog):
    caplog.set_level(logging.INFO, logger="nanovlm.data.samples")
    assert builder.build(_ExplodingRow(), index=7) == (None, "error:RuntimeError")
    assert builder.build(_ExplodingRow(), index=8) == (None, "error:RuntimeError")
    assert builder.counter.as_dict() == {"error:RuntimeError": 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "row 7" in warnings[0].getMessage() and "boom" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None


# ---- unusual image modes are converted, not skipped ----------------------------------------------------------------


def _p_transparent() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([220, 40, 40, 0, 0, 0])
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 1
    return _png(image)


def _la() -> Image.Image:
    image = Image.new("LA", (32, 32), (0, 255))
    image.putpixel((0, 0), (0, 0))
    return image


def _i16() -> bytes:
    image = Image.new("I;16", (32, 32), 0)
    image.putpixel((0, 0), 65535)
    return _png(image)


def _one_bit() -> Image.Image:
    image = Image.new("1", (32, 32), 0)
    image.putpixel((0, 0), 1)
    return image


@pytest.mark.parametrize(
    "make, corner, rest",
    [
        (_p_transparent, (255, 255, 255), RED),  # transparent palette entry -> white
        (_la, (255, 255, 255), (0, 0, 0)),  # alpha 0 -> white
        (_i16, (255, 255, 255), (0, 0, 0)),  # 16-bit range rescaled, not clipped
        (_one_bit, (255, 255, 255), (0, 0, 0)),
        (lambda: _png(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG"), (255, 255, 255), (255, 255, 255)),
    ],
    ids=["P_transparency", "LA", "I;16", "1", "CMYK_jpeg"],
)
def test_unusual_modes_are_converted_to_sane_rgb(builder, tiny_processor, make, corner, rest):
    sample, reason = builder.build(_row(GOOD_TURN, images=[make()]))
    assert reason is None and sample["pixel_values"].shape == (1, 3, 32, 32)  # one 32x32 tile: no resampling
    rgb = sample["pixel_values"][0].float()  # (3, 32, 32) uint8 tiles: the RGB values themselves
    assert torch.allclose(rgb[:, 0, 0], torch.tensor(corner, dtype=torch.float), atol=3)
    assert torch.allclose(rgb[:, 16, 16], torch.tensor(rest, dtype=torch.float), atol=3)


# ---- pickling, counters, adapters ---------------------------------------------------------------------------------


def test_builder_pickles_and_builds_the_same_sample(builder):
    row = _row(("What color?", "red"), images=[_png(Image.new("RGB", (50, 30), RED))])
    builder.build(None)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone.counter.as_dict() == {"bad_row": 1}
    a, b = builder.build(row)[0], clone.build(row)[0]
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "pixel_values")) and a["n_images"] == 1


def test_skip_counter_update_and_reset():
    a, b = SkipCounter(), SkipCounter()
    a.add("bad_image"), b.add("bad_image", 2), b.add("too_long")
    a.built, b.built, b.turns_dropped = 3, 1, 4
    a.update(b)
    assert a.as_dict() == {"bad_image": 3, "too_long": 1}
    assert a.totals() == {"seen": 8, "built": 4, "skipped": 4, "turns_dropped": 4}
    assert a.summary() == "8 rows: 4 built, 4 skipped (bad_image 3, too_long 1); 4 turns dropped by the rating filter"
    a.reset()
    assert a.totals() == {"seen": 0, "built": 0, "skipped": 0, "turns_dropped": 0}


def test_builder_rejects_bad_settings(tiny_processor):
    with pytest.raises(ValueError, match=r"max_sample_length must be a positive int or None .*got 0"):
        SampleBuilder(tiny_processor, max_sample_length=0)
    with pytest.raises(TypeError, match=r"processor must be a NanoVLMProcessor.*got str"):
        SampleBuilder("processor")


FEATURES = Features(
    {
        "images": List(ImageFeature()),
        "texts": List({"user": Value("string"), "assistant": Value("string")}),
        "relevance_ratings": List(Value("int64")),
    }
)


def _rows(n: int) -> dict:
    """Row i answers f"answer {i}"; row 2 has a corrupt image, row 4 is under relevance 3."""
    images = [[{"bytes": _png(Image.new("RGB", (16 + i, 16), RED)), "path": None}] for i in range(n)]
    images[2] = [{"bytes": b"corrupt", "path": None}]
    return {
        "images": images,
        "texts": [[{"user": "What color?", "assistant": f"answer {i}"}] for i in range(n)],
        "relevance_ratings": [[2 if i == 4 else 5] for i in range(n)],
    }


def _answer(processor, sample) -> str:
    labelled = sample["labels"] != IGNORE_INDEX
    return processor.tokenizer.decode(sample["input_ids"][labelled], skip_special_tokens=False)


def test_sample_dataset_reads_images_undecoded_and_reshuffles_per_epoch(tiny_processor):
    rows = Dataset.from_dict(_rows(8), features=FEATURES)
    data = SampleDataset(rows, SampleBuilder(tiny_processor, thresholds=RatingThresholds(relevance=3)), seed=1)
    assert len(data) == 8
    epoch0 = [data.row_index(i) for i in range(8)]
    assert sorted(epoch0) == list(range(8)) and epoch0 != list(range(8))
    samples = [data[i] for i in range(8)]
    skipped = {epoch0[i] for i, s in enumerate(samples) if s is None}
    assert skipped == {2, 4}
    assert data.counter.as_dict() == {"bad_image": 1, "no_turns_after_rating_filter": 1}
    assert [_answer(tiny_processor, s) for s in samples if s is not None] == [
        f"answer {j}<|im_end|>" for j in epoch0 if j not in (2, 4)
    ]
    data.set_epoch(1)
    epoch1 = [data.row_index(i) for i in range(8)]
    assert sorted(epoch1) == list(range(8)) and epoch1 != epoch0
    data.set_epoch(0)
    assert [data.row_index(i) for i in range(8)] == epoch0
    assert [pickle.loads(pickle.dumps(data)).row_index(i) for i in range(8)] == epoch0
    with pytest.raises(IndexError, match="index 8 is out of range for 8 rows"):
        data[8]


def test_sample_dataset_without_seed_keeps_order_on_plain_lists(builder, tiny_processor):
    rows = [_row(("What color?", f"answer {i}")) for i in range(3)] + ["not a row"]
    data = SampleDataset(rows, builder)
    data.set_epoch(3)
    out = [data[i] for i in range(4)]
    assert [_answer(tiny_processor, s) for s in out[:3]] == [f"answer {i}<|im_end|>" for i in range(3)]
    assert out[3] is None and data.counter.as_dict() == {"bad_row": 1}


class _FlakyRows(list):
    def __getitem__(self, i):
        if i == 1:
            raise OSError("shard unreadable")
        return super().__getitem__(i)


def test_sample_dataset_counts_unreadable_rows(builder, caplog):
    data = SampleDataset(_FlakyRows([_row(GOOD_TURN)] * 3), builder)
    assert [data[i] is None for i in range(3)] == [False, True, False]
    assert data.counter.as_dict() == {"error:OSError": 1} and data.counter.built == 2
    assert any("row 1" in r.getMessage() and "shard unreadable" in r.getMessage() for r in caplog.records)


def test_sample_stream_iter_from_reads_strided_positions(builder, tiny_processor):
    rows = Dataset.from_dict(_rows(6), features=FEATURES).to_iterable_dataset(num_shards=2)
    stream = SampleStream(rows, builder)
    # stride 2 with 2 shards: reader 1 reads shard 1 (rows 3-5), whole shards per reader
    out = list(stream.iter_from(1, 2))
    assert [_answer(tiny_processor, s) for s in out] == [f"answer {i}<|im_end|>" for i in (3, 4, 5)]
    # stride 3 with 2 shards: reader 2 reads the whole stream and keeps rows 2 and 5
    assert [s is None for s in stream.iter_from(2, 3)] == [True, False] and builder.counter.as_dict() == {
        "bad_image": 1
    }
    with pytest.raises(ValueError, match="need start >= 0 and stride >= 1, got start=0, stride=0"):
        next(stream.iter_from(0, 0))


def test_sample_stream_in_dataloader_workers_reads_every_row_once(tiny_processor):
    rows = Dataset.from_dict(_rows(10), features=FEATURES).to_iterable_dataset(num_shards=4)
    stream = SampleStream(rows, SampleBuilder(tiny_processor, thresholds=RatingThresholds(relevance=3)))
    packed = PackedDataset(stream, seq_length=512, buffer_size=4)
    loader = DataLoader(packed, batch_size=None, num_workers=2, collate_fn=lambda pack: pack)
    answers = [_answer(tiny_processor, s) for pack in loader for s in pack["samples"]]
    assert sorted(answers) == sorted(f"answer {i}<|im_end|>" for i in range(10) if i not in (2, 4))


def test_sample_dataset_curriculum_prefix(builder):
    rows = [_row(("What color?", f"answer {i}")) for i in range(9)]
    data = SampleDataset(rows, builder, seed=4, first=3)
    epoch0 = [data.row_index(i) for i in range(9)]
    assert sorted(epoch0[:3]) == [0, 1, 2] and sorted(epoch0[3:]) == list(range(3, 9))
    assert epoch0[3:] != list(range(3, 9))  # each group is shuffled
    data.set_epoch(1)
    assert sorted(data.row_index(i) for i in range(9)) == list(range(9))
    assert SampleDataset(rows, builder, seed=4).row_index(0) is not None  # first=0 is a plain shuffle
    with pytest.raises(ValueError, match=r"first must be an int in \[0, 9\] \(the number of rows\), got 10"):
        SampleDataset(rows, builder, seed=4, first=10)
    with pytest.raises(ValueError, match=r"first \(a curriculum prefix\) needs a seed"):
        SampleDataset(rows, builder, first=2)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb), built from a 1x1 PNG without
    allocating the pixels: only the IHDR size fields and their CRC are rewritten."""
    import struct
    import zlib

    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    body = bytes(data[ihdr : ihdr + 4 + 13])
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


def test_max_image_pixels_is_the_one_limit_not_pillows(tiny_processor, monkeypatch):
    bomb = _png_header_claiming(30000, 30000)  # 900M pixels: over Pillow's own 2 x 178.9M error threshold
    builder = SampleBuilder(tiny_processor)  # default cap 50M
    assert builder.build(_row(GOOD_TURN, images=[bomb])) == (None, "image_too_large")
    assert builder.build(_row(GOOD_TURN, images=[{"bytes": bomb, "path": None}])) == (None, "image_too_large")
    # With Pillow's limit below the image and ours above it, ours decides: the image is built, not a bad_image,
    # and Pillow's global setting is what it was afterwards.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    sample, reason = SampleBuilder(tiny_processor, max_image_pixels=10_000).build(
        _row(GOOD_TURN, images=[_png(Image.new("RGB", (60, 60), RED))])
    )
    assert reason is None and sample["n_images"] == 1
    assert Image.MAX_IMAGE_PIXELS == 100
    assert SampleBuilder(tiny_processor, max_image_pixels=1000).build(
        _row(GOOD_TURN, images=[_png(Image.new("RGB", (60, 60), RED))])
    ) == (None, "image_too_large")
