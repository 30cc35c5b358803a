"""A user's own data through train_accelerate.py: the layouts README's "Data" section accepts, and the mistakes that
used to train on the wrong rows or crash with a traceback, each now a working run or one line naming the flag.

The data is small generated FineVision-schema rows (synthetic images, 32 px) written as files the way a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from test_entry_errors import error_lines, run_entry

from nanovlm.data.sources import load_finevision


def _errors(proc) -> list[str]:
    """`error_lines` less `datasets`' progress lines for a first read of data files (Generating ..., Map ...)."""
    return [line for line in error_lines(proc) if not line.startswith(("Generating ", "Map"))]

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["images", "texts", "relevance_ratings", "image_correspondence_ratings", "visual_dependency_ratings",
           "formatting_ratings"]
RUN = ["--synthetic_dataset", "false", "--curriculum_split", "none", "--dataloader_num_workers", "0",
       "--logging_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_strategy", "no",
       "--disable_tqdm", "true"]


def _rows(n: int, seed: int) -> datasets.Dataset:
    from nanovlm.data.synthetic import SyntheticConfig, generate_split

    rows = generate_split(n, "train", seed=seed, config=SyntheticConfig(image_size=32)).select_columns(COLUMNS)
    return rows.cast_column("images", datasets.List(datasets.Image(decode=False)))


def _json_with_image_files(rows: datasets.Dataset, folder: Path, name: str, relative: bool = True) -> Path:
    """`rows` as a JSON array in `folder`/`name` whose images are PNG files under `folder`/img, by relative path
    (relative to the JSON file) or absolute path."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i, row in enumerate(rows):
        paths = []
        for k, image in enumerate(row["images"]):
            (folder / "img" / f"{i}_{k}.png").write_bytes(image["bytes"])
            paths.append(f"img/{i}_{k}.png" if relative else str(folder / "img" / f"{i}_{k}.png"))
        records.append({**{c: row[c] for c in COLUMNS if c != "images"}, "images": paths})
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    """root/one.parquet (12 rows), root/configs/{a: a save_to_disk Dataset (12 rows), b: a folder with a JSON array
    whose images are files relative to it (8 rows)}, root/js/rows.jsonl (relative image paths, 8 rows),
    root/json_configs/{c1: a JSON array, c2: a JSONL; 6 rows each, relative image paths}."""
    root = tmp_path_factory.mktemp("user_data")
    rows = _rows(12, seed=3)
    rows.to_parquet(str(root / "one.parquet"))
    rows.save_to_disk(str(root / "configs" / "a"))
    _json_with_image_files(_rows(8, seed=4), root / "configs" / "b", "rows.json")
    _json_with_image_files(_rows(8, seed=5), root / "js", "rows.jsonl")
    _json_with_image_files(_rows(6, seed=6), root / "json_configs" / "c1", "rows.json")
    _json_with_image_files(_rows(6, seed=7), root / "json_configs" / "c2", "rows.jsonl")
    return root


def test_relative_image_paths_of_a_json_file_are_read_from_its_folder(user_data, tmp_path, monkeypatch):
    """They were read from the working directory: every row of a JSONL written next to its img/ folder was skipped
    as bad_image unless training ran from that folder."""
    monkeypatch.chdir(tmp_path)  # anywhere but the data's folder
    folder = (user_data / "js").resolve()
    for streaming in (False, True):
        ds = load_finevision(user_data / "js" / "rows.jsonl", streaming=streaming)
        first = next(iter(ds))
        assert first["images"] == [str(folder / "img" / "0_0.png")] + ([] if len(first["images"]) == 1 else
                                                                        [str(folder / "img" / "0_1.png")])
    ds = load_finevision(user_data / "configs", configs=["b"])  # a folder of JSON files
    assert ds[0]["images"][0] == str((user_data / "configs" / "b" / "img" / "0_0.png").resolve())
    absolute = _json_with_image_files(_rows(2, seed=6), tmp_path / "abs", "rows.jsonl", relative=False)
    assert load_finevision(absolute)[1]["images"][0] == str(tmp_path / "abs" / "img" / "1_0.png")  # kept as given


def test_streamed_configs_all_with_a_json_config_train_every_row(user_data, tmp_path):
    """(Configs of image files and of image paths cannot be combined: one line naming both features.)
    `--dataset_configs all` was passed on as the list ['all'] and looked for a config folder named "all"; a
    streamed JSON array (features unknown until read) crashed SampleStream with datasets' "Features decoding is only
    available for datasets with known features"; its relative image paths were read from the working directory."""
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path",
                      str(user_data / "json_configs"), "--dataset_configs", "all", "--streaming", "true",
                      "--dataloader_num_workers", "2", "--eval_split", "none", "--val_size", "2", "--max_steps", "2"],
                     timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "(config 'c1') (streaming)" in log and "(config 'c2') (streaming)" in log
    assert "'data/skipped_total': '0'" in log and "data/skipped/" not in log  # no image missing, no row skipped


@pytest.mark.parametrize("source", ["one.parquet", "configs/a"])
def test_an_eval_split_of_a_single_split_source_is_one_line(user_data, tmp_path, source):
    """Data files and a save_to_disk Dataset hold one split, which datasets returned under any split name: the
    demo's --eval_split validation validated on the training rows without a word."""
    path = user_data / source
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(path),
                      "--eval_split", "validation", "--max_steps", "1"])
    assert proc.returncode == 1
    assert _errors(proc) == [
        f"train_accelerate.py: error: --eval_split validation: --dataset_name_or_path {path} holds one split (data "
        "files or a saved Dataset: all training rows); use --eval_split none with --val_size N to hold out N rows "
        "(and --curriculum_split none), or a DatasetDict folder or a folder whose file names give the splits "
        "(train-*.parquet, validation-*.parquet)"
    ]


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_val_size_over_the_rows_is_one_line(user_data, tmp_path, streaming):
    """The demo's --val_size 300 on a user's 12 rows ended in a traceback."""
    path = user_data / "one.parquet"
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(path),
                      "--eval_split", "none", "--val_size", "300", "--streaming", streaming, "--max_steps", "1"])
    assert proc.returncode == 1
    what = "stream's" if streaming == "true" else "dataset's"
    assert _errors(proc) == [
        f"train_accelerate.py: error: --val_size 300 (--dataset_name_or_path {path}): val_size=300 must be smaller "
        f"than the {what} 12 rows: lower --val_size."
    ]


def test_rows_evaluation_skips_are_its_own_and_counted_per_evaluation(tmp_path):
    """Without DataLoader workers the training and evaluation datasets shared one skip counter: a corrupt validation
    image showed up in the training's data/skipped_* (and not with workers), and evaluation's skips were never
    reported. Now training counts its own rows and every evaluation reports its own (eval_skipped_*)."""
    rows = _rows(14, seed=8)
    truncated = {**rows[0], "images": [{"bytes": rows[0]["images"][0]["bytes"][:60], "path": None}]}
    validation = datasets.concatenate_datasets([rows.select(range(12, 14)), datasets.Dataset.from_list(
        [truncated], features=rows.features)])
    datasets.DatasetDict({"train": rows.select(range(12)), "validation": validation}).save_to_disk(tmp_path / "data")
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(tmp_path / "data"),
                      "--eval_split", "validation", "--eval_strategy", "steps", "--eval_steps", "1",
                      "--max_steps", "2"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("'data/skipped_total': '0'") == 2 and "data/skipped/" not in log  # training: nothing skipped
    assert log.count("'eval_skipped_total': '1', 'eval_skipped/bad_image': '1'") == 2  # each evaluation: its one row


def test_turns_the_rating_filter_drops_from_kept_rows_are_logged(tmp_path):
    """A row keeps its turns over the --min_*_rating thresholds; the dropped turns were counted by the sample builder
    but reported nowhere (only rows losing every turn showed, as a skip): a filter that cut half the answers of the
    data trained without a trace in the logs."""
    rows = _rows(12, seed=9).map(lambda row: {
        "texts": [row["texts"][0], {"user": "And again?", "assistant": "no"}],
        **{c: [5, 1 if c == "relevance_ratings" else 5] for c in COLUMNS[2:]},
    })
    rows.save_to_disk(tmp_path / "data")
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(tmp_path / "data"),
                      "--eval_split", "none", "--val_size", "0", "--min_relevance_rating", "2",
                      "--per_device_train_batch_size", "1", "--max_steps", "1"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # the first pack comes after the first round measured every row of the epoch: 12 rows, one turn dropped from each
    assert "'data/turns_dropped_by_rating': '12', 'data/skipped_total': '0'" in log


def _epoch_with_workers(data: Path, tmp_path: Path, workers: int, streaming: str) -> tuple[list[str], dict]:
    """(the texts of every sample of epoch 0, the skip counts summed over workers) of the entry point's training
    data read through a DataLoader with `workers` workers, as the trainer reads it."""
    from torch.utils.data import DataLoader

    from nanovlm.training.build import build_datasets, build_model_and_processor, load_rows
    from nanovlm.training.parser import parse_args

    model_args, data_args, training_args = parse_args([
        "--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(tmp_path), "--dataset_name_or_path",
        str(data), "--synthetic_dataset", "false", "--curriculum_split", "none", "--eval_split", "none",
        "--val_size", "0", "--min_relevance_rating", "2", "--dataloader_num_workers", str(workers),
        "--streaming", streaming,
    ])
    train_rows, _ = load_rows(data_args, training_args)
    model, processor = build_model_and_processor(model_args, train_rows)
    train, _, _ = build_datasets(data_args, training_args, processor, train_rows, None, model_config=model.config)
    texts, counts, done = [], {}, set()
    for pack in DataLoader(train, batch_size=None, num_workers=workers):
        worker = pack["state"]["worker"]
        if worker in done:  # this worker is in epoch 1 already
            continue
        texts += [processor.tokenizer.decode(s["input_ids"]) for s in pack["samples"]]
        counts[worker] = pack["skipped"]["counts"]
        if pack["state"]["epoch"] == 1:  # its last pack of epoch 0
            done.add(worker)
        if len(done) == max(1, workers):
            break
    total: dict[str, int] = {}
    for worker_counts in counts.values():
        for reason, n in worker_counts.items():
            total[reason] = total.get(reason, 0) + n
    return sorted(texts), total


def test_two_workers_map_style_and_streaming_use_every_row_once_or_count_it(tmp_path):
    """The bad and odd rows of test_bad_rows_accounting (there read map-style without workers) with 2 DataLoader
    workers, map-style and streamed: the same samples, each once, and the same skips by reason."""
    from collections import Counter

    from test_bad_rows_accounting import GOOD_ROWS, _features, bad_and_odd_rows

    rows, _ = bad_and_odd_rows()
    good = _rows(GOOD_ROWS, seed=0).cast(_features())
    bad = datasets.Dataset.from_list([row for row, _ in rows.values()], features=_features())
    datasets.concatenate_datasets([good, bad]).save_to_disk(tmp_path / "data")
    expected = dict(Counter(reason for _, reason in rows.values() if reason))
    trained = GOOD_ROWS + sum(1 for _, reason in rows.values() if reason is None)
    map_texts, map_skips = _epoch_with_workers(tmp_path / "data", tmp_path / "m", 2, "false")
    stream_texts, stream_skips = _epoch_with_workers(tmp_path / "data", tmp_path / "s", 2, "true")
    assert map_skips == stream_skips == expected
    assert len(map_texts) == trained and map_texts == stream_texts


def test_configs_of_image_data_and_of_image_paths_name_the_differing_column(user_data, tmp_path):
    """The error printed both configs' whole features (thousands of characters) and a Python-only fix (columns=)."""
    path = user_data / "configs"
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path", str(path),
                      "--dataset_configs", "a", "b", "--eval_split", "none", "--val_size", "2", "--max_steps", "1"])
    assert proc.returncode == 1
    assert _errors(proc) == [
        f"train_accelerate.py: error: --dataset_name_or_path {path} (--dataset_configs ['a', 'b'], split 'train'): "
        f"The configs of '{path}' cannot be combined: their columns differ (images: a List(Image(mode=None, "
        "decode=False)), b List(Value('string'))). Give every config the same columns and types (e.g. images stored "
        "as image data in all of them, or as file paths in all), or list only compatible ones in --dataset_configs "
        "(configs=...)."
    ]


def test_a_config_named_twice_or_an_eval_split_equal_to_the_train_split_is_refused(user_data, tmp_path):
    """`--dataset_configs a a` loaded `a` twice (every row read twice per epoch) and `--eval_split train` validated on
    the training rows, both without a word."""
    proc = run_entry([*RUN, "--output_dir", str(tmp_path / "out"), "--dataset_name_or_path",
                      str(user_data / "configs"), "--dataset_configs", "a", "b", "a", "--eval_split", "train"])
    assert proc.returncode == 1
    assert _errors(proc) == [
        "train_accelerate.py: error: 2 invalid arguments:",
        "  --eval_split must differ from --train_split (validation on the training rows): got 'train'; use "
        "--eval_split none with --val_size N to hold out N rows",
        "  --dataset_configs lists a more than once: name each config once",
    ]
