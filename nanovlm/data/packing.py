"""Sequence packing: a pure knapsack packer and the stateful packed iterable dataset around it.

What is here, and what is non-standard:

- The packer itself (`knapsack_pack`, `balanced_groups`) is pure and lives in `knapsack.py`; it is re-exported here.
- `PackedDataset` reads a source in rounds of `buffer_size` positions, packs each round on its own (no carry-over
  between rounds, so resuming is exact), shuffles the pack order with a seeded `random.Random`, and yields packs
  that each carry the state needed to resume right after them. With a *measuring* source (`measure_from`, see
  `Measured`) a round holds only each row's measures and what the source needs to build it later (a row index, or
  where a stream's undecoded row lies in its spill file): packing plans on the measures, and a pack's samples are
  built (images decoded and tiled) only when the pack is yielded. Host memory is then flat in `buffer_size`.

Pack format (what `PackedDataset` yields and `PackedCollator` consumes)::

    {"samples": [sample, ...], "state": {"worker": w, "num_workers": W, "epoch": e,
                                          "round_start": j, "packs_done": k}}

`state` is the position *after* this pack: re-read the round of worker `w` that starts at its local position `j`,
re-pack it (deterministic), skip its first `k` packs. Combine the states of the packs you consumed with
`combine_pack_states` and give the result to `PackedDataset.load_state_dict` to continue exactly after them.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

from torch.utils.data import IterableDataset, get_worker_info

from .knapsack import _split_to_multiple, balanced_groups, knapsack_pack  # the last two re-exported (__all__)

logger = logging.getLogger(__name__)

STATE_FORMAT = "nanovlm.PackedDataset/1"

__all__ = [
    "Measured",
    "NoSamplesError",
    "PackedDataset",
    "balanced_groups",
    "combine_pack_states",
    "knapsack_pack",
]


# In a pack's skip counts ("skipped": {"worker", "counts"}), the turns the rating filter dropped from kept rows: a
# count beside the skip reasons, not one of them (the trainer logs it as data/turns_dropped_by_rating).
TURNS_DROPPED_KEY = "turns_dropped_by_rating"


class NoSamplesError(ValueError):
    """A whole epoch of an infinite PackedDataset gave no sample (every row empty or skipped): looping on would spin
    forever without yielding."""


class Measured(NamedTuple):
    """A row measured but not built: what the packer plans with, and the key its source builds it from.

    `length` is the exact token count of the sample the row becomes, `n_images` its images, `n_tiles` its image tiles
    (global views included); `key` is the source's own handle (a row index, or where a stream's row was spilled).
    """

    length: int
    n_images: int
    n_tiles: int
    key: Any


def _worker_state(worker: int, num_workers: int, epoch: int, round_start: int, packs_done: int) -> dict[str, int]:
    return {
        "worker": worker,
        "num_workers": num_workers,
        "epoch": epoch,
        "round_start": round_start,
        "packs_done": packs_done,
    }


def _empty_state() -> dict[str, Any]:
    return {"format": STATE_FORMAT, "num_workers": None, "next_worker": 0, "epoch": 0, "workers": {}}


def _fold(state: dict[str, Any], pack_state: Mapping[str, int]) -> None:
    """Record one consumed pack's state in a dataset state, in place."""
    num_workers = pack_state["num_workers"]
    if state["num_workers"] is not None and state["num_workers"] != num_workers:
        raise ValueError(
            f"a pack state comes from {num_workers} worker(s) but the state so far from {state['num_workers']}: "
            "combine the states of one DataLoader only."
        )
    state["num_workers"] = num_workers
    state["workers"][str(pack_state["worker"])] = dict(pack_state)
    state["next_worker"] = (pack_state["worker"] + 1) % num_workers


def combine_pack_states(
    pack_states: Iterable[Mapping[str, int] | None], previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fold the states of consumed packs, in consumption order, into a `PackedDataset` state.

    The last state seen per worker wins; `next_worker` records which worker DataLoader will ask next, so that a
    resumed DataLoader (which always starts with its worker 0) continues in the same order.

    Args:
        pack_states: the `state` of each consumed pack (`batch["data_state"]` from `PackedCollator`), oldest first.
            None entries (packs without state) are ignored.
        previous: a state returned earlier by this function or `PackedDataset.state_dict`, to update (not mutated).

    Returns:
        {"format", "num_workers", "next_worker", "epoch", "workers": {"<worker>": pack state}}, JSON-serializable.
    """
    state = copy.deepcopy(dict(previous)) if previous else _empty_state()
    for pack_state in pack_states:
        if pack_state is not None:
            _fold(state, pack_state)
    return state


# ----------------------------------------------------------------------------------------------------------------
# The dataset


class PackedDataset(IterableDataset):
    """Packs processed samples into groups under `seq_length` and `max_images_per_pack`, resumably.

    Source protocol (one of, checked in this order):

    - measuring source with `measure_from(start, stride)` and `build_measured(item)`: the first yields a `Measured`
      (or None for a skipped row) per position, the second turns one into a sample (or None: dropped from its pack
      at build time, e.g. a corrupt image; the pack's other samples still train, a pack left empty is not yielded).
      Only the samples of the pack about to be yielded are built. An optional `new_round()` is called before each
      round is read, once the previous round's items are all released (a stream's spill file starts over);
    - stream with `iter_from(start, stride)`: yields the samples at positions start, start+stride, ... (lets the
      source skip cheaply, e.g. before decoding images);
    - map-style: `__len__` and `__getitem__(int)`;
    - any other iterable: read with `itertools.islice` (exact, but a resume re-reads the skipped prefix).

    A sample is a dict with `input_ids` (T,), `labels` (T,), `pixel_values` (n_tiles, 3, H, W) or None and
    `n_images`; a None sample (skipped upstream) takes its position but is not packed. If the source has
    `set_epoch(epoch)` it is called before each epoch is read, so the source can reshuffle.

    Reading: with W DataLoader workers, worker w reads the positions w, w+W, w+2W, ... of the source (its local
    positions 0, 1, 2, ...), so nothing is read twice and nothing is lost. Each worker reads `buffer_size` of its
    positions per round, packs them with `knapsack_pack`, shuffles the packs with `random.Random` seeded by
    (seed, epoch, worker, W, round start) and yields them as `{"samples": [...], "state": {...}}` (see the module
    docstring). There is no carry-over between rounds: the last packs of a round may be less full, and in return a
    round can be re-read and re-packed identically on resume.

    Resume contract:

    - num_workers=0: `state_dict()` is the state after the last pack this object yielded; give it to
      `load_state_dict` of a fresh dataset (same source, seed, sizes) and iteration continues with the next pack.
    - DataLoader workers iterate copies, so record the consumed packs' states instead: `combine_pack_states(
      batch["data_state"] for each batch)`. Load that before creating the DataLoader (or with
      `persistent_workers=False`), use the same `num_workers`, and each worker continues after its last consumed
      pack, in the same worker order as before.
    - Each `__iter__` starts from the loaded state (or the start of epoch 0), like a sampler without `set_epoch`.
      `set_epoch(e)` (called by `Trainer` each epoch) moves every worker that is behind epoch `e` to its start.

    Args:
        source: the processed samples (see the protocol above).
        seq_length: the most tokens per pack.
        max_images_per_pack: the most images (or tiles, see `image_unit`) per pack; None for no cap.
        buffer_size: source positions per worker per round; bigger packs tighter but delays the first pack. With a
            measuring source a buffered row costs its measures plus its key (a few ints: a row index, or where a
            stream's undecoded row lies in its spill file); otherwise a whole built sample with its pixels.
        seed: seeds the pack order shuffle.
        infinite: loop over epochs forever; False stops after the epoch the state is in.
        image_unit: what the image cap counts: "images" (sample["n_images"]) or "tiles" (pixel_values.shape[0]).
        pack_cost: (tokens, tiles) -> a pack's compute cost (e.g. `functools.partial(nanovlm.training.flops.
            pack_flops, config)`); with `balance_group` > 1 it orders each round's packs so that every run of
            `balance_group` consecutive packs (one batch of a DataLoader worker) costs about the round's mean: the
            packs are dealt by cost (`balanced_groups`) and the groups shuffled. A data-parallel step waits for its
            slowest rank, and a pack's cost varies with its tiles (ViT) far more than with its tokens (packs are
            nearly full). None (default): the packs are shuffled one by one.
        balance_group: packs per batch (the per-device batch size) for `pack_cost`. Each round's pack count is made
            a multiple of it (the packs with the most samples are split) so batches stay aligned with the groups;
            a pack dropped whole at build time shifts the later batches by one pack (resume stays exact: the
            order depends only on the round).
    """

    def __init__(
        self,
        source: Any,
        seq_length: int,
        max_images_per_pack: int | None = None,
        buffer_size: int = 1024,
        seed: int = 0,
        infinite: bool = False,
        image_unit: Literal["images", "tiles"] = "images",
        pack_cost: Callable[[int, int], float] | None = None,
        balance_group: int = 1,
    ) -> None:
        super().__init__()
        if not any(hasattr(source, name) for name in ("measure_from", "iter_from", "__getitem__", "__iter__")):
            raise TypeError(
                f"source of type {type(source).__name__} is not readable: give an object with measure_from(start, "
                "stride) and build_measured(item), iter_from(start, stride), a map-style dataset (__len__, "
                "__getitem__) or an iterable of processed samples."
            )
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive int; got {seq_length!r}.")
        if max_images_per_pack is not None and (not isinstance(max_images_per_pack, int) or max_images_per_pack < 0):
            raise ValueError(f"max_images_per_pack must be None or an int >= 0; got {max_images_per_pack!r}.")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int; got {buffer_size!r}.")
        if image_unit not in ("images", "tiles"):
            raise ValueError(f"image_unit must be 'images' or 'tiles'; got {image_unit!r}.")
        if not isinstance(balance_group, int) or balance_group < 1:
            raise ValueError(f"balance_group must be a positive int (packs per batch); got {balance_group!r}.")
        self.source = source
        self.seq_length = seq_length
        self.max_images_per_pack = max_images_per_pack
        self.buffer_size = buffer_size
        self.seed = seed
        self.infinite = infinite
        self.image_unit = image_unit
        self.pack_cost = pack_cost
        self.balance_group = balance_group
        self._resume = _empty_state()  # where the next __iter__ starts
        self._progress: dict[str, Any] | None = None  # state after the last pack yielded in this process

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state after the last pack this object yielded (num_workers=0), else the state iteration starts from.

        With DataLoader workers this object yields nothing itself: use `combine_pack_states` on the consumed packs.
        """
        return copy.deepcopy(self._progress if self._progress is not None else self._resume)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the next iteration right after the packs recorded in `state`.

        Args:
            state: from `state_dict()` or `combine_pack_states`, or a single pack's state when num_workers was 0.
        """
        if "workers" not in state:  # one pack's state
            if state.get("num_workers") != 1:
                raise ValueError(
                    f"a single pack state from a DataLoader with {state.get('num_workers')} workers does not say "
                    "where the other workers were: pass combine_pack_states(all consumed pack states) instead."
                )
            state = combine_pack_states([state])
        if state.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(
                f"state format {state.get('format')!r} is not {STATE_FORMAT!r}: it is from another loader."
            )
        self._resume = copy.deepcopy(dict(state))
        self._progress = None

    def set_epoch(self, epoch: int) -> None:
        """Move every worker that is behind `epoch` to the start of `epoch` (workers already there keep going)."""
        workers = {w: s for w, s in self._resume["workers"].items() if s["epoch"] >= epoch}
        if epoch > self._resume["epoch"] or len(workers) < len(self._resume["workers"]):
            self._resume["epoch"] = max(epoch, self._resume["epoch"])
            self._resume["workers"] = workers
            self._progress = None

    # -- reading ----------------------------------------------------------------------------------------------

    def _read(self, epoch: int, worker: int, num_workers: int, start: int) -> Iterator[Any]:
        """Yield the samples at this worker's local positions start, start+1, ... for `epoch`."""
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        first = worker + start * num_workers
        if hasattr(self.source, "measure_from"):
            return iter(self.source.measure_from(first, num_workers))
        if hasattr(self.source, "iter_from"):
            return iter(self.source.iter_from(first, num_workers))
        if hasattr(self.source, "__getitem__") and hasattr(self.source, "__len__"):
            return (self.source[i] for i in range(first, len(self.source), num_workers))
        return itertools.islice(iter(self.source), first, None, num_workers)

    def _measure(self, sample: Mapping[str, Any] | Measured, position: int) -> tuple[int, int, int]:
        """(token length, image count, tile count) of the sample (or measured row) at source `position`, checked
        against the caps; the image count is in `image_unit`."""
        if isinstance(sample, Measured):
            tiles = sample.n_tiles
            length, images = sample.length, sample.n_tiles if self.image_unit == "tiles" else sample.n_images
        else:
            length, pixel_values = len(sample["input_ids"]), sample.get("pixel_values")
            tiles = 0 if pixel_values is None else int(pixel_values.shape[0])
            images = tiles if self.image_unit == "tiles" else sample.get("n_images")
            if images is None:  # conservative: count tiles
                images = tiles
        if length > self.seq_length:
            raise ValueError(
                f"sample at source position {position} has {length} tokens, more than seq_length={self.seq_length}: "
                f"skip such samples upstream (processor max sample length <= {self.seq_length})."
            )
        if self.max_images_per_pack is not None and images > self.max_images_per_pack:
            raise ValueError(
                f"sample at source position {position} has {images} {self.image_unit}, more than "
                f"max_images_per_pack={self.max_images_per_pack}: skip such samples upstream or raise the cap."
            )
        return length, int(images), int(tiles)

    def _build_pack(self, group: list[Any]) -> list[dict]:
        """The samples of one pack: measured rows are built now; those that fail now (counted) are left out."""
        samples = [self.source.build_measured(x) if isinstance(x, Measured) else x for x in group]
        return [sample for sample in samples if sample is not None]

    def _round_packs(self, samples: list[Any], epoch: int, worker: int, num_workers: int, start: int) -> list[list]:
        """Pack one round's samples (or measured rows) and shuffle the pack order deterministically."""
        kept = [
            (s, *self._measure(s, worker + (start + j) * num_workers)) for j, s in enumerate(samples) if s is not None
        ]
        groups = knapsack_pack([k[1] for k in kept], [k[2] for k in kept], self.seq_length, self.max_images_per_pack)
        rng = random.Random(f"{self.seed}-{epoch}-{worker}-{num_workers}-{start}")
        if self.pack_cost is not None and self.balance_group > 1:
            groups = _split_to_multiple(groups, self.balance_group)
            costs = [self.pack_cost(sum(kept[i][1] for i in g), sum(kept[i][3] for i in g)) for g in groups]
            batches = balanced_groups(costs, self.balance_group)
            rng.shuffle(batches)
            batches.sort(key=len, reverse=True)  # stable: a short group (no pack left to split) goes last
            groups = [groups[i] for batch in batches for i in batch]
        else:
            rng.shuffle(groups)
        return [[kept[i][0] for i in group] for group in groups]

    def _iter_worker(self, worker: int, num_workers: int, state: Mapping[str, int] | None) -> Iterator[dict]:
        """Yield this (logical) worker's packs from `state` on."""
        if state is None:
            epoch, start, skip = self._resume["epoch"], 0, 0
        else:
            epoch, start, skip = state["epoch"], state["round_start"], state["packs_done"]
        first_round = True  # the skip counts saved with the position are set before it is read ...
        while True:
            reader = self._read(epoch, worker, num_workers, start)
            from_start, yielded = start == 0, 0
            while True:
                if hasattr(self.source, "new_round"):  # the previous round's keys are all released by now
                    self.source.new_round()
                if first_round and not skip:
                    self._restore_skip_counts(worker)
                    first_round = False
                items = list(itertools.islice(reader, self.buffer_size))
                if not items:
                    break
                read = len(items)
                packs = self._round_packs(items, epoch, worker, num_workers, start)
                if first_round:  # ... or after it, when packs of it were done: they include its measuring's skips
                    self._restore_skip_counts(worker)
                    first_round = False
                del items  # the packs hold the round now: one copy of it in memory, not two
                end_of_epoch = read < self.buffer_size
                for k in range(skip, len(packs)):
                    if k < len(packs) - 1:
                        after = (epoch, start, k + 1)  # same round, k + 1 packs done
                    elif end_of_epoch and self.infinite:
                        after = (epoch + 1, 0, 0)
                    else:
                        after = (epoch, start + read, 0)  # next round
                    pack = self._finish_pack(packs[k], _worker_state(worker, num_workers, *after), worker)
                    packs[k] = None  # release the rows (and, without measures, the pixels) of a pack once it is out
                    if pack is None:  # every sample failed at build time (counted): the next pack's state covers it
                        continue
                    yield pack
                    yielded += 1
                    del pack  # not held in this frame while the next pack is built
                packs = None  # released before the next round is read
                skip = 0
                start += read
                if end_of_epoch:
                    break
            if not self.infinite:
                return
            if from_start and not yielded:  # looping on would spin forever without yielding (packs whose every
                # sample fails at build time, e.g. all images corrupt, yield nothing either)
                counter = getattr(self.source, "counter", None)
                skips = f" ({counter.summary()})" if counter is not None else ""
                raise NoSamplesError(
                    f"worker {worker} of {num_workers} read no usable sample in epoch {epoch}{skips}: every row was "
                    "empty or skipped; check the data and the skip reasons in the log, and give at least as many "
                    "usable rows as DataLoader workers x processes"
                )
            epoch, start, skip = epoch + 1, 0, 0
            logger.debug("worker %d/%d starts epoch %d", worker, num_workers, epoch)

    def _finish_pack(self, planned: list, state: dict[str, int], worker: int) -> dict | None:
        """The pack to yield: its samples built, the position after it and this worker's skip counts so far (for the
        trainer's logs); None when every sample failed at build time (each counted)."""
        samples = self._build_pack(planned)
        if not samples:
            return None
        pack = {"samples": samples, "state": state}
        counter = getattr(self.source, "counter", None)
        if counter is not None:
            counts = dict(counter.reasons)
            if getattr(counter, "turns_dropped", 0):  # not a skip: kept rows lost some turns to the rating filter
                counts[TURNS_DROPPED_KEY] = counter.turns_dropped
            pack["skipped"] = {"worker": worker, "counts": counts}
        return pack

    def _restore_skip_counts(self, worker: int) -> None:
        """Set the source's skip counter to this worker's counts saved beside the loaded position (its
        `skipped` entry, which the trainer writes), so a resumed run's counts continue."""
        counts = (self._resume.get("skipped") or {}).get(str(worker))
        counter = getattr(self.source, "counter", None)
        if counts is not None and counter is not None:
            counts = dict(counts)
            counter.turns_dropped = counts.pop(TURNS_DROPPED_KEY, 0)
            counter.reasons.clear()
            counter.reasons.update(counts)

    def __iter__(self) -> Iterator[dict]:
        """Yield packs from the loaded state on; in a DataLoader worker, only that worker's share."""
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        resume = self._resume
        if resume["num_workers"] is not None and resume["num_workers"] != num_workers:
            raise ValueError(
                f"the loaded state was recorded with {resume['num_workers']} DataLoader worker(s) (num_workers=0 "
                f"counts as 1) but this iteration runs {num_workers}: resume with the same num_workers."
            )
        # DataLoader asks workers 0, 1, ... in turn from scratch: let physical worker 0 play the logical worker
        # that was due next, so a resumed run sees the same pack order as an uninterrupted one.
        worker = (physical + resume["next_worker"]) % num_workers
        if info is None:
            self._progress = copy.deepcopy(resume)
        for pack in self._iter_worker(worker, num_workers, resume["workers"].get(str(worker))):
            if info is None:
                _fold(self._progress, pack["state"])
            yield pack

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seq_length={self.seq_length}, max_images_per_pack={self.max_images_per_pack}, "
            f"buffer_size={self.buffer_size}, seed={self.seed}, infinite={self.infinite})"
        )
