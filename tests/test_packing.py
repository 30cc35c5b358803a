"""Tests for nanovlm.data.packing: the pure packers and the resumable PackedDataset; and bench/nanovlm_packer.py's
nanoVLM baseline packer and fill measurement, which the packer is compared with."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from nanovlm.data.knapsack import _worst_fit_balanced, balanced_groups, knapsack_pack
from nanovlm.data.packing import Measured, PackedDataset, combine_pack_states


def _bench_baselines():
    """bench/nanovlm_packer.py: the nanoVLM baseline packer and the fill measure, which only bench/ ships."""
    path = Path(__file__).resolve().parent.parent / "bench" / "nanovlm_packer.py"
    spec = importlib.util.spec_from_file_location("bench_nanovlm_packer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_baselines = _bench_baselines()
group_lengths = _baselines.group_lengths
nanovlm_balanced_greedy = _baselines.nanovlm_balanced_greedy
real_token_fraction = _baselines.real_token_fraction

# ---------------------------------------------------------------------------------------------------------------
# Pure packer


def _random_items(rng: random.Random) -> tuple[list[int], list[int], int, int | None]:
    seq_length = rng.choice([16, 64, 257, 4096])
    max_images = rng.choice([None, 0, 1, 3, 18])
    n = rng.choice([0, 1, 2, 7, 40, 150])
    shape = rng.choice(["uniform", "small", "large", "bimodal"])
    lengths = []
    for _ in range(n):
        if shape == "uniform":
            lengths.append(rng.randint(1, seq_length))
        elif shape == "small":
            lengths.append(rng.randint(1, max(1, seq_length // 8)))
        elif shape == "large":
            lengths.append(rng.randint(seq_length // 2, seq_length))
        else:
            lengths.append(
                rng.choice([rng.randint(1, max(1, seq_length // 10)), rng.randint(seq_length // 2, seq_length)])
            )
    top = 4 if max_images is None else min(4, max_images)
    images = [rng.randint(0, top) for _ in range(n)]
    return lengths, images, seq_length, max_images


def _check_groups(groups, lengths, images, seq_length, max_images) -> None:
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths))), "every item exactly once"
    for g in groups:
        assert g, "no empty group"
        assert sum(lengths[i] for i in g) <= seq_length
        if max_images is not None:
            assert sum(images[i] for i in g) <= max_images


def test_knapsack_pack_random_properties_and_beats_nanovlm():
    rng = random.Random(1234)
    for _ in range(400):
        lengths, images, seq_length, max_images = _random_items(rng)
        groups = knapsack_pack(lengths, images, seq_length, max_images)
        _check_groups(groups, lengths, images, seq_length, max_images)
        assert knapsack_pack(lengths, images, seq_length, max_images) == groups, "deterministic"
        base, dropped = nanovlm_balanced_greedy(lengths, images, seq_length, max_images)
        assert dropped == []
        _check_groups(base, lengths, images, seq_length, max_images)
        assert len(groups) <= len(base)
        nanovlm_count = -(-sum(lengths) // seq_length) + 5
        assert _worst_fit_balanced(lengths, images, seq_length, max_images, nanovlm_count) == base, "same as nanoVLM"
        ours = group_lengths(groups, lengths)
        # ours, rows padded to the longest row of batches of 2, vs nanoVLM, every row padded to seq_length
        assert real_token_fraction(ours, 2) >= real_token_fraction(group_lengths(base, lengths), 1, seq_length)
        assert real_token_fraction(ours, 1, seq_length) >= real_token_fraction(
            group_lengths(base, lengths), 1, seq_length
        )


def test_knapsack_pack_reaches_lower_bound_on_easy_inputs():
    assert knapsack_pack([3, 3, 2, 2, 1, 1], [0] * 6, 6, None) == [[0, 1], [2, 3, 4, 5]]
    # the image cap binds: 6 items of 1 image, 2 per pack -> 3 packs although the tokens fit one
    groups = knapsack_pack([1] * 6, [1] * 6, 100, 2)
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    assert knapsack_pack([], [], 8, 2) == []


def test_knapsack_pack_errors_name_index_value_and_limit():
    with pytest.raises(ValueError, match=r"item 2 has length 9, outside \[1, seq_length=8\]"):
        knapsack_pack([1, 8, 9], [0, 0, 0], 8, None)
    with pytest.raises(ValueError, match=r"item 0 has length 0"):
        knapsack_pack([0], [0], 8, None)
    with pytest.raises(ValueError, match=r"item 1 has 5 images, outside \[0, max_images=4\]"):
        knapsack_pack([1, 1], [0, 5], 8, 4)
    with pytest.raises(ValueError, match=r"2 lengths and 1 image counts"):
        knapsack_pack([1, 1], [0], 8, 4)
    with pytest.raises(ValueError, match=r"seq_length must be a positive int; got 0"):
        knapsack_pack([1], [0], 0, None)


def test_nanovlm_balanced_greedy_reports_dropped_items():
    # 3 items of 6 into ceil(18/8) + 0 = 3 packs... with overflow="drop" and a cap of 1 image, the 2-image item and
    # the 10-token item cannot go anywhere
    groups, dropped = nanovlm_balanced_greedy([6, 10, 6, 6], [0, 0, 2, 0], 8, 1, delta=0, overflow="drop")
    assert sorted(dropped) == [1, 2]
    assert sorted(i for g in groups for i in g) == [0, 3]
    # nanoVLM opens ceil(total / L) + delta packs and uses all of them before anything else
    groups, dropped = nanovlm_balanced_greedy([1] * 4, [0] * 4, 8, None, delta=5)
    assert len(groups) == 4 and dropped == []
    with pytest.raises(ValueError, match="overflow must be 'new_bin' or 'drop'"):
        nanovlm_balanced_greedy([1], [0], 8, None, overflow="spill")


def test_knapsack_pack_at_scale_places_every_item_once_within_both_caps():
    """20,000 FineVision-like items (the recipe's buffer is 2048; its speed is bench/packing.py's to measure)."""
    rng = random.Random(0)
    lengths = [min(4096, int(rng.lognormvariate(6.3, 0.9)) + 1) for _ in range(20_000)]
    images = [rng.choice([0, 1, 1, 1, 2, 4]) for _ in lengths]
    groups = knapsack_pack(lengths, images, 4096, 18)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in g) for g in groups) <= 4096
    assert max(sum(images[i] for i in g) for g in groups) <= 18
    lower_bound = max(math.ceil(sum(lengths) / 4096), math.ceil(sum(images) / 18))
    assert len(groups) <= lower_bound * 1.03  # 3982 packs against a lower bound of 3891 (2.3% above) today


def test_real_token_fraction():
    assert real_token_fraction([4, 2, 3], batch_size=2) == pytest.approx(9 / (4 * 2 + 3))
    assert real_token_fraction([4, 2, 3], batch_size=1, pad_to_length=8) == pytest.approx(9 / 24)
    assert real_token_fraction([4, 2], batch_size=2, pad_to_multiple_of=8) == pytest.approx(6 / 16)
    assert real_token_fraction([]) == 1.0
    with pytest.raises(ValueError, match="more than pad_to_length=3"):
        real_token_fraction([4], pad_to_length=3)


# ---------------------------------------------------------------------------------------------------------------
# PackedDataset


def _sample(idx: int, length: int, n_images: int) -> dict:
    ids = torch.full((length,), idx, dtype=torch.long)
    pixels = torch.full((n_images, 3, 2, 2), float(idx)) if n_images else None
    return {"input_ids": ids, "labels": ids.clone(), "pixel_values": pixels, "n_images": n_images, "extra": "x"}


class MapSource:
    """Map-style source: sample i has a length and image count drawn from i; every 7th is skipped (None)."""

    def __init__(self, n: int, max_length: int = 40, permute_per_epoch: bool = False) -> None:
        self.n, self.max_length, self.permute = n, max_length, permute_per_epoch
        self.order = list(range(n))
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)
        if self.permute:
            self.order = list(range(self.n))
            random.Random(epoch).shuffle(self.order)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict | None:
        idx = self.order[i]
        if idx % 7 == 3:
            return None
        rng = random.Random(idx)
        return _sample(idx, rng.randint(1, self.max_length), rng.choice([0, 1, 1, 2]))


class IterSource:
    """Plain iterable over the same samples as MapSource (re-iterable, picklable)."""

    def __init__(self, n: int) -> None:
        self.inner = MapSource(n)

    def __iter__(self):
        return (self.inner[i] for i in range(self.inner.n))


class StrideSource(IterSource):
    """Source with the iter_from(start, stride) protocol."""

    def iter_from(self, start: int, stride: int):
        return (self.inner[i] for i in range(start, self.inner.n, stride))


def _ids(pack: dict) -> tuple[int, ...]:
    return tuple(int(s["input_ids"][0]) for s in pack["samples"])


def _identity(batch):
    return batch


def _make(source=None, **kwargs) -> PackedDataset:
    options = {"seq_length": 64, "max_images_per_pack": 3, "buffer_size": 16, "seed": 7}
    options.update(kwargs)
    return PackedDataset(MapSource(100) if source is None else source, **options)


def _valid_ids(n: int) -> list[int]:
    return [i for i in range(n) if i % 7 != 3]


def test_one_pass_packs_every_sample_once_within_caps():
    packs = list(_make())
    assert sorted(i for p in packs for i in _ids(p)) == _valid_ids(100)
    for p in packs:
        assert sum(len(s["input_ids"]) for s in p["samples"]) <= 64
        assert sum(s["n_images"] for s in p["samples"]) <= 3
        assert set(p["state"]) == {"worker", "num_workers", "epoch", "round_start", "packs_done"}
    assert [_ids(p) for p in _make()] == [_ids(p) for p in packs], "deterministic"
    assert [_ids(p) for p in _make(seed=8)] != [_ids(p) for p in packs], "the seed shuffles pack order"


def test_map_iterable_and_stride_sources_give_the_same_packs():
    reference = [_ids(p) for p in _make()]
    assert [_ids(p) for p in _make(IterSource(100))] == reference
    assert [_ids(p) for p in _make(StrideSource(100))] == reference


@pytest.mark.parametrize("source_cls", [MapSource, IterSource])
def test_state_dict_round_trip_num_workers_0(source_cls):
    reference = [_ids(p) for p in _make(source_cls(100))]
    for k in [0, 1, 5, 11, len(reference) - 1, len(reference)]:
        dataset = _make(source_cls(100))
        it = iter(dataset)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(dataset.state_dict()))  # JSON-serializable
        resumed = _make(source_cls(100))
        resumed.load_state_dict(state)
        assert [_ids(p) for p in resumed] == reference[k:], f"resume after {k} packs"


def test_resume_from_a_single_pack_state():
    packs = list(_make())
    resumed = _make()
    resumed.load_state_dict(packs[4]["state"])
    assert [_ids(p) for p in resumed] == [_ids(p) for p in packs[5:]]


def _loader(dataset: PackedDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=_identity)


def test_two_workers_lose_nothing_and_resume_exactly():
    reference = [[_ids(p) for p in batch] for batch in _loader(_make(MapSource(160)))]
    assert sorted(i for batch in reference for pack in batch for i in pack) == _valid_ids(160)
    workers = {}
    for batch in _loader(_make(MapSource(160))):
        workers.setdefault(batch[0]["state"]["worker"], set()).update(i for p in batch for i in _ids(p))
    assert sorted(workers) == [0, 1] and not workers[0] & workers[1]

    for k in [1, 4]:  # stop after an odd and an even number of batches
        state = None
        for step, batch in enumerate(_loader(_make(MapSource(160)))):
            if step == k:
                break
            state = combine_pack_states([p["state"] for p in batch], state)
        assert state["num_workers"] == 2 and state["next_worker"] == k % 2
        resumed = _make(MapSource(160))
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert [[_ids(p) for p in batch] for batch in _loader(resumed)] == reference[k:]


def test_state_from_other_worker_count_is_refused():
    two_worker_state = combine_pack_states(
        [{"worker": 0, "num_workers": 2, "epoch": 0, "round_start": 16, "packs_done": 0}]
    )
    dataset = _make()
    dataset.load_state_dict(two_worker_state)
    with pytest.raises(ValueError, match=r"recorded with 2 DataLoader worker\(s\).* this iteration runs 1"):
        next(iter(dataset))
    with pytest.raises(ValueError, match="does not say where the other workers were"):
        _make().load_state_dict(two_worker_state["workers"]["0"])
    with pytest.raises(ValueError, match="combine the states of one DataLoader only"):
        combine_pack_states(
            [{"worker": 0, "num_workers": 1, "epoch": 0, "round_start": 0, "packs_done": 1}], two_worker_state
        )


def test_infinite_epochs_reshuffle_and_resume():
    source = MapSource(60, permute_per_epoch=True)
    dataset = _make(source, infinite=True)
    valid = _valid_ids(60)
    epochs, current, count = [], [], 0
    for pack in dataset:
        current.append(_ids(pack))
        count += len(pack["samples"])
        if count == len(valid):
            epochs.append(current)
            current, count = [], 0
            if len(epochs) == 3:
                break
    for epoch in epochs:
        assert sorted(i for pack in epoch for i in pack) == valid
    assert epochs[0] != epochs[1] != epochs[2]
    assert source.epochs_seen[:3] == [0, 1, 2]
    assert dataset.state_dict()["workers"]["0"]["epoch"] == 3, "the last pack of an epoch points to the next one"

    resumed = _make(MapSource(60, permute_per_epoch=True), infinite=True)
    resumed.load_state_dict(dataset.state_dict())
    again = _make(MapSource(60, permute_per_epoch=True), infinite=True)
    again.set_epoch(3)
    first = [_ids(p) for _, p in zip(range(5), resumed)]
    assert first == [_ids(p) for _, p in zip(range(5), again)]


def test_set_epoch_moves_only_workers_behind():
    dataset = _make(infinite=False)
    packs = list(dataset)
    dataset.set_epoch(1)
    assert all(p["state"]["epoch"] == 1 for p in dataset)
    late = _make()
    late.load_state_dict(packs[2]["state"])
    late.set_epoch(0)  # Trainer calls set_epoch(0) on resume: the loaded position stays
    assert [_ids(p) for p in late] == [_ids(p) for p in packs[3:]]


def test_dataset_rejects_oversized_samples_and_bad_arguments():
    with pytest.raises(ValueError, match=r"has 40 tokens, more than seq_length=30"):
        list(_make([_sample(0, 40, 0)], seq_length=30))
    with pytest.raises(ValueError, match=r"has 2 images, more than max_images_per_pack=1"):
        list(_make([_sample(0, 4, 2)], max_images_per_pack=1))
    with pytest.raises(ValueError, match="buffer_size must be a positive int; got 0"):
        _make(buffer_size=0)
    with pytest.raises(ValueError, match="worker 0 of 1 read no usable sample in epoch 0"):
        next(iter(_make([None, None], infinite=True)))
    with pytest.raises(TypeError, match="source of type int is not readable"):
        PackedDataset(3, seq_length=8)


# ---------------------------------------------------------------------------------------------------------------
# Balanced batches (pack_cost, balance_group)


class MeasuredTiles:
    """A measuring source: row i is `lengths[i]` tokens with `tiles[i]` tiles (one image when it has tiles)."""

    def __init__(self, lengths: list[int], tiles: list[int]) -> None:
        self.rows = list(zip(lengths, tiles))

    def measure_from(self, start: int, stride: int):
        for i in range(start, len(self.rows), stride):
            length, tiles = self.rows[i]
            yield Measured(length, int(tiles > 0), tiles, i)

    def build_measured(self, item: Measured) -> dict:
        return {"id": item.key, "length": item.length, "tiles": item.n_tiles}


def _tile_workload(n: int = 600, seed: int = 0) -> MeasuredTiles:
    rng = random.Random(seed)
    tiles = [rng.choice([0, 0, 1, 5, 10, 17]) for _ in range(n)]
    return MeasuredTiles([t * 16 + rng.randint(8, 120) for t in tiles], tiles)


def _cost(tokens: int, tiles: int) -> float:
    return tokens + 50.0 * tiles  # a tile costs as much as 50 tokens


def _pack_cost(pack: dict) -> float:
    return _cost(sum(s["length"] for s in pack["samples"]), sum(s["tiles"] for s in pack["samples"]))


def test_balanced_groups_deal_heavy_with_light_in_groups_of_the_given_size():
    assert balanced_groups([5, 1, 4, 2, 3, 3], 2) == [[0, 1], [2, 3], [4, 5]]
    groups = balanced_groups([9, 8, 7, 6, 5, 4, 3, 2, 1], 3)
    assert sorted(i for g in groups for i in g) == list(range(9)) and [len(g) for g in groups] == [3, 3, 3]
    assert sorted(sum(9 - i for i in g) for g in groups) == [14, 15, 16]  # serpentine: 9+4+3, 8+5+2, 7+6+1
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        balanced_groups([1.0], 0)


def test_balance_group_evens_each_batch_cost_and_keeps_every_sample_and_resume():
    plain = PackedDataset(_tile_workload(), seq_length=512, buffer_size=200, seed=3)
    balanced = PackedDataset(_tile_workload(), seq_length=512, buffer_size=200, seed=3, pack_cost=_cost,
                             balance_group=2)
    plain_packs, packs = list(plain), list(balanced)
    assert sorted(s["id"] for p in packs for s in p["samples"]) == list(range(600))  # nothing lost or repeated
    assert len(packs) % 2 == 0  # each round's pack count made a multiple of the batch size

    def spread(ps):  # max/mean of the batch costs of consecutive pairs
        costs = [_pack_cost(a) + _pack_cost(b) for a, b in zip(ps[0::2], ps[1::2])]
        return max(costs) / (sum(costs) / len(costs))

    assert spread(packs) < 1.2 < spread(plain_packs)
    for k in (1, 4, len(packs) // 2):  # resume is exact after any pack
        resumed = PackedDataset(_tile_workload(), seq_length=512, buffer_size=200, seed=3, pack_cost=_cost,
                                balance_group=2)
        resumed.load_state_dict(packs[k - 1]["state"])
        assert [[s["id"] for s in p["samples"]] for p in resumed] == [[s["id"] for s in p["samples"]] for p in packs[k:]]
    with pytest.raises(ValueError, match="balance_group must be a positive int"):
        PackedDataset(_tile_workload(), seq_length=512, balance_group=0)
