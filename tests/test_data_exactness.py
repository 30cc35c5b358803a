"""Every row exactly once per epoch, through the data builders (`load_rows` -> `build_datasets`), over 1, 2 and 4
ranks x 0-3 DataLoader workers, for save_to_disk, parquet and streaming sources, with a config that fails on every
rank and a corrupt shard; exact resume at every batch boundary with real DataLoader workers; and a streaming
run's held-out rows (--val_size): the first val_size rows in every layout, disjoint from training, together complete.

Ranks are simulated without processes (each rank's builders get its process_index / world_size), and workers by
giving `PackedDataset` the worker id a DataLoader would (`get_worker_info`): readers choose rows by their logical
worker, so this is what a worker process reads. The 2-process check of the rank-agreement error is in
test_data_sources.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import datasets.config
import pytest
import torch
from datasets import Dataset
from PIL import Image
from torch.utils.data import DataLoader

import nanovlm.data.packing as packing
from nanovlm.data.collator import BOOKKEEPING_KEY
from nanovlm.data.packing import combine_pack_states
from nanovlm.data.samples import IGNORE_INDEX
from nanovlm.training.arguments import DataArguments
from nanovlm.training.build import build_datasets, load_rows, warn_stream_read_factor


def _rows(tag: str, n: int) -> Dataset:
    """n rows answering f"{tag}{i}"; every other row has one small image."""
    return Dataset.from_dict(
        {
            "images": [[Image.new("RGB", (12, 8), (i * 30 % 255, 9, 9))] if i % 2 else [] for i in range(n)],
            "texts": [[{"user": "Which row?", "assistant": f"{tag}{i}"}] for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """a: save_to_disk (18 rows); b: 3 parquet files (15 rows); c: 2 good parquet files (10 rows) and one corrupt
    (its 5 rows unreadable; parquet checks only the first file's schema when loading a stream); bad: no data."""
    root = tmp_path_factory.mktemp("exact")
    _rows("a", 18).save_to_disk(str(root / "a"))
    for tag, n in (("b", 15), ("c", 15)):
        (root / tag).mkdir()
        rows = _rows(tag, n)
        for k in range(3):
            rows.select(range(5 * k, 5 * k + 5)).to_parquet(str(root / tag / f"part-{k}.parquet"))
    (root / "c" / "part-1.parquet").write_bytes((root / "c" / "part-1.parquet").read_bytes()[:-40])  # truncated
    (root / "bad").mkdir()
    return root


SOURCES = {  # name: (streaming, configs, the rows one epoch must hold)
    "save_to_disk": (False, ["a", "bad"], [f"a{i}" for i in range(18)]),
    "parquet": (False, ["b", "bad"], [f"b{i}" for i in range(15)]),
    "streaming": (True, ["a", "b", "c", "bad"], [f"a{i}" for i in range(18)] + [f"b{i}" for i in range(15)]
                  + [f"c{i}" for i in (*range(5), *range(10, 15))]),
}


def _build(root, processor, streaming, configs, rank, world, workers):
    data_args = DataArguments(
        dataset_name_or_path=str(root), dataset_configs=configs, streaming=streaming, val_size=0, seq_length=96,
        max_sample_length=96, pack_buffer_size=4, max_images_per_knapsack=4,
    )
    training_args = SimpleNamespace(seed=0, process_index=rank, world_size=world, dataloader_num_workers=workers)
    rows, eval_rows = load_rows(data_args, training_args)
    train, _, collator = build_datasets(data_args, training_args, processor, rows, eval_rows)
    return train, collator


def _answer(processor, sample) -> str:
    labels = sample["labels"]
    return processor.tokenizer.decode(sample["input_ids"][labels != IGNORE_INDEX]).removesuffix("<|im_end|>")


def _epoch(train, worker: int, workers: int, monkeypatch) -> list[dict]:
    """The packs logical DataLoader worker `worker` of `workers` yields in epoch 0."""
    monkeypatch.setattr(packing, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    packs = []
    for pack in train:
        state = pack["state"]
        if state["epoch"] == 1 and (state["round_start"], state["packs_done"]) != (0, 0):
            return packs  # already a pack of epoch 1 (epoch 0's last round was full, so its end was not marked)
        packs.append(pack)
        if state["epoch"] == 1:  # the last pack of epoch 0 points to the start of epoch 1
            return packs
    raise AssertionError("an infinite training dataset ended")


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s after an interleaved stream of parquet files ends (an Arrow shutdown workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


COUNTS: dict[str, tuple[int, int, int]] = {}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("source", list(SOURCES))
def test_every_row_once_per_epoch_over_ranks_and_workers(root, tiny_processor, monkeypatch, caplog, source, world):
    streaming, configs, expected = SOURCES[source]
    for workers in range(4):
        seen: Counter[str] = Counter()
        bad_shards = 0
        for rank in range(world):
            train, _ = _build(root, tiny_processor, streaming, configs, rank, world, workers)
            for worker in range(max(1, workers)):
                for pack in _epoch(train, worker, max(1, workers), monkeypatch):
                    seen.update(_answer(tiny_processor, s) for s in pack["samples"])
            bad_shards += train.source.counter.reasons["bad_shard"]
        once = sum(1 for r in expected if seen[r] == 1)
        duplicated = sum(1 for r in expected if seen[r] > 1) + sum(1 for r in seen if r not in expected)
        lost = sum(1 for r in expected if seen[r] == 0)
        COUNTS[f"{source} {world} rank(s) x {workers} worker(s)"] = (once, duplicated, lost)
        assert (once, duplicated, lost) == (len(expected), 0, 0), f"{workers} workers: {seen}"
        assert bad_shards == (1 if streaming else 0), f"{workers} workers"  # c's corrupt file, counted once
    if streaming:
        assert any("(bad_shard): " in r.getMessage() and "(config 'c') shard 1: ArrowInvalid" in r.getMessage()
                   for r in caplog.records)


def test_the_read_factor_warning_states_the_extra_reading(caplog):
    caplog.set_level(logging.WARNING, logger="nanovlm.training.build")
    assert warn_stream_read_factor(32, 8, 4) == 1 and not caplog.records
    assert warn_stream_read_factor(3, 1, 4) == 4  # 3 shards, 4 workers: every worker reads all, keeps 1 in 4
    assert warn_stream_read_factor(8, 4, 3) == 3  # 2 shards per rank for 3 workers
    assert warn_stream_read_factor(6, 4, 1) == 4  # 6 % 4 != 0: every rank reads all, keeps 1 in 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "\n" not in messages[0]
    assert messages[0].startswith(
        "The training stream has 3 shard(s) for 1 rank(s) x 4 DataLoader worker(s): whole shards cannot go to "
        "every reader, so readers read shared shards and keep every k-th row; each row is read 4x from storage"
    )


def _batches(train, collator, workers: int, n: int) -> list[dict]:
    loader = DataLoader(train, batch_size=2, num_workers=workers, collate_fn=collator)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("an infinite training dataset ended")


@pytest.mark.parametrize(
    "source, workers, world",
    [("streaming", 2, 1), ("streaming", 3, 1), ("streaming", 3, 2)],  # map-style: tests/test_packing.py
)
def test_resume_is_exact_at_every_batch_boundary_with_workers(root, tiny_processor, source, workers, world):
    streaming, configs, _ = SOURCES[source]
    rank = world - 1
    n = 9  # beyond the end of epoch 0 for some workers, and every next worker (0, 1, 2) several times
    reference = _batches(*_build(root, tiny_processor, streaming, configs, rank, world, workers), workers, n)
    assert any(s["epoch"] == 1 for b in reference for s in b[BOOKKEEPING_KEY]["data_state"])
    for k in range(1, n):
        state = combine_pack_states(s for batch in reference[:k] for s in batch[BOOKKEEPING_KEY]["data_state"])
        train, collator = _build(root, tiny_processor, streaming, configs, rank, world, workers)
        train.load_state_dict(state)
        resumed = _batches(train, collator, workers, n - k)
        for want, got in zip(reference[k:], resumed):
            assert got[BOOKKEEPING_KEY]["data_state"] == want[BOOKKEEPING_KEY]["data_state"], f"resume after {k} batches"
            assert torch.equal(got["input_ids"], want["input_ids"]), f"resume after {k} batches"


def test_report_counts():
    """Prints the per-configuration counts (rows seen once / duplicated / lost) gathered above (`pytest -s`)."""
    for name, (once, duplicated, lost) in COUNTS.items():
        print(f"{name}: once {once}, duplicated {duplicated}, lost {lost}")


# ---- a streaming run's held-out rows (--val_size without --eval_split) ------------------------------------------
# Shard sizes: uneven, so that an even share of VAL_SIZE per reader would exceed some shard's rows; shard 0 keeps a
# training row, so that every reader (the one of shard 0 too) reads some training rows in every layout.
HELD_OUT_SHARDS = {
    1: [20],
    3: [12, 4, 5],
    4: [11, 3, 6, 4],
    8: [12, 1, 5, 3, 2, 6, 4, 3],
}
VAL_SIZE = 10


@pytest.fixture(scope="module")
def sharded_root(tmp_path_factory):
    """k{K}: K parquet files of HELD_OUT_SHARDS[K] text-only rows answering "r0", "r1", ... in file order."""
    root = tmp_path_factory.mktemp("held_out")
    for k, sizes in HELD_OUT_SHARDS.items():
        (root / f"k{k}").mkdir()
        rows = Dataset.from_dict({"images": [[]] * sum(sizes),
                                  "texts": [[{"user": "Which row?", "assistant": f"r{i}"}] for i in range(sum(sizes))]})
        for j, start in enumerate([sum(sizes[:j]) for j in range(len(sizes))]):
            rows.select(range(start, start + sizes[j])).to_parquet(str(root / f"k{k}" / f"part-{j}.parquet"))
    return root


def _held_out_build(root, processor, rank, world, workers):
    data_args = DataArguments(
        dataset_name_or_path=str(root), streaming=True, val_size=VAL_SIZE, seq_length=96, max_sample_length=96,
        pack_buffer_size=4, max_images_per_knapsack=4, stream_shuffle_buffer_size=4,
    )
    training_args = SimpleNamespace(seed=0, process_index=rank, world_size=world, dataloader_num_workers=workers)
    train, evaluation, _ = build_datasets(data_args, training_args, processor, *load_rows(data_args, training_args))
    return train, evaluation


@pytest.mark.parametrize("shards", list(HELD_OUT_SHARDS))
def test_streaming_val_rows_are_the_first_val_size_rows_in_every_layout(
    sharded_root, tiny_processor, monkeypatch, shards
):
    """Train and eval, read as the training loop reads them (every rank, every DataLoader worker; evaluation uses
    the same --dataloader_num_workers), are disjoint and complete, and eval is exactly the first --val_size rows."""
    rows = [f"r{i}" for i in range(sum(HELD_OUT_SHARDS[shards]))]
    for world in (1, 2):
        for workers in (0, 2, 4):
            train_seen: Counter[str] = Counter()
            val_seen: Counter[str] = Counter()
            for rank in range(world):
                train, evaluation = _held_out_build(sharded_root / f"k{shards}", tiny_processor, rank, world, workers)
                for worker in range(max(1, workers)):
                    for pack in _epoch(train, worker, max(1, workers), monkeypatch):
                        train_seen.update(_answer(tiny_processor, s) for s in pack["samples"])
                    val_seen.update(_answer(tiny_processor, s) for pack in evaluation for s in pack["samples"])
            layout = f"{shards} shard(s), {world} rank(s) x {workers} worker(s)"
            assert sorted(val_seen.elements()) == sorted(rows[:VAL_SIZE]), layout
            assert sorted(train_seen.elements()) == sorted(rows[VAL_SIZE:]), layout
