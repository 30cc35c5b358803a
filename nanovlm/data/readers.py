"""Row sources read as the packer's sample sources: `SampleDataset` (map-style) and `SampleStream` (a stream).

Both give `PackedDataset` (nanovlm.data.packing) the two-stage reading of measure -> pack -> build:
`measure_from(start, stride)` yields each row's `Measured` (sizes from the text and the image headers, no pixel
decoded) and `build_measured(item)` builds one later, for the pack about to be yielded. What a measure's key holds
is what the packing buffer holds per row, so it is kept small:

- `SampleDataset`: the row index (the row is re-read from the dataset at build time);
- `SampleStream`: a stream cannot be re-read, so the undecoded row (its encoded image bytes: ~0.27 MiB per
  row of the benchmark's FineVision-like rows) goes to a `RowSpill`, an unlinked temporary file of this process, and the key holds its
  position and (offset, size) there. Host memory then stays flat in the pack buffer size: a buffer of 2048 rows
  held ~0.5 GB of rows in memory per DataLoader worker before (BENCHMARKS.md). The spill file is replaced at every
  round of the packer (`new_round`), so its size is one round's rows.

Both also have the one-stage reading `PackedDataset` uses without measures: `SampleDataset[i]` and
`SampleStream.iter_from(start, stride)` build every row.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import datasets
import numpy as np

from .packing import Measured
from .samples import SampleBuilder, SkipCounter
from .sources import stream_rows

logger = logging.getLogger(__name__)
_UNREADABLE = object()  # SampleDataset._read_counted: the row could not be read


class RowSpill:
    """Pickled rows appended to an unlinked temporary file (under `tempfile.gettempdir()`, i.e. $TMPDIR), read back
    by (offset, size). The file is deleted by the OS when the last reference to this object goes, or the process
    ends, however it ends.

    Why hand-written: what is needed is an append-only byte store read back by offset, about 30 lines over
    `os.pwrite`/`os.pread`; `shelve`/`dbm` add keys and an index we do not need, and `multiprocessing.shared_memory`
    would keep the bytes in (shared) memory, the very thing to avoid.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)
        self.pid = os.getpid()  # a forked DataLoader worker must not write into its parent's file
        self.nbytes = 0

    def put(self, row: Any) -> tuple[int, int]:
        """Append `row` (pickled) and return its (offset, size)."""
        data = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
        offset, view = self.nbytes, memoryview(data)
        while view:  # pwrite may write less than asked
            view = view[os.pwrite(self._file.fileno(), view, offset + len(data) - len(view)):]
        self.nbytes += len(data)
        return offset, len(data)

    def get(self, offset: int, size: int) -> Any:
        """The row stored at (offset, size)."""
        chunks, done = [], 0
        while done < size:  # pread may read less than asked
            chunk = os.pread(self._file.fileno(), size - done, offset + done)
            if not chunk:
                raise OSError(f"the row spill file ended at {offset + done} bytes, before {offset + size}.")
            chunks.append(chunk)
            done += len(chunk)
        return pickle.loads(b"".join(chunks))  # our own bytes: the file is unlinked, no one else writes it


class SpilledRow(NamedTuple):
    """A `SampleStream` measure's key: the row's stream position and where its undecoded row lies in a spill."""

    position: int
    spill: RowSpill
    offset: int
    size: int


def _undecoded_map_source(rows: Any) -> Any:
    """Rows of a `datasets.Dataset` read as Arrow (images stay {"bytes", "path"} dicts); other sources as given."""
    if isinstance(rows, datasets.Dataset):
        return rows.with_format("arrow")
    return rows


class SampleDataset:
    """Map-style source of samples: `dataset[i]` is row i built into a sample, or None when skipped.

    Args:
        rows: a `datasets.Dataset` or any sequence of FineVision rows. A `datasets.Dataset` is read with image
            decoding off, so the builder decodes (and counts) bad images itself.
        builder: the `SampleBuilder`.
        seed: if set, `set_epoch(e)` reorders the rows with a permutation seeded by (seed, e), the same in every
            worker and rank; None keeps the row order.
        log_every: log the builder's counter summary every this many rows read in this process (None: never).
        first: a curriculum: in epoch 0 the first `first` rows are all read before the others (each group in its
            own seeded order); later epochs shuffle all rows together. Needs `seed`.
    """

    def __init__(
        self,
        rows: Sequence[Any],
        builder: SampleBuilder,
        seed: int | None = None,
        log_every: int | None = None,
        first: int = 0,
    ) -> None:
        if not (hasattr(rows, "__len__") and hasattr(rows, "__getitem__")):
            raise TypeError(
                f"rows must be map-style (a datasets.Dataset or a sequence), got {type(rows).__name__}; "
                "use SampleStream for streams."
            )
        if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first <= len(rows):
            raise ValueError(f"first must be an int in [0, {len(rows)}] (the number of rows), got {first!r}.")
        if first and seed is None:
            raise ValueError("first (a curriculum prefix) needs a seed: without one the rows are read in order anyway.")
        self.first = first
        self.rows = rows
        self._source = _undecoded_map_source(rows)
        self._arrow = self._source is not rows
        self.builder = builder
        self.seed = seed
        self.log_every = log_every
        self.epoch = 0
        self._order: np.ndarray | None = None
        self._order_epoch: int | None = None
        self._reads = 0
        if seed is not None:
            self.set_epoch(0)

    @property
    def counter(self) -> SkipCounter:
        """The builder's counter (this process's rows only)."""
        return self.builder.counter

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the row order of `epoch` (a no-op without `seed`; the permutation is cached per epoch)."""
        self.epoch = epoch
        if self.seed is not None and self._order_epoch != epoch:
            n = len(self.rows)
            dtype = np.int32 if n < 2**31 else np.int64
            rng = np.random.default_rng([self.seed, epoch])
            if epoch == 0 and self.first:
                head, tail = rng.permutation(self.first), self.first + rng.permutation(n - self.first)
                self._order = np.concatenate([head, tail]).astype(dtype)
            else:
                self._order = rng.permutation(n).astype(dtype)
            self._order_epoch = epoch

    def row_index(self, i: int) -> int:
        """The row behind position `i` in the current epoch's order."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} rows.")
        i %= n
        return int(self._order[i]) if self._order is not None else i

    def read_row(self, j: int) -> Any:
        """Row `j` of `rows` as a plain dict (images undecoded for a `datasets.Dataset`)."""
        row = self._source[j]
        return row.to_pylist()[0] if self._arrow else row

    def measure_from(self, start: int, stride: int = 1) -> Iterator[Measured | None]:
        """The measures of the rows at positions start, start + stride, ... of this epoch's order (None for a row
        skipped by a rule that needs no pixels); each one's key is its row index, all `build_measured` needs."""
        for i in range(start, len(self), stride):
            j = self.row_index(i)
            row = self._read_counted(j)
            if row is _UNREADABLE:
                yield None
                continue
            measured, _ = self.builder.measure(row, index=j)
            yield None if measured is None else measured._replace(key=j)

    def build_measured(self, item: Measured) -> dict[str, Any] | None:
        """The sample of a row measured by `measure_from` (re-read by its index), or None if it fails now."""
        try:
            row = self.read_row(item.key)
        except Exception as err:
            self.builder.record_error(err, index=item.key)
            return None
        return self.builder.build(row, index=item.key, measure=item)[0]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        j = self.row_index(i)
        row = self._read_counted(j)
        return None if row is _UNREADABLE else self.builder.build(row, index=j)[0]

    def _read_counted(self, j: int) -> Any:
        """Row `j`, counted as a read (the skip summary is logged every `log_every` reads); `_UNREADABLE` when
        reading fails (e.g. an unreadable shard), counted like any other bad row."""
        self._reads += 1
        if self.log_every and self._reads % self.log_every == 0:
            self.counter.log_summary(prefix="data: ")
        try:
            return self.read_row(j)
        except Exception as err:
            self.builder.record_error(err, index=j)
            return _UNREADABLE

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rows={len(self)}, seed={self.seed}, epoch={self.epoch}, builder={self.builder!r})"
        )


class SampleStream:
    """Stream source of samples for the packer: `iter_from(start, stride)` yields the built samples (None for
    skipped rows) of the rows at positions start, start + stride, ...; rows in between are not built.

    Args:
        rows: any iterable of FineVision rows, typically a streaming `datasets.IterableDataset` (read with image
            decoding off; `set_epoch` is passed on to it, which reseeds its shuffle buffer).
        builder: the `SampleBuilder`.
        log_every: log the builder's counter summary every this many rows built in this process (None: never).
        spill_dir: where the undecoded rows of a packing round go between `measure_from` and `build_measured`
            (an unlinked temporary file per process and round, about `buffer_size` rows in size); None: $TMPDIR.

    `PackedDataset` reads with stride = W (its DataLoader workers; 1 without workers) and start = w (mod W) for its
    logical worker w, which after a resume need not be the physical DataLoader worker id. For a
    `datasets.IterableDataset` the reader w of W therefore picks its rows itself, never by the physical worker id
    (`datasets`' own split inside a worker, which crashed resumes and starved workers when shards were few):

    - at least W shards: reader w reads the shards w, w + W, ... (those `datasets` would give worker w) and
      positions count the rows of those shards, so each row is read once;
    - fewer shards than W: every reader reads the whole stream and keeps every W-th row (W x the reading, not
      the decoding: skipped rows are never built; `build_datasets` warns with the factor).

    Either way nothing is read twice or lost, resume is exact with the same W, and the result does not depend on
    which process runs which reader.
    """

    def __init__(
        self, rows: Iterable[Any], builder: SampleBuilder, log_every: int | None = None, spill_dir: str | None = None
    ) -> None:
        if not hasattr(rows, "__iter__"):
            raise TypeError(f"rows must be iterable, got {type(rows).__name__}.")
        if spill_dir is not None and not os.path.isdir(spill_dir):
            raise ValueError(f"spill_dir={spill_dir!r} is not a folder: give an existing folder, or None for $TMPDIR.")
        if isinstance(rows, datasets.IterableDataset) and rows.features is not None:
            # images stay {"bytes", "path"}: the builder counts bad ones. A stream whose features are unknown until
            # read (a streamed .json file) decodes nothing anyway, and `decode` refuses it.
            rows = rows.decode(False)
        self.rows = rows
        self.builder = builder
        self.log_every = log_every
        self.spill_dir = spill_dir
        self.epoch = 0
        self._built = 0
        self._spill: RowSpill | None = None  # this round's; opened at the first measured row
        self._unpicklable_logged = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_spill"] = None  # an open file stays with its process; a DataLoader worker opens its own
        return state

    @property
    def spilled_bytes(self) -> int:
        """Bytes of undecoded rows in this process's spill file of the current round."""
        return 0 if self._spill is None else self._spill.nbytes

    def new_round(self) -> None:
        """Start a new spill file for the next round's rows (`PackedDataset` calls this before reading a round, when
        every key of the previous round is released: the old file goes with its last key)."""
        self._spill = None

    @property
    def counter(self) -> SkipCounter:
        """The builder's counter (this process's rows only)."""
        return self.builder.counter

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the rows (a `datasets.IterableDataset` reseeds its shuffle buffer with it)."""
        self.epoch = epoch
        if hasattr(self.rows, "set_epoch"):
            self.rows.set_epoch(epoch)

    def _positions(self, start: int, stride: int) -> Iterator[tuple[int, Any]]:
        if not (isinstance(start, int) and isinstance(stride, int) and start >= 0 and stride >= 1):
            raise ValueError(f"need start >= 0 and stride >= 1, got start={start!r}, stride={stride!r}.")
        if not isinstance(self.rows, datasets.IterableDataset):
            return zip(itertools.count(start, stride), itertools.islice(iter(self.rows), start, None, stride))
        # Read a copy made by shard() (shard(1, 0) is the whole stream) with this reader's epoch set on it. Why:
        # datasets keeps a stream's epoch in shared memory, common to all DataLoader workers, and workers reach an
        # epoch's end at different times, so the original's epoch is whatever worker set it last.
        if stride > 1 and self.rows.num_shards >= stride:
            worker, local = start % stride, start // stride
            part = self.rows.shard(num_shards=stride, index=worker, contiguous=False)
            part.set_epoch(self.epoch)
            return zip(itertools.count(start, stride), itertools.islice(stream_rows(part), local, None))
        whole = self.rows.shard(num_shards=1, index=0)
        whole.set_epoch(self.epoch)
        return zip(itertools.count(start, stride), itertools.islice(stream_rows(whole), start, None, stride))

    def iter_from(self, start: int, stride: int = 1) -> Iterator[dict[str, Any] | None]:
        """Samples (None for skipped rows) of the rows at positions start, start + stride, ..."""
        for position, row in self._positions(start, stride):
            yield self.builder.build(row, index=position)[0]
            self._count_read()

    def measure_from(self, start: int, stride: int = 1) -> Iterator[Measured | None]:
        """The measures of the rows at positions start, start + stride, ... (None for a row skipped by a rule that
        needs no pixels). A stream cannot be re-read, so each measured row (undecoded: its encoded image bytes) is
        written to this round's spill file and the key is a `SpilledRow` (position, where it lies in the file): the
        packing buffer holds a few ints per row, not the row. A row that cannot be pickled stays in memory: its key
        is `(position, row)`."""
        for position, row in self._positions(start, stride):
            measured, _ = self.builder.measure(row, index=position)
            yield None if measured is None else measured._replace(key=self._spilled(position, row))
            self._count_read()

    def _count_read(self) -> None:
        """Count one row read (built or measured); log the skip summary every `log_every` rows."""
        self._built += 1
        if self.log_every and self._built % self.log_every == 0:
            self.counter.log_summary(prefix="data: ")

    def build_measured(self, item: Measured) -> dict[str, Any] | None:
        """The sample of a row measured by `measure_from`, or None (counted) if it fails now (a corrupt image)."""
        if isinstance(item.key, SpilledRow):
            position = item.key.position
            try:
                row = item.key.spill.get(item.key.offset, item.key.size)
            except Exception as err:  # e.g. the spill's disk failed: lose this row, counted, not the run
                self.builder.record_error(err, index=position)
                return None
        else:
            position, row = item.key
        return self.builder.build(row, index=position, measure=item)[0]

    def _spilled(self, position: int, row: Any) -> SpilledRow | tuple[int, Any]:
        """`row` written to this round's spill file, as a `SpilledRow`; `(position, row)` if it cannot be pickled."""
        try:
            if self._spill is None or self._spill.pid != os.getpid():
                self._spill = RowSpill(self.spill_dir)
            offset, size = self._spill.put(row)
        except OSError as err:
            where = self.spill_dir or tempfile.gettempdir()
            raise OSError(
                f"could not write a stream row to the spill file in {where} ({err}): free space there, or set TMPDIR "
                "(or SampleStream(spill_dir=...)) to a local disk with room for about --pack_buffer_size rows per "
                "DataLoader worker."
            ) from err
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            if not self._unpicklable_logged:
                self._unpicklable_logged = True
                logger.warning("rows of this stream cannot be pickled (%s): the packing buffer keeps them in memory",
                               err)
            return position, row
        return SpilledRow(position, self._spill, offset, size)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        return self.iter_from(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epoch={self.epoch}, builder={self.builder!r})"


__all__ = ["RowSpill", "SampleDataset", "SampleStream", "SpilledRow"]
