"""Where FineVision-schema rows come from: hub datasets, `save_to_disk` folders, parquet/json files, streams.

`load_finevision` loads one, several or all configs of a dataset (a hub id such as `HuggingFaceM4/FineVision`,
or a local folder with one sub-folder per config) or local data files, keeps the columns the pipeline reads, and
concatenates the configs (map-style) or interleaves them, each row once (streaming). A config that fails to load
is logged with its error and skipped; if none loads, a ValueError lists what was tried; if ranks loaded different
configs, a ValueError names the config and the ranks. A streaming config's shard that fails while being read
becomes one marker row (`skip_bad_shards`) that the sample builder counts as `bad_shard`.

The order that keeps every rank and epoch consistent::

    ds = load_finevision(...)                          # same rows, same order on every rank
    train, val = split_train_val(ds, val_size, seed)  # the same hold-out on every rank, any layout
    train = shard_for_rank(train, rank, world_size)    # disjoint, complete shards
    train = shuffle_dataset(train, seed)               # streaming: a seeded buffer, reseeded by set_epoch

Map-style datasets are better reshuffled per epoch by `nanovlm.data.readers.SampleDataset(seed=...)`, which also
reads images undecoded so a corrupt image is a counted skip.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.distributed import split_dataset_by_node

from .conversations import RATING_COLUMNS

logger = logging.getLogger(__name__)

AnyDataset = Dataset | IterableDataset

FINEVISION_COLUMNS: tuple[str, ...] = ("images", "texts", *RATING_COLUMNS.values())
REQUIRED_COLUMNS: tuple[str, ...] = ("texts",)
DATA_FILE_BUILDERS: dict[str, str] = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}
_MAX_ERROR_CHARS = 300
JSON_SUFFIXES = (".json", ".jsonl")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _looks_local(source: str) -> bool:
    """A path, a glob or a data file rather than a hub id ("owner/name")."""
    return (
        os.path.exists(source)
        or os.path.isabs(source)
        or source.startswith((".", "~"))
        or any(c in source for c in "*?[")
        or source.endswith(tuple(DATA_FILE_BUILDERS))
        or source.count("/") > 1
    )


def _data_files(patterns: Sequence[str]) -> tuple[str, list[str]]:
    """(datasets builder name, files) for local file paths / glob patterns of one format."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        files.extend(m for m in matches if os.path.isfile(m))
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {DATA_FILE_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"data files must all be one of the formats {sorted(DATA_FILE_BUILDERS)}; got suffixes {sorted(suffixes)} "
            f"for {patterns}."
        )
    return builders.pop(), files


def _pick_split(ds: Any, split: str, where: str) -> Any:
    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"{where} has no split {split!r}; its splits are {sorted(ds)}.")
        return ds[split]
    return ds


def _load_local_folder(path: Path, split: str, streaming: bool, num_shards: int, **kwargs: Any) -> AnyDataset:
    if _is_saved_dataset(path):
        ds = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
        if streaming:
            ds = ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
        return ds
    if any(path.glob("*.json")) or any(path.glob("*.jsonl")):
        # Read as JSON files, not by `datasets`' guess, which takes a folder holding more image files than JSON files
        # (a JSONL beside its img/ folder) for an image folder; the splits from the file names, as `datasets` does.
        splits = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path),
                                             allowed_extensions=list(JSON_SUFFIXES))
        if split not in splits:
            raise ValueError(f"{path} has no split {split!r}; its splits are {sorted(splits)} (from its file names).")
        return _load_json_files(list(splits[split]), split, streaming, **kwargs)
    return datasets.load_dataset(str(path), split=split, streaming=streaming, **kwargs)


def _relative_to(folder: str, images: Any) -> Any:
    """A row's `images` with each relative path (a string, or a dict with a path and no bytes) joined to `folder`."""
    def resolve(image: Any) -> Any:
        if isinstance(image, str) and image and not os.path.isabs(image):
            return os.path.join(folder, image)
        if isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
            return {**image, "path": _relative_to(folder, image["path"])}
        return image

    return [resolve(im) for im in images] if isinstance(images, list) else resolve(images)


def _load_json_files(files: list[str], split: str, streaming: bool, **kwargs: Any) -> AnyDataset:
    """JSON/JSONL files whose relative image paths are taken from each file's own folder, as `datasets`' own
    image folders read the `file_name` of their metadata.jsonl. Why: resolved from the working directory, a JSONL
    written next to its `img/` folder lost every image (all rows `bad_image`) unless training ran from that folder.
    Files are loaded per folder and concatenated in order."""
    parts = []
    for folder, group in itertools.groupby(files, key=lambda f: os.path.dirname(os.path.abspath(f))):
        ds = datasets.load_dataset("json", data_files={split: list(group)}, split=split, streaming=streaming, **kwargs)
        parts.append(_images_relative_to(folder, ds))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _images_relative_to(folder: str, ds: AnyDataset) -> AnyDataset:
    """`ds` with the relative image paths of its rows joined to `folder` (see `_load_json_files`)."""
    if ds.column_names is not None and "images" not in ds.column_names:
        return ds
    # unknown columns (a stream): a row without `images` gets None there, which means no image
    return ds.map(lambda row: {"images": _relative_to(folder, row.get("images"))})


def _load_one(
    source: str | list[str], config: str | None, split: str, streaming: bool, num_shards: int, **kwargs: Any
) -> AnyDataset:
    """Load one config (or the files/folder itself when `config` is None) as a Dataset or IterableDataset."""
    if isinstance(source, list):
        builder, files = _data_files(source)
        if builder == "json":
            return _load_json_files(files, split, streaming, **kwargs)
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **kwargs)
    if _looks_local(source):
        path = Path(os.path.expanduser(source))
        if config is not None:
            path = path / config
        if path.is_dir():
            return _load_local_folder(path, split, streaming, num_shards, **kwargs)
        if path.is_file() or any(c in str(path) for c in "*?["):
            return _load_one([str(path)], None, split, streaming, num_shards, **kwargs)
        raise FileNotFoundError(f"no such file or folder: {path}")
    return datasets.load_dataset(source, config, split=split, streaming=streaming, **kwargs)


SHARD_ERROR_COLUMN = "shard_error"


def stream_rows(ds: IterableDataset, batch_size: int = 1) -> Iterator[dict[str, Any]]:
    """The rows of a stream as the main process reads them, also inside a DataLoader worker.

    Why not `iter(ds)`: inside a worker `datasets` hands each worker only the shards of its *physical* worker id
    (and nothing when there are fewer shards than workers); our readers choose shards themselves (see
    `nanovlm.data.readers.SampleStream`). `IterableDataset.iter` reads without that split.
    """
    for batch in ds.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _shard_rows(shard: list[int], source: IterableDataset, label: str) -> Iterator[dict[str, Any]]:
    """`from_generator` body of `skip_bad_shards`: the rows of `source`'s shards `shard`, one marker row per shard
    that fails while being read."""
    blank = dict.fromkeys(source.features)
    for i in shard:
        part = source.shard(num_shards=source.num_shards, index=i, contiguous=True)
        try:
            for row in stream_rows(part):
                yield {**row, SHARD_ERROR_COLUMN: None}
        except Exception as err:  # any reading error (ArrowInvalid, OSError, JSON...): the rest of this shard only
            yield {**blank, SHARD_ERROR_COLUMN: f"{label} shard {i}: {type(err).__name__}: {_short(err)}"}


def skip_bad_shards(ds: IterableDataset, label: str) -> IterableDataset:
    """The same stream, except that a shard failing while being read (a corrupt parquet file passes loading, since
    streams are read lazily) ends in one marker row instead of an exception: its `shard_error` column holds the
    error, every other row has None there. `SampleBuilder` counts a marker row as a `bad_shard` skip and logs it,
    and training goes on with the next shard; rows read before the failure are kept.

    Per config, before configs are interleaved, so a bad file costs only its own rows. Hand-written on
    `from_generator` (one generator input per shard, so shards still split across ranks and workers and are
    reshuffled per epoch): `datasets`' own `on_bad_files` exists only for some formats and nothing could count it.
    A stream whose columns are unknown until read (`features` None) is returned as is.
    """
    if ds.features is None:
        return ds
    source = ds.decode(False)  # images stay {"bytes", "path"}: decoding is the sample builder's job
    features = datasets.Features({**source.features, SHARD_ERROR_COLUMN: datasets.Value("string")})
    return IterableDataset.from_generator(
        _shard_rows, features=features,
        gen_kwargs={"shard": list(range(source.num_shards)), "source": source, "label": label},
    )


def has_one_split(source: str | os.PathLike, configs: Sequence[str] | str | None = None) -> bool:
    """Whether a local source holds a single split, which `load_finevision` returns whatever split is asked for:
    data files (a file or a glob) or a folder written by `Dataset.save_to_disk` (not a DatasetDict), itself or, with
    `configs`, one of its config sub-folders. A folder of data files (splits from the file names: train-*.parquet,
    validation-*.parquet), a DatasetDict folder and a hub id are not."""
    source = os.fspath(source)
    if not _looks_local(source):
        return False
    path = Path(os.path.expanduser(source))
    if not path.is_dir():
        return path.is_file() or any(c in source for c in "*?[")
    if configs == "all" or configs == ["all"]:
        folders = [p for p in path.iterdir() if p.is_dir()]
    else:
        folders = [path] if not configs else [path / c for c in ([configs] if isinstance(configs, str) else configs)]
    return any((f / "state.json").is_file() and not (f / "dataset_dict.json").is_file() for f in folders)


def _config_names(source: str, revision: str | None) -> list[str]:
    """Every config of a hub dataset, or every dataset sub-folder of a local folder."""
    if _looks_local(source):
        path = Path(os.path.expanduser(source))
        if not path.is_dir():
            raise ValueError(f"configs='all' needs a folder with one sub-folder per config; {path} is not a folder.")
        names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        if not names:
            raise ValueError(f"configs='all': {path} has no sub-folders (one per config).")
        return names
    try:
        return datasets.get_dataset_config_names(source, revision=revision)
    except Exception as err:
        raise ValueError(
            f"Could not list the configs of {source!r} ({type(err).__name__}: {_short(err)}). Check the dataset id "
            "and the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE must be unset to download), or pass the config "
            "names explicitly."
        ) from err


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in text:  # datasets' "An error occurred while
        # generating the dataset" says nothing by itself; the cause names the file and the row
        text += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _keep_columns(ds: AnyDataset, columns: Sequence[str] | None, name: str) -> AnyDataset:
    if ds.column_names is None:  # a stream whose columns are only known once read (e.g. streamed json)
        return ds
    present = list(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}; its columns are {present}.")
    if "images" not in present:  # allowed (text-only data), but a VLM recipe on it is more likely a wrong column name
        logger.warning("%s has no `images` column (its columns are %s): every row trains as text-only.", name, present)
    if columns is None:
        return ds
    return ds.select_columns([c for c in columns if c in present])


def load_finevision(
    path_or_id: str | os.PathLike | Sequence[str | os.PathLike],
    configs: Sequence[str] | Literal["all"] | str | None = None,
    split: str = "train",
    streaming: bool = False,
    *,
    columns: Sequence[str] | None = FINEVISION_COLUMNS,
    revision: str | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    stream_num_shards: int = 64,
    **load_kwargs: Any,
) -> AnyDataset:
    """Load FineVision-schema rows from a hub id, a `save_to_disk` folder or local parquet/json files.

    Args:
        path_or_id: a hub dataset id; a folder (written by `save_to_disk`, a Dataset or a DatasetDict, or a folder
            of data files; with `configs`, one sub-folder per config); or data files: a path, a glob pattern or a
            list of them (`.parquet`, `.json`, `.jsonl`, `.arrow`).
        configs: None (the default config / the folder itself), one name, a list of names, or "all" (every config
            of the hub dataset, or every sub-folder of the folder).
        split: the split to load ("train").
        streaming: return an `IterableDataset` (configs interleaved, each row read once) instead of a `Dataset`
            (configs concatenated).
        columns: the columns to keep (those present); None keeps all. Rows without a `texts` column are an error.
        revision, cache_dir, num_proc: passed to `datasets.load_dataset` (num_proc only when not streaming).
        stream_num_shards: shards of the stream made from a `save_to_disk` folder when streaming (lets DataLoader
            workers and ranks split it by shard).
        load_kwargs: passed to `datasets.load_dataset`.

    A config that fails to load is logged with its error and skipped. Raises ValueError listing every attempt and
    its error if none loads. Under several processes (an initialised `torch.distributed` process group) every rank
    must have loaded the same configs, else a ValueError names the config and the ranks (see `check_ranks_agree`);
    so every rank must call this function.
    """
    source = _source_of(path_or_id)
    if isinstance(source, list) and configs is not None:
        raise ValueError(f"configs={configs!r} needs a hub id or a folder; data files have no configs.")
    names = _requested_configs(source, configs, revision)
    kwargs = dict(load_kwargs)
    for key, value in (("revision", revision), ("cache_dir", cache_dir)):
        if value is not None:
            kwargs[key] = value
    if num_proc is not None and not streaming:
        kwargs["num_proc"] = num_proc
    loaded, failures = _load_configs(source, names, split, streaming, stream_num_shards, columns, kwargs)
    # Before any error of ours, so that no rank is left waiting in the collective.
    check_ranks_agree(gather_across_ranks(([name for name, _ in loaded], failures)), source)
    if not loaded:
        raise ValueError(
            f"Could not load any of {len(names)} config(s) of {source!r} (split {split!r}); tried:\n  - "
            + "\n  - ".join(failures)
            + "\nCheck the path or hub id, the config names and the split; hub downloads need network access "
            "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."
        )
    return _combine_configs(loaded, source, streaming)


def _source_of(path_or_id: str | os.PathLike | Sequence[str | os.PathLike]) -> str | list[str]:
    """`load_finevision`'s `path_or_id` as a string, or a list of strings for several data files."""
    if not isinstance(path_or_id, (list, tuple)):
        return os.fspath(path_or_id)
    if not path_or_id:
        raise ValueError("path_or_id is an empty list; give a hub id, a folder or data files.")
    return [os.fspath(p) for p in path_or_id]


def _requested_configs(
    source: str | list[str], configs: Sequence[str] | str | None, revision: str | None
) -> list[str | None]:
    """The config names `load_finevision` loads: [None] for the default, or the names (every one for "all")."""
    if configs == "all":
        return list(_config_names(source, revision))
    if configs is None:
        return [None]
    if isinstance(configs, str):
        return [configs]
    if not configs:
        raise ValueError('configs is an empty list; pass None (default config), names, or "all".')
    return list(configs)


def _load_configs(
    source: str | list[str],
    names: Sequence[str | None],
    split: str,
    streaming: bool,
    stream_num_shards: int,
    columns: Sequence[str] | None,
    kwargs: dict[str, Any],
) -> tuple[list[tuple[str | None, AnyDataset]], list[str]]:
    """Load each config; one that fails is logged and listed as "config: error". Returns (loaded, failures)."""
    loaded: list[tuple[str | None, AnyDataset]] = []
    failures: list[str] = []
    for name in names:
        label = f"{source}" + (f" (config {name!r})" if name is not None else "")
        try:
            ds = _load_one(source, name, split, streaming, stream_num_shards, **kwargs)
            ds = _keep_columns(ds, columns, label)
            if isinstance(ds, IterableDataset):
                ds = skip_bad_shards(ds, label)
        except Exception as err:
            logger.warning("Skipping %s: %s: %s", label, type(err).__name__, _short(err))
            failures.append(f"{name if name is not None else source}: {type(err).__name__}: {_short(err)}")
            continue
        logger.info("Loaded %s%s.", label, f": {len(ds)} rows" if isinstance(ds, Dataset) else " (streaming)")
        loaded.append((name, ds))
    return loaded, failures


def _combine_configs(loaded: list[tuple[str | None, AnyDataset]], source: Any, streaming: bool) -> AnyDataset:
    """One dataset of the loaded configs: interleaved streams (each row once), or concatenated datasets."""
    if len(loaded) == 1:
        return loaded[0][1]
    parts = [ds for _, ds in loaded]
    try:
        if streaming:
            return datasets.interleave_datasets(parts, stopping_strategy="all_exhausted_without_replacement")
        return datasets.concatenate_datasets(parts)
    except Exception as err:
        raise ValueError(
            f"The configs of {source!r} cannot be combined: their columns differ ({_feature_differences(loaded)}). "
            "Give every config the same columns and types (e.g. images stored as image data in all of them, or as "
            "file paths in all), or list only compatible ones in --dataset_configs (configs=...)."
        ) from err


def _feature_differences(loaded: list[tuple[str | None, AnyDataset]]) -> str:
    """"column: config a Type, config b Other; ..." for the columns whose type is not the same in every config (the
    whole features dump of each config ran to thousands of characters). "unknown" for a stream not yet read."""
    known = {name: ds.features for name, ds in loaded}
    if any(f is None for f in known.values()):
        return "; ".join(f"{name}: {'unknown until read' if f is None else 'known'}" for name, f in known.items())
    columns = sorted({c for f in known.values() for c in f if c != SHARD_ERROR_COLUMN})
    differing = [c for c in columns if len({repr(f.get(c)) for f in known.values()}) > 1]
    return "; ".join(
        f"{c}: " + ", ".join(f"{name} {f[c] if c in f else 'missing'}" for name, f in known.items()) for c in differing
    )


def gather_across_ranks(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (`torch.distributed.all_gather_object`), or `[value]` when no process
    group is initialised (one process; Accelerate/Trainer initialise it under torchrun and `accelerate launch`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_ranks_agree(per_rank: Sequence[tuple[Sequence[str | None], Sequence[str]]], source: Any) -> None:
    """Raise one ValueError unless every rank loaded the same configs.

    Why: each rank loads on its own and then takes its share of what it loaded; a config that failed on one rank
    only (a transient error) shifts every share after it, so rows are silently duplicated on some ranks and lost on
    others. `per_rank[r]` is (the config names rank r loaded, its failure messages "config: error").
    """
    if len(per_rank) < 2:
        return
    names = {name for loaded, _ in per_rank for name in loaded}
    for name in sorted(names, key=str):
        missing = [r for r, (loaded, _) in enumerate(per_rank) if name not in loaded]
        if missing:
            present = [r for r in range(len(per_rank)) if r not in missing]
            label = name if name is not None else source
            errors = [e for r in missing for e in per_rank[r][1] if e.startswith(f"{label}:")]
            reason = f" ({errors[0]})" if errors else ""
            raise ValueError(
                f"--dataset_configs: {label!r} of {source!r} loaded on rank(s) {present} but failed on rank(s) "
                f"{missing}{reason}; every rank must load the same configs, or rows are duplicated and lost: fix "
                "the error and restart, or leave the config out of --dataset_configs."
            )


def split_train_val(ds: AnyDataset, val_size: int, seed: int = 0) -> tuple[AnyDataset, AnyDataset | None]:
    """Hold out `val_size` rows, deterministically for a given `seed` and row order. Returns (train, val), disjoint
    and together complete. `val_size=0` returns (ds, None).

    Map-style: `val_size` rows drawn by a seeded permutation; both parts keep the original row order (contiguous
    reads). Raises ValueError unless `val_size` < the number of rows.

    Streaming: exactly the first `val_size` rows of the stream read shard by shard (its shard 0 from the start, then
    shard 1, ...; for one source, its first `val_size` rows), whatever the ranks and DataLoader workers later read
    it. Both parts keep the stream's shards (val only those holding held-out rows), so they still split across
    readers, with images undecoded (`SampleBuilder` decodes). Costs one read of the first `val_size` + 1 rows here,
    in every process. Raises ValueError unless the stream has more than `val_size` rows. Split before `shard_for_rank`
    and `shuffle_dataset`.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"val_size must be an int >= 0, got {val_size!r}.")
    if val_size == 0:
        return ds, None
    if isinstance(ds, IterableDataset):
        return _split_stream(ds, val_size)
    n = len(ds)
    if val_size >= n:
        raise ValueError(f"val_size={val_size} must be smaller than the dataset's {n} rows: lower --val_size.")
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    return ds.select(train_idx), ds.select(val_idx)


def _held_out_per_shard(ds: IterableDataset, val_size: int) -> list[int]:
    """How many of the first `val_size` rows (read shard by shard) each shard of `ds` holds; raises ValueError when
    no row would be left for training."""
    counts: list[int] = []
    want, seen = val_size + 1, 0  # one row past the held-out ones: training must keep at least one
    for i in range(ds.num_shards):
        part = ds.shard(num_shards=ds.num_shards, index=i, contiguous=True)
        counts.append(sum(1 for _ in itertools.islice(stream_rows(part), want - seen)))
        seen += counts[-1]
        if seen == want:
            break
    if seen < want:
        raise ValueError(f"val_size={val_size} must be smaller than the stream's {seen} rows: lower --val_size.")
    counts[-1] -= 1
    return counts + [0] * (ds.num_shards - len(counts))


def _shard_slices(
    shard: list[int], skip: list[int], take: list[int | None], source: IterableDataset
) -> Iterator[dict[str, Any]]:
    """`from_generator` body of `_split_stream`: the rows of `source`'s shards `shard`, each without its first
    `skip` rows and keeping at most `take` (None: the rest). `datasets`' own skip/take on one whole shard, which
    nothing shards further."""
    for i, n_skip, n_take in zip(shard, skip, take):
        part = source.shard(num_shards=source.num_shards, index=i, contiguous=True)
        part = part.skip(n_skip) if n_skip else part
        yield from stream_rows(part if n_take is None else part.take(n_take))


def _split_stream(ds: IterableDataset, val_size: int) -> tuple[IterableDataset, IterableDataset]:
    """`split_train_val` of a stream: the first `val_size` rows, independent of how the result is later sharded.

    Hand-written on `from_generator` (one generator input per shard, like `skip_bad_shards`) with a skip/take per
    shard. Why not `ds.skip(val_size)` / `ds.take(val_size)`: when sharded (ranks, DataLoader workers) `datasets`
    splits `val_size` evenly over the readers, each skipping/taking its share of its own shards, so the held-out
    rows changed with the launch layout, and a reader whose shards held fewer rows than its share silently held out
    fewer (the rest went to training). Here the held-out rows per shard are counted once, by reading them.
    """
    counts = _held_out_per_shard(ds, val_size)
    source = ds.decode(False) if ds.features is not None else ds  # images stay {"bytes", "path"}, not re-encoded
    held = [i for i, n in enumerate(counts) if n]

    def stream(shard: list[int], skip: list[int], take: list[int | None]) -> IterableDataset:
        kwargs = {"shard": shard, "skip": skip, "take": take, "source": source}
        return IterableDataset.from_generator(_shard_slices, features=source.features, gen_kwargs=kwargs)

    train = stream(list(range(ds.num_shards)), counts, [None] * ds.num_shards)
    val = stream(held, [0] * len(held), [counts[i] for i in held])
    return train, val


def shard_for_rank(ds: AnyDataset, rank: int, world_size: int) -> AnyDataset:
    """This rank's part of `ds` (`datasets.distributed.split_dataset_by_node`): disjoint across ranks, complete.

    Map-style: contiguous shards whose sizes differ by at most one. Streaming: whole shards per rank when the shard
    count divides by `world_size`, else every rank reads the stream and keeps one row in `world_size`. Ranks can
    end up with different numbers of samples (and packs): train by steps, or loop the data.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    if world_size == 1:
        return ds
    if isinstance(ds, IterableDataset) and ds.num_shards % world_size == 0:
        # The shards split_dataset_by_node would give this rank, as a plain stream of them: DataLoader workers
        # (`SampleStream`) then split exactly this rank's shards; split_dataset_by_node's split is applied at
        # iteration time, after any further sharding, which would mix up the two levels.
        return ds.shard(num_shards=world_size, index=rank, contiguous=False)
    if isinstance(ds, Dataset) and len(ds) < world_size:
        # datasets' contiguous shard raises IndexError for a rank past the last row (an eval split smaller than the
        # number of processes crashed the run); its split gives the first len(ds) ranks one row each, the rest none
        return ds.select([rank] if rank < len(ds) else [])
    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


def stream_read_factor(num_shards: int, world_size: int, num_workers: int) -> int:
    """How many times each row of a stream of `num_shards` shards is read (from storage, not decoded) when split
    over `world_size` ranks x `num_workers` DataLoader workers each (0 counts as 1).

    The rule: a rank takes whole shards when `num_shards % world_size == 0`, else it reads every shard and keeps
    one row in `world_size`; inside a rank, each worker takes whole shards when the rank has at least as many shards
    as workers, else every worker reads all the rank's shards and keeps one row in `num_workers`. 1 means no extra
    reading.
    """
    workers = max(1, num_workers)
    per_rank, factor = (num_shards // world_size, 1) if num_shards % world_size == 0 else (num_shards, world_size)
    return factor * (1 if per_rank >= workers else workers)


def shuffle_dataset(ds: AnyDataset, seed: int, buffer_size: int = 10_000) -> AnyDataset:
    """Shuffle rows: streaming through a seeded buffer of `buffer_size` rows (`set_epoch(e)` reseeds it with
    seed + e; `SampleStream.set_epoch` passes the epoch on), map-style by a seeded permutation (fixed; for a new
    order every epoch use `SampleDataset(seed=...)` instead)."""
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}.")
    if isinstance(ds, IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=buffer_size)
    return ds.shuffle(seed=seed)


__all__ = [
    "FINEVISION_COLUMNS",
    "check_ranks_agree",
    "gather_across_ranks",
    "has_one_split",
    "load_finevision",
    "shard_for_rank",
    "shuffle_dataset",
    "skip_bad_shards",
    "split_train_val",
    "stream_read_factor",
    "stream_rows",
]
