"""Split building and I/O for the synthetic dataset: `generate_split` (one in-memory `datasets.Dataset`),
`build_synthetic_dataset` (train/validation/test, optionally a `train_simple` curriculum split, written as
save_to_disk + parquet + the settings record `synthetic_config.json`), and reading that record back to tell whether
a folder was built with other settings. `build_then_rename` puts a finished build in place in one rename, so no
reader ever sees half a dataset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from .questions import RATING_COLUMNS, SyntheticConfig, iter_samples
from .settings import SIMPLE_SPLIT, SyntheticSettings

if TYPE_CHECKING:  # imported lazily at run time: rendering samples needs only PIL
    import datasets

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
T = TypeVar("T")


def synthetic_features() -> datasets.Features:
    """The `datasets.Features` of a synthetic split (FineVision columns plus metadata)."""
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
            "source": datasets.Value("string"),
            **{column: ints for column in RATING_COLUMNS},
            "question_type": datasets.List(datasets.Value("string")),
            "sample_id": datasets.Value("string"),
            "scenes": datasets.Value("string"),
        }
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_split(
    num_samples: int, split: str = "train", seed: int = 0, config: SyntheticConfig | None = None
) -> datasets.Dataset:
    """Generate one split as an in-memory `datasets.Dataset` (images stored as PNG bytes)."""
    import datasets

    features = synthetic_features()
    columns: dict[str, list] = {name: [] for name in features}
    for row in iter_samples(num_samples, split, seed, config):
        row["images"] = [{"bytes": _png(image), "path": None} for image in row["images"]]
        for name in columns:
            columns[name].append(row[name])
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.NamedSplit(split))


SETTINGS_FILE = "synthetic_config.json"  # the settings a dataset folder was built with


def recorded_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings a synthetic dataset folder was built with (its `synthetic_config.json`, see
    `SyntheticSettings.record`), or None when the folder has none (not built by `build_synthetic_dataset`)."""
    record_file = Path(path) / SETTINGS_FILE
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    record.setdefault("train_simple", 0)  # written before the curriculum split existed
    return record


def build_synthetic_dataset(
    output_dir: str | Path | None,
    settings: SyntheticSettings | None = None,
    *,
    write_parquet: bool = True,
    **fields: Any,
) -> datasets.DatasetDict:
    """Build the splits `settings` describes and write them to `output_dir`.

    Writes `save_to_disk(output_dir)` (read back with `datasets.load_from_disk`), `output_dir/parquet/{split}.parquet`
    (read back with `load_dataset("parquet", data_files=...)`; images decode as PIL) and
    `output_dir/synthetic_config.json` (the settings, for reproducing the data). `output_dir=None` writes nothing.

    Args:
        output_dir: destination folder, or None to only return the data.
        settings: what to build (see `SyntheticSettings`); None: its defaults.
        write_parquet: also write the parquet copies.
        fields: `SyntheticSettings` fields that replace those of `settings`, e.g. `num_train=100, seed=3`.

    Returns:
        The `datasets.DatasetDict` that was written. A split with 0 samples is left out. `num_train_simple` adds a
        `train_simple` curriculum split: a tiny model trained from scratch learns to read where a shape is from these;
        from the full mix alone it did not (see BENCHMARKS.md, "Demo").
    """
    import datasets

    settings = replace(settings or SyntheticSettings(), **fields)
    configs = settings.split_configs()
    splits = {}
    for split, n in settings.counts.items():
        if n == 0:
            continue
        start = time.perf_counter()
        splits[split] = generate_split(n, split, settings.seed, configs[split])
        elapsed = time.perf_counter() - start
        logger.info("generated %d %s samples in %.2f s (%.0f samples/s)", n, split, elapsed, n / max(elapsed, 1e-9))
    dataset = datasets.DatasetDict(splits)
    if output_dir is not None:
        _write_dataset(dataset, Path(output_dir), write_parquet, settings.record())
    return dataset


def _write_dataset(dataset: datasets.DatasetDict, out: Path, write_parquet: bool, record: Mapping[str, Any]) -> None:
    """Write `dataset` to `out` (save_to_disk, optional parquet copies, the settings record); remove split files
    an earlier build left there."""
    dataset.save_to_disk(str(out))
    if write_parquet:
        (out / "parquet").mkdir(parents=True, exist_ok=True)
        for split, ds in dataset.items():
            ds.to_parquet(str(out / "parquet" / f"{split}.parquet"))
    # A rebuild with fewer splits must not leave an earlier build's split files that a glob would pick up.
    for split in {*SPLITS, SIMPLE_SPLIT} - set(dataset):
        stale = out / "parquet" / f"{split}.parquet"
        if stale.is_file():
            stale.unlink()
            logger.info("removed stale %s", stale)
        if (out / split / "state.json").is_file():
            shutil.rmtree(out / split)
            logger.info("removed stale %s", out / split)
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s (save_to_disk%s)", out, " + parquet/" if write_parquet else "")


def build_then_rename(path: str | Path, build: Callable[[Path], T], *, replace: bool = False) -> T:
    """`build(tmp)` into a private sibling folder of `path`, then rename it to `path`, and return what `build` returned.

    A rename is atomic on one filesystem, so no reader ever sees a partial dataset: not after a kill mid-build (a
    partial folder has no settings record and would be taken as given), nor when the first process of each node
    builds it at once on a filesystem the nodes share (main_process_first orders processes within a node only): the
    later copy is then discarded. With `replace`, an existing dataset at `path` (one with a settings record: the
    caller checked) is moved aside, the new one renamed in and the old one deleted: a rebuild killed half-way leaves
    the old dataset whole, not half-overwritten under its old settings record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp, old = path.parent / f".{path.name}.partial-{tag}", path.parent / f".{path.name}.old-{tag}"
    try:
        result = build(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty folder (made by the user beforehand) is replaced, not refused
        elif replace and path.exists():
            if recorded_settings(path) is None:
                raise ValueError(f"{path} is not a synthetic dataset (no {SETTINGS_FILE}): it is not replaced")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            logger.info("Another process built %s first: using its copy", path)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "SETTINGS_FILE",
    "SPLITS",
    "build_synthetic_dataset",
    "build_then_rename",
    "generate_split",
    "recorded_settings",
    "synthetic_features",
]
