"""Bad rows through the data pipeline the entry point builds: each is a counted skip with its reason, odd but valid
images train, and over one epoch every row is either in a pack once or counted once (read = used + skipped).

The dataset is a `save_to_disk` folder of good synthetic rows plus one row per bad case; the pipeline is
`train_accelerate.py`'s own (parse_args -> load_rows -> build_model_and_processor -> build_datasets).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = 24
RATINGS = ("relevance_ratings", "image_correspondence_ratings", "visual_dependency_ratings", "formatting_ratings")


def _features() -> datasets.Features:
    return datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        **{c: datasets.List(datasets.Value("int64")) for c in RATINGS},
    })


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _row(images: list[bytes], user: str = "What is the color of the shape?", assistant: str = "red",
         turns: int = 1, **ratings) -> dict:
    texts = [{"user": user, "assistant": assistant}] * turns
    return {"images": [{"bytes": b, "path": None} for b in images], "texts": texts,
            **{c: ratings.get(c, [5] * turns) for c in RATINGS}}


def bad_and_odd_rows() -> tuple[dict[str, tuple[dict, str | None]], int]:
    """{name: (row, skip reason or None for a row that must train)}; the odd images are valid and must be used."""
    ok = _png(Image.new("RGB", (64, 64), (200, 10, 10)))
    sixteen_bit = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    rows = {
        "corrupt_bytes": (_row([b"\x89PNG\r\n\x1a\nnot a png"]), "bad_image"),
        "truncated_png": (_row([ok[: len(ok) // 2]]), "bad_image"),
        "zero_bytes": (_row([b""]), "bad_image"),
        "no_texts": ({**_row([ok]), "texts": [], **{c: [] for c in RATINGS}}, "no_texts"),
        "empty_assistant": (_row([ok], assistant=""), "bad_turn"),
        "ratings_short": (_row([ok], turns=2, relevance_ratings=[5]), "bad_ratings"),
        "rating_above_scale": (_row([ok], formatting_ratings=[7]), "bad_ratings"),
        "under_threshold": (_row([ok], relevance_ratings=[1]), "no_turns_after_rating_filter"),
        "placeholders_without_images": (_row([ok], user="<|image|> and <|image|>?"), "image_placeholder_mismatch"),
        "special_token": (_row([ok], assistant="red<|im_end|>"), "special_token_in_text"),
        "too_many_images": (_row([ok] * 4), "too_many_images"),
        "too_long": (_row([ok], user="word " * 600), "too_long"),
        "grayscale": (_row([_png(Image.new("L", (64, 64), 128))]), None),
        "rgba": (_row([_png(Image.new("RGBA", (64, 64), (0, 0, 255, 0)))]), None),
        "cmyk_jpeg": (_row([_png(Image.new("CMYK", (64, 64), (0, 100, 100, 0)), "JPEG")]), None),
        "sixteen_bit": (_row([_png(sixteen_bit)]), None),
        "wide_10000x50": (_row([_png(Image.new("RGB", (10000, 50), (1, 2, 3)))]), None),
        "tall_1x3000": (_row([_png(Image.new("RGB", (1, 3000), (1, 2, 3)))]), None),
        "text_only": (_row([], user="Is this text only?", assistant="yes"), None),
    }
    return rows, GOOD_ROWS


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> Path:
    from nanovlm.data.synthetic import generate_split

    root = tmp_path_factory.mktemp("bad_rows")
    synthetic = {"train": generate_split(GOOD_ROWS)}
    features = _features()
    good = synthetic["train"].select_columns(["images", "texts", *RATINGS]).cast(features)
    rows, _ = bad_and_odd_rows()
    bad = datasets.Dataset.from_list([row for row, _ in rows.values()], features=features)
    datasets.DatasetDict({"train": datasets.concatenate_datasets([good, bad])}).save_to_disk(root / "data")
    return root / "data"


def test_every_row_is_used_once_or_counted_once_by_reason(bad_dataset, tmp_path):
    from nanovlm.training.build import build_datasets, build_model_and_processor, load_rows
    from nanovlm.training.parser import parse_args

    model_args, data_args, training_args = parse_args([
        "--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(tmp_path),
        "--dataset_name_or_path", str(bad_dataset), "--synthetic_dataset", "false", "--curriculum_split", "none",
        "--eval_split", "none", "--val_size", "0", "--min_relevance_rating", "2", "--dataloader_num_workers", "0",
    ])
    train_rows, _ = load_rows(data_args, training_args)
    model, processor = build_model_and_processor(model_args, train_rows)
    train, _, _ = build_datasets(data_args, training_args, processor, train_rows, None, model_config=model.config)

    used, images = 0, 0
    for pack in train:  # one epoch: the last pack of epoch 0 says "epoch 1 next"
        used += len(pack["samples"])
        images += sum(int(s["pixel_values"].shape[0]) for s in pack["samples"] if s.get("pixel_values") is not None)
        if pack["state"]["epoch"] == 1:
            break
    skipped = pack["skipped"]["counts"]
    rows, good = bad_and_odd_rows()
    expected = Counter(reason for _, reason in rows.values() if reason)
    assert skipped == dict(expected)
    trained = good + sum(1 for _, reason in rows.values() if reason is None)
    assert (len(train_rows), used, sum(skipped.values())) == (good + len(rows), trained, len(rows) - (trained - good))
    assert images > 0


def test_data_whose_every_row_is_skipped_stops_in_one_line_instead_of_spinning(tmp_path):
    """Rows whose images pass the header check but fail to decode form packs that all come out empty: the loader
    looped forever without yielding (the run hung). Now the epoch's counts end the run in one line."""
    from test_entry_errors import error_lines, run_entry

    rows, _ = bad_and_odd_rows()
    picked = ["truncated_png", "corrupt_bytes", "no_texts"]
    features = _features()
    data = datasets.Dataset.from_list([rows[name][0] for name in picked], features=features)
    data.save_to_disk(tmp_path / "data")
    proc = run_entry(["--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(tmp_path / "data"),
                      "--synthetic_dataset", "false", "--curriculum_split", "none", "--eval_split", "none",
                      "--val_size", "0", "--dataloader_num_workers", "1", "--max_steps", "2"], timeout=150)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "train_accelerate.py: error: worker 0 of 1 read no usable sample in epoch 0 (3 rows: 0 built, 3 skipped "
        "(bad_image 2, no_texts 1); 0 turns dropped by the rating filter): every row was empty or skipped; check the "
        "data and the skip reasons in the log, and give at least as many usable rows as DataLoader workers x "
        "processes"
    ]
