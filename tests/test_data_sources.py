"""Tests for nanovlm.data.sources: local loaders (save_to_disk, parquet, json), configs, splits, rank shards, shuffle."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import datasets.config
import pytest
from datasets import Dataset, DatasetDict, Features, IterableDataset, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from nanovlm.data.samples import IGNORE_INDEX, SampleBuilder
from nanovlm.data.sources import (
    FINEVISION_COLUMNS,
    check_ranks_agree,
    load_finevision,
    shard_for_rank,
    shuffle_dataset,
    split_train_val,
)

FEATURES = Features(
    {
        "images": List(ImageFeature()),
        "texts": List({"user": Value("string"), "assistant": Value("string")}),
        "relevance_ratings": List(Value("int64")),
        "question_type": List(Value("string")),
    }
)


def _dataset(n: int, tag: str) -> Dataset:
    """n rows; row i of `tag` answers f"{tag}{i}" and has one or two small PIL images."""
    return Dataset.from_dict(
        {
            "images": [[Image.new("RGB", (8 + i, 8), (i * 20 % 255, 0, 0))] * (1 + i % 2) for i in range(n)],
            "texts": [[{"user": "What color?", "assistant": f"{tag}{i}"}] for i in range(n)],
            "relevance_ratings": [[5] for _ in range(n)],
            "question_type": [["color"] for _ in range(n)],
        },
        features=FEATURES,
    )


def _answers(ds) -> list[str]:
    return [row["texts"][0]["assistant"] for row in ds]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """root/a: save_to_disk Dataset (6 rows); root/b: parquet files (5 rows); root/bad: a corrupt parquet file;
    root/dd: a save_to_disk DatasetDict (train 4, validation 2)."""
    root = tmp_path_factory.mktemp("finevision")
    _dataset(6, "a").save_to_disk(str(root / "a"))
    (root / "b").mkdir()
    b = _dataset(5, "b")
    b.select(range(3)).to_parquet(str(root / "b" / "part-0.parquet"))
    b.select(range(3, 5)).to_parquet(str(root / "b" / "part-1.parquet"))
    (root / "bad").mkdir()
    (root / "bad" / "part-0.parquet").write_bytes(b"this is not parquet")
    DatasetDict({"train": _dataset(4, "t"), "validation": _dataset(2, "v")}).save_to_disk(str(root / "dd"))
    return root


# ---- loading -----------------------------------------------------------------------------------------------------


def test_load_save_to_disk_folder_keeps_the_pipeline_columns(data_root):
    ds = load_finevision(data_root / "a")
    assert isinstance(ds, Dataset) and len(ds) == 6
    assert ds.column_names == [c for c in FINEVISION_COLUMNS if c in FEATURES]  # question_type dropped
    assert _answers(ds) == [f"a{i}" for i in range(6)]
    assert isinstance(ds[1]["images"][0], Image.Image) and len(ds[1]["images"]) == 2
    assert "question_type" in load_finevision(data_root / "a", columns=None).column_names


def test_load_datasetdict_folder_picks_the_split(data_root):
    assert _answers(load_finevision(data_root / "dd", split="validation")) == ["v0", "v1"]
    with pytest.raises(
        ValueError, match=r"(?s)Could not load any.*has no split 'test'; its splits are \['train', 'validation'\]"
    ):
        load_finevision(data_root / "dd", split="test")


def test_load_parquet_files_by_glob_and_list(data_root):
    ds = load_finevision(str(data_root / "b" / "*.parquet"))
    assert _answers(ds) == [f"b{i}" for i in range(5)]
    assert ds.features["images"] == List(ImageFeature()) and isinstance(ds[0]["images"][0], Image.Image)
    files = sorted(str(p) for p in (data_root / "b").glob("*.parquet"))
    assert _answers(load_finevision(files[1:])) == ["b3", "b4"]
    assert _answers(load_finevision(data_root / "b")) == [f"b{i}" for i in range(5)]  # a folder of data files


def test_load_json_with_image_paths_builds_samples(tmp_path, tiny_processor):
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 20), (220, 40, 40)).save(image_path)
    rows = [
        {"images": [str(image_path)], "texts": [{"user": "What color?", "assistant": f"j{i}"}], "sample_id": i}
        for i in range(3)
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_finevision(tmp_path / "rows.jsonl")
    assert ds.column_names == ["images", "texts"] and _answers(ds) == ["j0", "j1", "j2"]
    assert _answers(load_finevision(str(tmp_path / "*.jsonl"), streaming=True)) == ["j0", "j1", "j2"]
    sample, reason = SampleBuilder(tiny_processor).build(ds[0])
    assert reason is None and sample["n_images"] == 1 and sample["pixel_values"].shape == (3, 3, 32, 32)
    labelled = sample["labels"] != IGNORE_INDEX
    assert tiny_processor.tokenizer.decode(sample["input_ids"][labelled]) == "j0<|im_end|>"


def test_bad_configs_are_logged_and_skipped(data_root, caplog):
    caplog.set_level(logging.WARNING, logger="nanovlm.data.sources")
    ds = load_finevision(data_root, configs=["a", "bad", "b", "missing"])
    assert _answers(ds) == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)]
    skipped = [r.getMessage() for r in caplog.records if r.name == "nanovlm.data.sources"]
    assert len(skipped) == 2
    assert "config 'bad'" in skipped[0] and "config 'missing'" in skipped[1] and "no such file or folder" in skipped[1]


def test_all_configs_of_a_folder(data_root, caplog):
    caplog.set_level(logging.WARNING, logger="nanovlm.data.sources")
    ds = load_finevision(data_root, configs="all")  # a, b, bad (skipped), dd (its train split)
    assert sorted(_answers(ds)) == sorted(
        [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)] + [f"t{i}" for i in range(4)]
    )
    ours = [r.getMessage() for r in caplog.records if r.name == "nanovlm.data.sources"]
    assert len(ours) == 1 and "config 'bad'" in ours[0]


def test_no_config_loads_raises_listing_the_attempts(data_root):
    with pytest.raises(
        ValueError, match=r"(?s)Could not load any of 2 config\(s\).*- bad: .*- missing: FileNotFoundError"
    ):
        load_finevision(data_root, configs=["bad", "missing"])


def test_missing_path_and_offline_hub_id_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)Could not load any.*no such file or folder: .*nope"):
        load_finevision(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"(?s)Could not load any.*nanovlm-test/does-not-exist.*network"):
        load_finevision("nanovlm-test/does-not-exist")
    with pytest.raises(ValueError, match=r"Could not list the configs of 'nanovlm-test/does-not-exist'"):
        load_finevision("nanovlm-test/does-not-exist", configs="all")
    with pytest.raises(ValueError, match=r"no file matches"):
        load_finevision(str(tmp_path / "*.parquet"))


def test_rows_without_texts_are_refused(tmp_path, caplog):
    Dataset.from_dict({"text": ["hello"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['texts'\]; its columns are \['text'\]"):
        load_finevision(tmp_path / "plain")


def test_rows_without_images_load_with_a_warning(tmp_path, caplog):
    Dataset.from_dict({"texts": [[{"user": "a?", "assistant": "b"}]]}).save_to_disk(str(tmp_path / "text_only"))
    with caplog.at_level(logging.WARNING, logger="nanovlm.data.sources"):
        assert len(load_finevision(tmp_path / "text_only")) == 1
    assert f"{tmp_path / 'text_only'} has no `images` column (its columns are ['texts']): every row trains as " \
        "text-only." in caplog.messages


def test_a_malformed_json_line_is_named_in_the_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"texts": [{"user": "a?", "assistant": "b"}]}\n{not json\n')
    with pytest.raises(ValueError) as info:
        load_finevision(str(path))
    # datasets' own message ("An error occurred while generating the dataset") says neither where nor what
    assert "DatasetGenerationError: An error occurred while generating the dataset (ArrowInvalid: JSON parse " \
        "error: Missing a name for object member. in row 1)" in str(info.value)


def test_streaming_interleaves_configs_each_row_once(data_root, monkeypatch):
    # datasets sleeps 5 s after an interleaved stream of parquet files ends (an Arrow shutdown workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    ds = load_finevision(data_root, configs=["a", "b"], streaming=True)
    assert isinstance(ds, IterableDataset)
    answers = _answers(ds)
    assert sorted(answers) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)])
    assert answers[:2] == ["a0", "b0"]  # interleaved, not concatenated


# ---- split, shard, shuffle ---------------------------------------------------------------------------------------


def test_split_train_val_map_style_is_deterministic_and_disjoint():
    ds = _dataset(20, "r")
    train, val = split_train_val(ds, 5, seed=3)
    train2, val2 = split_train_val(ds, 5, seed=3)
    assert _answers(val) == _answers(val2) and _answers(train) == _answers(train2)
    assert len(val) == 5 and len(train) == 15
    assert set(_answers(train)).isdisjoint(_answers(val)) and set(_answers(train)) | set(_answers(val)) == set(
        _answers(ds)
    )
    assert _answers(split_train_val(ds, 5, seed=4)[1]) != _answers(val)
    assert split_train_val(ds, 0) == (ds, None)
    with pytest.raises(ValueError, match="val_size=20 must be smaller than the dataset's 20 rows"):
        split_train_val(ds, 20)
    with pytest.raises(ValueError, match=r"val_size must be an int >= 0, got -1"):
        split_train_val(ds, -1)


def test_split_train_val_streaming_holds_out_the_first_rows():
    stream = _dataset(10, "s").to_iterable_dataset(num_shards=2)
    train, val = split_train_val(stream, 3)
    assert _answers(val) == ["s0", "s1", "s2"] and _answers(val) == _answers(split_train_val(stream, 3)[1])
    assert _answers(train) == [f"s{i}" for i in range(3, 10)]
    # Held out across shards (4 + 2 of shards 0 and 1), the same whichever way the parts are sharded later.
    stream = _dataset(10, "s").to_iterable_dataset(num_shards=3)  # shards of 4, 3, 3 rows
    train, val = split_train_val(stream, 6)
    assert (train.num_shards, val.num_shards) == (3, 2)
    for readers in (1, 2, 3):
        for part, want in ((val, range(6)), (train, range(6, 10))):
            if readers > part.num_shards:  # SampleStream then reads the whole stream
                continue
            read = [_answers(part.shard(num_shards=readers, index=i, contiguous=False)) for i in range(readers)]
            assert sorted(sum(read, []), key=lambda a: int(a[1:])) == [f"s{i}" for i in want], readers
    with pytest.raises(ValueError, match="val_size=10 must be smaller than the stream's 10 rows"):
        split_train_val(stream, 10)


def test_split_train_val_streaming_interleaved_configs(data_root, monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # see the test above
    ds = load_finevision(data_root, configs=["a", "b"], streaming=True)
    train, val = split_train_val(ds, 4)
    everything = sorted(_answers(ds))
    for world in (1, 2):
        read = [(_answers(shard_for_rank(train, r, world)), _answers(shard_for_rank(val, r, world)))
                for r in range(world)]
        train_rows, val_rows = sum((t for t, _ in read), []), sum((v for _, v in read), [])
        assert len(val_rows) == 4 and sorted(train_rows + val_rows) == everything, world


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["map", "stream_4_shards", "stream_1_shard"])
def test_rank_shards_are_disjoint_and_complete(world_size, kind):
    ds = _dataset(11, "x")
    if kind != "map":
        ds = ds.to_iterable_dataset(num_shards=4 if kind == "stream_4_shards" else 1)
    shards = [_answers(shard_for_rank(ds, rank, world_size)) for rank in range(world_size)]
    for a, b in combinations(shards, 2):
        assert set(a).isdisjoint(b)
    assert sorted(sum(shards, [])) == sorted(f"x{i}" for i in range(11))
    assert all(len(s) >= 2 for s in shards)


def test_fewer_rows_than_ranks_leave_the_last_ranks_empty():
    ds = _dataset(2, "x")
    assert [_answers(shard_for_rank(ds, rank, 3)) for rank in range(3)] == [["x0"], ["x1"], []]


def test_shard_for_rank_validates():
    ds = _dataset(2, "x")
    assert shard_for_rank(ds, 0, 1) is ds
    with pytest.raises(ValueError, match=r"0 <= rank < world_size, got rank=2, world_size=2"):
        shard_for_rank(ds, 2, 2)


def test_stream_shuffle_is_seeded_and_reseeded_by_set_epoch():
    stream = shuffle_dataset(_dataset(30, "z").to_iterable_dataset(num_shards=3), seed=7, buffer_size=8)
    stream.set_epoch(0)
    epoch0 = _answers(stream)
    assert _answers(stream) == epoch0 and sorted(epoch0) == sorted(f"z{i}" for i in range(30))
    assert epoch0 != [f"z{i}" for i in range(30)]
    stream.set_epoch(1)
    epoch1 = _answers(stream)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    mapped = shuffle_dataset(_dataset(30, "z"), seed=7)
    assert _answers(mapped) == _answers(shuffle_dataset(_dataset(30, "z"), seed=7)) != [f"z{i}" for i in range(30)]


# ---- ranks must agree on the configs they loaded ---------------------------------------------------------------


def test_check_ranks_agree_names_the_config_and_the_ranks():
    check_ranks_agree([(["a", "b"], []), (["a", "b"], [])], "root")
    check_ranks_agree([(["a"], ["b: OSError: x"]), (["a"], ["b: OSError: x"])], "root")  # failed everywhere: fine
    with pytest.raises(ValueError) as err:
        check_ranks_agree([(["a", "b"], []), (["a"], ["b: ConnectionError: 503"]), (["a", "b"], []), (["a"], [])], "root")
    assert str(err.value) == (
        "--dataset_configs: 'b' of 'root' loaded on rank(s) [0, 2] but failed on rank(s) [1, 3] (b: ConnectionError: "
        "503); every rank must load the same configs, or rows are duplicated and lost: fix the error and restart, "
        "or leave the config out of --dataset_configs."
    )


def test_a_config_failing_on_one_of_two_processes_stops_both_with_one_error(data_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "dist_configs_script.py"), str(tmp_path), str(data_root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    expected = (
        f"ValueError: --dataset_configs: 'b' of {str(data_root)!r} loaded on rank(s) [0] but failed on rank(s) [1] "
        "(b: ConnectionError: 503 from the hub (transient)); every rank must load the same configs"
    )
    assert all(r.startswith(expected) and "\n" not in r for r in results), results
