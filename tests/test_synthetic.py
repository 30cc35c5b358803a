"""Tests for nanovlm.data.synthetic: determinism, answers re-derived from the scenes, ratings, round trips, blind guess."""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest

from nanovlm.data import synthetic as syn
from nanovlm.data.synthetic import cli
from nanovlm.evaluation import scoring

COLOR_NAMES = "|".join(syn.COLORS)
KIND_NAMES = "|".join(syn.SHAPES)
REPO = Path(__file__).resolve().parents[1]
PHRASE = rf"the (?:(?:{COLOR_NAMES}) )?(?:{KIND_NAMES}|shape)"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fingerprint(row: dict) -> tuple:
    return (
        tuple(_png(image) for image in row["images"]),
        json.dumps(row["texts"]),
        tuple(tuple(row[c]) for c in syn.RATING_COLUMNS),
        tuple(row["question_type"]),
        row["scenes"],
    )


def _clean(row: dict, turn: int) -> bool:
    return all(row[c][turn] >= 4 for c in syn.RATING_COLUMNS)


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return [syn.generate_sample(i, "train", 0) for i in range(600)]


# ------------------------------------------------------------------------------------------------------------------
# an independent re-derivation of every answer from the scene description


def _area(shape: dict) -> float:
    return {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape["kind"]] * shape["r"] ** 2


def _find(shapes: list[dict], phrase: str) -> list[dict]:
    """Shapes matching 'the circle' / 'the red shape' / 'the red circle' / 'the shape'."""
    words = phrase.split()[1:]
    color = words[0] if len(words) == 2 else None
    kind = words[-1]
    return [s for s in shapes if (color is None or s["color"] == color) and (kind == "shape" or s["kind"] == kind)]


def _derive(question_type: str, question: str, scenes: list[dict]) -> str:
    shapes = scenes[0]["shapes"]
    if question_type == "count":
        return str(len(shapes))
    if question_type == "reading":
        return scenes[0]["text"]["word"]
    if question_type == "color":
        (target,) = _find(shapes, re.search(PHRASE, question).group(0))
        return target["color"]
    if question_type == "position":
        (target,) = _find(shapes, re.search(PHRASE, question).group(0))
        width, height = scenes[0]["width"], scenes[0]["height"]
        if "left" in question:
            if target["x"] + target["r"] < width / 2:
                return "left"
            assert target["x"] - target["r"] > width / 2, "shape straddles the middle"
            return "right"
        if target["y"] + target["r"] < height / 2:
            return "top"
        assert target["y"] - target["r"] > height / 2, "shape straddles the middle"
        return "bottom"
    if question_type == "size":
        first, second = re.findall(PHRASE, question)
        ((a,), (b,)) = _find(shapes, first), _find(shapes, second)
        assert max(_area(a), _area(b)) >= 2 * min(_area(a), _area(b)), "sizes too close to tell"
        pick = min((a, b), key=_area) if "smaller" in question else max((a, b), key=_area)
        phrase = first if pick is a else second
        return phrase.split()[1] if phrase.endswith("shape") else pick["kind"]
    if question_type == "multi_image":
        color, kind = re.search(rf"a ({COLOR_NAMES}) ({KIND_NAMES})\?", question).groups()
        hits = [k for k, scene in enumerate(scenes) if _find(scene["shapes"], f"the {color} {kind}")]
        (hit,) = hits
        return f"image {hit + 1}"
    raise AssertionError(f"unknown question type {question_type}")


# ------------------------------------------------------------------------------------------------------------------
# determinism and splits


def test_same_seed_gives_identical_samples_and_other_seed_differs() -> None:
    first = [_fingerprint(syn.generate_sample(i, "train", 7)) for i in range(40)]
    again = [_fingerprint(r) for r in syn.iter_samples(40, "train", 7)]
    assert first == again
    # A sample depends only on (seed, split, index), not on what was generated before it.
    assert _fingerprint(syn.generate_sample(33, "train", 7)) == first[33]
    other = [_fingerprint(syn.generate_sample(i, "train", 8)) for i in range(40)]
    assert sum(a[0] != b[0] for a, b in zip(first, other)) == 40
    assert sum(a[1] != b[1] for a, b in zip(first, other)) >= 30


def test_splits_are_disjoint() -> None:
    seen: dict[str, set] = {}
    for split in syn.SPLITS:
        rows = list(syn.iter_samples(300, split, 0))
        assert len({r["sample_id"] for r in rows}) == 300
        seen[split] = {(r["scenes"], tuple(_png(i) for i in r["images"])) for r in rows}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


# ------------------------------------------------------------------------------------------------------------------
# content


def test_every_answer_is_in_its_closed_set_and_matches_the_scene(train_rows: list[dict]) -> None:
    types = Counter()
    for row in train_rows:
        scenes = json.loads(row["scenes"])
        assert len(scenes) == len(row["images"])
        for turn, (qtype, text) in enumerate(zip(row["question_type"], row["texts"])):
            types[qtype] += 1
            assert text["assistant"] in syn.ANSWER_SETS[qtype], (qtype, text)
            derived = _derive(qtype, text["user"], scenes)
            if _clean(row, turn):
                assert text["assistant"] == derived, (row["sample_id"], text, derived)
            else:  # low-rated turns carry a wrong answer by default
                assert text["assistant"] != derived, (row["sample_id"], text)
    assert set(types) == set(syn.QUESTION_TYPES)


def test_questions_do_not_contain_their_answer(train_rows: list[dict]) -> None:
    for row in train_rows:
        for qtype, text in zip(row["question_type"], row["texts"]):
            question, answer = text["user"].lower(), text["assistant"]
            if qtype in ("color", "count", "reading", "multi_image"):
                assert not re.search(rf"\b{re.escape(answer)}\b", question), text
            else:  # position/size questions name both candidates
                options = {"position": ("left", "right", "top", "bottom")}.get(qtype)
                named = [w for w in (options or syn.ANSWER_SETS["size"]) if re.search(rf"\b{w}\b", question)]
                assert answer in named and len(named) == 2, text


def test_rendered_pixels_match_the_scene(train_rows: list[dict]) -> None:
    for row in train_rows[:200]:
        for image, scene in zip(row["images"], json.loads(row["scenes"])):
            assert image.mode == "RGB" and image.size == (scene["width"], scene["height"])
            assert image.getpixel((0, 0)) == (scene["background"],) * 3
            for shape in scene["shapes"]:
                assert image.getpixel((shape["x"], shape["y"])) == syn.COLORS[shape["color"]]
            if scene["text"] is not None:
                assert image.convert("L").getextrema()[0] < 140  # the dark word was drawn


@pytest.mark.parametrize("size", [(96, 48), (48, 120), (224, 224), (512, 320)])
def test_other_image_sizes_render_consistent_scenes(size: tuple[int, int]) -> None:
    config = syn.SyntheticConfig(image_size=size)
    for index in range(12 if size[0] < 200 else 6):
        row = syn.generate_sample(index, "train", 1, config)
        scenes = json.loads(row["scenes"])
        for image, scene in zip(row["images"], scenes):
            assert image.size == size
            for shape in scene["shapes"]:
                assert image.getpixel((shape["x"], shape["y"])) == syn.COLORS[shape["color"]]
        for turn, (qtype, text) in enumerate(zip(row["question_type"], row["texts"])):
            if _clean(row, turn):
                assert text["assistant"] == _derive(qtype, text["user"], scenes)


def test_multi_turn_samples_ask_distinct_types_about_one_image(train_rows: list[dict]) -> None:
    multi = [r for r in train_rows if len(r["texts"]) > 1]
    assert 0.15 * len(train_rows) < len(multi) < 0.45 * len(train_rows)
    assert {len(r["texts"]) for r in multi} == {2, 3}
    for row in multi:
        assert len(row["images"]) == 1
        assert len(set(row["question_type"])) == len(row["question_type"])
    assert all(len(r["texts"]) == 1 for r in syn.iter_samples(50, config=syn.SyntheticConfig(max_turns=1)))


def test_ratings_are_per_turn_in_range_and_low_fraction_is_configurable() -> None:
    rows = list(syn.iter_samples(400, "train", 2, syn.SyntheticConfig(low_rating_fraction=0.2)))
    low = turns = 0
    for row in rows:
        for column in syn.RATING_COLUMNS:
            assert len(row[column]) == len(row["texts"]) == len(row["question_type"])
            assert all(isinstance(v, int) and 1 <= v <= 5 for v in row[column])
        for turn in range(len(row["texts"])):
            turns += 1
            ratings = [row[c][turn] for c in syn.RATING_COLUMNS]
            if _clean(row, turn):
                assert set(ratings) <= {4, 5}
            else:
                low += 1
                assert min(ratings) <= 2
    assert 0.14 < low / turns < 0.26
    clean = list(syn.iter_samples(100, "train", 2, syn.SyntheticConfig(low_rating_fraction=0.0)))
    assert all(min(r[c][t] for c in syn.RATING_COLUMNS) >= 4 for r in clean for t in range(len(r["texts"])))


def test_uncorrupted_low_rated_turns_keep_the_right_answer() -> None:
    config = syn.SyntheticConfig(low_rating_fraction=1.0, corrupt_low_rated_answers=False)
    for row in syn.iter_samples(60, "train", 3, config):
        scenes = json.loads(row["scenes"])
        for qtype, text in zip(row["question_type"], row["texts"]):
            assert text["assistant"] == _derive(qtype, text["user"], scenes)


def test_type_weights_select_question_types() -> None:
    rows = list(syn.iter_samples(40, config=syn.SyntheticConfig(type_weights={"reading": 1.0, "count": 0.0})))
    assert {t for r in rows for t in r["question_type"]} == {"reading"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 16}, r"image_size=\(16, 16\) is too small"),
        ({"image_size": (64, "64")}, "image_size must be an int or a"),
        ({"type_weights": {"colour": 1.0}}, r"unknown question types \['colour'\]; choose from"),
        ({"type_weights": {"color": 0.0}}, "at least one question type a positive weight"),
        ({"low_rating_fraction": 1.5}, r"low_rating_fraction must be a probability in \[0, 1\], got 1.5"),
        ({"max_turns": 0}, "max_turns must be an int >= 1, got 0"),
        ({"max_shapes": 5}, r"max_shapes must be an int in \[1, 4\], got 5"),
        ({"max_shapes": 1}, r"size questions compare two shapes, so max_shapes=1 needs type_weights\['size'\] = 0"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        syn.SyntheticConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# evaluation helpers


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Red", "red", True),
        ("  red.\n", "red", True),
        ('"Image 2"!', "image 2", True),
        ("image  2", "image 2", True),
        ("3", "3", True),
        ("red circle", "red", False),
        ("4", "3", False),
        ("", "red", False),
    ],
)
def test_answer_is_correct(prediction: str, reference: str, expected: bool) -> None:
    assert scoring.answer_is_correct(prediction, reference) is expected


def _row(*turns: tuple[str, str], low: tuple[int, ...] = ()) -> dict:
    n = len(turns)
    ratings = {c: [1 if i in low else 5 for i in range(n)] for c in syn.RATING_COLUMNS}
    return {
        "texts": [{"user": "q", "assistant": a} for _, a in turns],
        "question_type": [t for t, _ in turns],
        **ratings,
    }


def test_blind_guess_accuracy_matches_a_hand_computation() -> None:
    reference = [_row(("color", "red"), ("count", "2")), _row(("color", "Red.")), _row(("color", "blue"))]
    evaluated = [
        _row(("color", "red"), ("count", "3")),
        _row(("color", "blue"), ("count", "2")),
        _row(("reading", "cat")),
    ]
    # majority: color -> red (2 of 3), count -> 2; reading has no majority in the reference -> scores 0.
    assert scoring.blind_guess_accuracy(evaluated, reference) == {
        "color": 0.5,
        "count": 0.5,
        "reading": 0.0,
        "overall": 2 / 5,
    }
    # Without a reference the evaluated rows give the majorities; ties go to the alphabetically first answer.
    assert scoring.majority_answers(evaluated) == {"color": "blue", "count": "2", "reading": "cat"}
    assert scoring.blind_guess_accuracy(evaluated) == {"color": 0.5, "count": 0.5, "reading": 1.0, "overall": 3 / 5}
    # min_rating drops low-rated turns on both sides.
    noisy = [_row(("color", "blue"), ("color", "blue"), low=(0, 1)), _row(("color", "red"))]
    assert scoring.blind_guess_accuracy(noisy, min_rating=3) == {"color": 1.0, "overall": 1.0}
    assert scoring.blind_guess_accuracy(noisy) == {"color": 2 / 3, "overall": 2 / 3}


def test_per_question_blind_guess_matches_a_hand_computation() -> None:
    def turn(question: str, answer: str) -> dict:
        return {"texts": [{"user": question, "assistant": answer}], "question_type": ["position"]}

    reference = [
        turn("Is the circle on the left or the right?", "left"),
        turn("Is the circle on the left or the right? Answer with one word.", "left"),
        turn("Is the square at the top or the bottom?", "bottom"),
        turn("Is the triangle at the top or the bottom?", "top"),
    ]
    evaluated = [
        turn("Is the circle on the left or the right?", "right"),
        turn("Is the square at the top or the bottom? Answer with one word.", "bottom"),
        turn("Is the red square at the top or the bottom?", "left"),  # unseen question: type majority "left"
    ]
    assert scoring.blind_guess_accuracy(evaluated, reference) == {"position": 1 / 3, "overall": 1 / 3}
    assert scoring.blind_guess_accuracy(evaluated, reference, per_question=True) == {"position": 2 / 3, "overall": 2 / 3}


def test_blind_guess_is_weak_and_answers_are_near_uniform() -> None:
    train = list(syn.iter_samples(1200, "train", 0))
    test = list(syn.iter_samples(1200, "test", 0))
    accuracy = scoring.blind_guess_accuracy(test, train)
    assert set(accuracy) == set(syn.QUESTION_TYPES) | {"overall"}
    assert all(accuracy[t] <= 0.45 for t in syn.QUESTION_TYPES), accuracy
    assert accuracy["overall"] <= 0.32, accuracy
    # Even a text-only model that learns each exact question's majority stays near chance.
    per_question = scoring.blind_guess_accuracy(test, train, per_question=True)
    assert all(per_question[t] <= 0.6 for t in syn.QUESTION_TYPES), per_question
    assert per_question["overall"] <= 0.4, per_question
    first_turns: dict[str, Counter] = {}
    for row in train:
        first_turns.setdefault(row["question_type"][0], Counter())[row["texts"][0]["assistant"]] += 1
    for qtype, counts in first_turns.items():
        # Every answer of the closed set occurs, and none is far more common than uniform.
        assert set(counts) == set(syn.ANSWER_SETS[qtype]), qtype
        uniform = sum(counts.values()) / len(syn.ANSWER_SETS[qtype])
        assert max(counts.values()) < 1.6 * uniform + 10, (qtype, counts)


# ------------------------------------------------------------------------------------------------------------------
# datasets, files and the CLI


def test_build_writes_save_to_disk_and_parquet_that_round_trip(tmp_path) -> None:
    import datasets

    out = tmp_path / "synthetic"
    built = syn.build_synthetic_dataset(out, syn.SyntheticSettings(20, 6, 6, seed=4, low_rating_fraction=0.5))
    assert {s: len(d) for s, d in built.items()} == {"train": 20, "validation": 6, "test": 6}
    assert built["train"].features == syn.synthetic_features()
    # Validation and test have no low-rated turns by default.
    for split in ("validation", "test"):
        assert min(min(v) for c in syn.RATING_COLUMNS for v in built[split][c]) >= 4

    def raw(ds: datasets.Dataset) -> list[dict]:
        return ds.cast_column("images", datasets.List(datasets.Image(decode=False))).to_list()

    loaded = datasets.load_from_disk(str(out))
    parquet = datasets.load_dataset(
        "parquet",
        data_files={s: str(out / "parquet" / f"{s}.parquet") for s in syn.SPLITS},
        cache_dir=str(tmp_path / "cache"),
    )
    for split in syn.SPLITS:
        expected = raw(built[split])
        assert raw(loaded[split]) == expected
        assert raw(parquet[split]) == expected
        assert parquet[split].features == built[split].features
    # The stored bytes are the PNGs of the generator's images, and they decode back to PIL images.
    sample = syn.generate_sample(3, "test", 4, syn.SyntheticConfig(low_rating_fraction=0.0))
    stored = raw(parquet["test"])[3]
    assert [i["bytes"] for i in stored["images"]] == [_png(i) for i in sample["images"]]
    assert stored["texts"] == sample["texts"]
    decoded = parquet["test"][3]["images"][0]
    assert decoded.size == (64, 64) and decoded.convert("RGB").tobytes() == sample["images"][0].tobytes()
    assert json.loads((out / "synthetic_config.json").read_text())["seed"] == 4
    # Rebuilding with fewer splits removes the earlier build's files for the dropped split.
    syn.build_synthetic_dataset(out, syn.SyntheticSettings(4, 0, 2, seed=4))
    assert sorted(p.name for p in (out / "parquet").iterdir()) == ["test.parquet", "train.parquet"]
    assert not (out / "validation").exists()
    assert list(datasets.load_from_disk(str(out))) == ["train", "test"]


def test_train_only_multi_turn_options_leave_validation_and_test_unchanged(tmp_path) -> None:
    default = syn.build_synthetic_dataset(None, syn.SyntheticSettings(40, 6, 12, seed=2))
    more = syn.build_synthetic_dataset(
        tmp_path / "more", syn.SyntheticSettings(40, 6, 12, seed=2, train_multi_turn_fraction=1.0, train_max_turns=4)
    )
    for split in ("validation", "test"):  # the evaluation splits, and so the blind guess, do not move
        assert more[split]["texts"] == default[split]["texts"]
        assert more[split]["sample_id"] == default[split]["sample_id"]
    turns = [len(t) for t in more["train"]["texts"]]
    assert sum(turns) > sum(len(t) for t in default["train"]["texts"])
    assert max(turns) == 4 and sum(n > 1 for n in turns) > sum(len(t) > 1 for t in default["train"]["texts"])
    # follow-ups ask about the first image only: every turn's type is a single-image type after the first
    for row in more["train"]:
        assert len(row["question_type"]) == 1 or row["question_type"][0] in ("color", "count", "position", "size")
    record = json.loads((tmp_path / "more" / "synthetic_config.json").read_text())
    assert (record["multi_turn_fraction"], record["max_turns"]) == (0.3, 3)
    assert (record["train_multi_turn_fraction"], record["train_max_turns"]) == (1.0, 4)
    with pytest.raises(ValueError, match=r"^train_max_turns must be an int >= 1, got 0$"):
        syn.build_synthetic_dataset(None, num_train=2, num_validation=0, num_test=0, train_max_turns=0)
    with pytest.raises(ValueError, match=r"^train_multi_turn_fraction must be a probability in \[0, 1\], got 1\.5$"):
        syn.SyntheticSettings(2, 0, 0, train_multi_turn_fraction=1.5)


def test_max_shapes_bounds_every_image_and_keeps_the_default_stream() -> None:
    # The default (4) draws exactly the stream it always did: an explicit max_shapes=4 gives identical rows.
    default = [syn.generate_sample(i, seed=5) for i in range(40)]
    explicit = [syn.generate_sample(i, seed=5, config=syn.SyntheticConfig(max_shapes=4)) for i in range(40)]
    assert [r["texts"] for r in explicit] == [r["texts"] for r in default]
    assert [r["scenes"] for r in explicit] == [r["scenes"] for r in default]
    weights = {t: 1.0 for t in syn.QUESTION_TYPES if t != "size"}
    for limit in (1, 2):
        config = syn.SyntheticConfig(max_shapes=limit, type_weights=weights if limit == 1 else None)
        rows = [syn.generate_sample(i, seed=5, config=config) for i in range(150)]
        counts = [len(scene["shapes"]) for r in rows for scene in json.loads(r["scenes"])]
        assert max(counts) == limit
        types = {t for r in rows for t in r["question_type"]}
        assert types >= ({"color", "count", "position", "multi_image"} | ({"size"} if limit == 2 else set()))
        count_answers = {
            turn["assistant"]
            for r in rows
            for k, (turn, t) in enumerate(zip(r["texts"], r["question_type"]))
            if t == "count" and min(r[c][k] for c in syn.RATING_COLUMNS) >= 3  # low-rated answers are corrupted
        }
        assert count_answers == {str(n) for n in range(1, limit + 1)}


def test_simple_split_is_single_object_and_leaves_the_other_splits_unchanged(tmp_path) -> None:
    settings = syn.SyntheticSettings(30, 6, 12, seed=3, train_multi_turn_fraction=1.0, train_max_turns=4)
    default = syn.build_synthetic_dataset(None, settings)
    data = syn.build_synthetic_dataset(tmp_path / "simple", settings, num_train_simple=60)
    assert set(data) == {"train", "validation", "test", syn.SIMPLE_SPLIT}
    for split in ("train", "validation", "test"):
        assert data[split]["texts"] == default[split]["texts"]
    simple = data[syn.SIMPLE_SPLIT]
    assert len(simple) == 60 and all(sid.startswith("train_simple-3-") for sid in simple["sample_id"])
    assert all(len(scenes) == 1 and len(scenes[0]["shapes"]) == 1 for scenes in map(json.loads, simple["scenes"]))
    first_types = [types[0] for types in simple["question_type"]]
    assert set(first_types) == {"color", "count", "position"}
    assert max(len(t) for t in simple["texts"]) == 3  # multi-turn as train: one question per type (3 types)
    # the blind guess still takes its majorities from the train split only
    assert scoring.blind_guess_accuracy(data) == scoring.blind_guess_accuracy(default)
    record = json.loads((tmp_path / "simple" / "synthetic_config.json").read_text())
    assert record[syn.SIMPLE_SPLIT] == 60 and record["max_shapes"] == 4
    reloaded = syn.build_synthetic_dataset(tmp_path / "simple", syn.SyntheticSettings(30, 6, 12, seed=3))  # rebuilt without it
    assert syn.SIMPLE_SPLIT not in reloaded and not (tmp_path / "simple" / syn.SIMPLE_SPLIT).exists()
    assert not (tmp_path / "simple" / "parquet" / f"{syn.SIMPLE_SPLIT}.parquet").exists()


def test_cli_builds_and_reports_blind_guess(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    result = cli.main(
        ["--output_dir", str(out), "--num_train", "30", "--num_validation", "0", "--num_test", "12", "--no_parquet"]
    )
    printed = capsys.readouterr().out
    assert "blind guess on test (majority answers from train)" in printed
    assert re.search(r"overall\s+\d+\s+-\s+[01]\.\d{3}\s+[01]\.\d{3}", printed)
    assert 0.0 <= result["overall"] <= 1.0
    assert (out / "dataset_dict.json").exists() and not (out / "parquet").exists()
    cli.main(["--output_dir", str(out), "--num_train", "4", "--num_validation", "0", "--num_test", "2",
              "--num_train_simple", "5", "--no_parquet", "--overwrite"])
    assert len(datasets.load_from_disk(str(out))[syn.SIMPLE_SPLIT]) == 5
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["--output_dir", str(out), "--image_size", "big"])


def test_one_settings_dataclass_feeds_the_cli_the_recipe_and_the_record(tmp_path) -> None:
    import dataclasses

    from nanovlm.training import ArgumentsError, parse_args

    names = {f.name for f in dataclasses.fields(syn.SyntheticSettings)}
    options = {action.dest for action in cli.build_arg_parser()._actions}
    assert options - {"help", "output_dir", "no_parquet", "overwrite"} == names
    argv = ["--output_dir", str(tmp_path / "run"), "--seed", "7", "--synthetic_num_test", "9"]
    _, data_args, training_args = parse_args([*argv, "--synthetic_image_size", "48"])
    settings = data_args.synthetic_settings(training_args.seed)
    assert (settings.seed, settings.num_test, settings.image_size, settings.num_validation) == (7, 9, 48, 200)
    record = settings.record()
    assert (record["seed"], record["test"], record["image_size"], record["train_max_turns"]) == (7, 9, [48, 48], 3)
    assert settings.differences(record) == []
    built = {**record, "test": 3, "max_turns": 2}
    assert settings.differences(built) == ["--num_test: requested 9, built 3", "--max_turns: requested 3, built 2"]
    # the recipe compares only the settings it has flags for, under their flag names
    assert settings.differences(built, {"num_test": "synthetic_num_test"}) == [
        "--synthetic_num_test: requested 9, built 3"
    ]
    # the recipe's bound is the generator's smallest image side
    with pytest.raises(ArgumentsError, match=r"--synthetic_image_size must be an integer >= 32: got 20"):
        parse_args([*argv, "--synthetic_image_size", "20"])


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_cli_refuses_to_overwrite_data_built_with_other_settings(tmp_path, capsys) -> None:
    # The demo's data, built by the trainer, then the builder's README command pointed at the same folder.
    from nanovlm.training.build import prepare_synthetic_dataset
    from nanovlm.training.parser import parse_args

    out = tmp_path / "synthetic_data"
    _, data_args, training_args = parse_args([
        "--config", str(REPO / "configs/train/demo.yaml"), "--output_dir", str(tmp_path / "run"),
        "--dataset_name_or_path", str(out), "--synthetic_num_train", "12", "--synthetic_num_validation", "4",
        "--synthetic_num_test", "4", "--synthetic_num_train_simple", "4",
    ])
    prepare_synthetic_dataset(data_args, training_args)
    before = _files(out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output_dir", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"python -m nanovlm.data.synthetic: error: --output_dir {out} holds a synthetic dataset built with other "
        "settings (--num_train: requested 4000, built 12; --num_validation: requested 500, built 4; "
    )
    assert error.endswith("; pass --overwrite to rebuild it, or choose another --output_dir")
    assert _files(out) == before  # untouched

    # the same settings: reused, not rebuilt
    same = ["--output_dir", str(out), "--num_train", "12", "--num_validation", "4", "--num_test", "4",
            "--num_train_simple", "4", "--multi_turn_fraction", "0.3", "--train_multi_turn_fraction", "1.0",
            "--train_max_turns", "4"]
    result = cli.main(same)
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out} already holds this dataset (built with the same settings): reusing it.")
    assert "blind guess on test" in printed and 0.0 <= result["overall"] <= 1.0
    assert _files(out) == before

    # --overwrite rebuilds with the new settings
    cli.main(["--output_dir", str(out), "--num_train", "6", "--num_validation", "0", "--num_test", "3",
              "--no_parquet", "--overwrite"])
    assert json.loads((out / syn.SETTINGS_FILE).read_text())["train"] == 6
    assert len(datasets.load_from_disk(str(out))["train"]) == 6

    # a folder with other files is not a dataset to replace silently either
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["--output_dir", str(other), "--num_train", "4"])
    assert "exists and is not a synthetic dataset" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    with pytest.raises(SystemExit):  # --overwrite replaces a synthetic dataset only
        cli.main(["--output_dir", str(other), "--num_train", "4", "--overwrite"])
    assert capsys.readouterr().err.strip().endswith(
        f"error: --output_dir {other} exists and is not a synthetic dataset (no {syn.SETTINGS_FILE}); choose another "
        "--output_dir"
    )
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_cli_overwrite_killed_half_way_leaves_the_old_dataset_whole(tmp_path, monkeypatch) -> None:
    """--overwrite builds aside and renames in: a rebuild killed half-way used to leave half the new splits under the
    old settings record, which the trainer then read as the old dataset."""
    out = tmp_path / "data"
    small = ["--num_validation", "0", "--num_test", "2", "--num_train_simple", "0", "--no_parquet"]
    cli.main(["--output_dir", str(out), "--num_train", "4", *small])
    before = _files(out)
    real_build = cli.build_synthetic_dataset

    def killed(folder, settings, **kwargs):
        real_build(folder, settings, **kwargs)  # the new dataset is written whole, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_synthetic_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--output_dir", str(out), "--num_train", "6", *small, "--overwrite"])
    assert _files(out) == before and len(datasets.load_from_disk(str(out))["train"]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no partial folder left beside it
    monkeypatch.setattr(cli, "build_synthetic_dataset", real_build)
    cli.main(["--output_dir", str(out), "--num_train", "6", *small, "--overwrite"])
    assert json.loads((out / syn.SETTINGS_FILE).read_text())["train"] == 6
    assert len(datasets.load_from_disk(str(out))["train"]) == 6 and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_demo_pixel_statistics_match_the_synthetic_images() -> None:
    """configs/train/demo.yaml normalizes with the training images' own per-channel mean and std."""
    from pathlib import Path

    import numpy as np
    import yaml

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/train/demo.yaml").read_text())
    config = syn.SyntheticConfig(image_size=demo["synthetic_image_size"])
    pixels = np.concatenate([
        np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255
        for i in range(300)
        for image in syn.generate_sample(i, "train", demo["seed"], config)["images"]
    ])
    assert np.allclose(pixels.mean(0), demo["image_mean"], atol=0.01)
    assert np.allclose(pixels.std(0), demo["image_std"], atol=0.01)
