"""Split building and I/O for the synthetic dataset: `generate_split` (one in-memory `datasets.Dataset`),
`build_synthetic_dataset` (train/validation/test, optionally a `train_simple` curriculum split, written as
save_to_disk + parquet + the settings record `synthetic_config.json`), and reading that record back to tell whether
a folder was built with other settings.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .questions import RATING_COLUMNS, SyntheticConfig, iter_samples

if TYPE_CHECKING:  # imported lazily at run time: rendering samples needs only PIL
    import datasets

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# A curriculum split of single-object scenes (see `build_synthetic_dataset(num_train_simple=...)`).
SIMPLE_SPLIT = "train_simple"
SIMPLE_TYPE_WEIGHTS: dict[str, float] = {"color": 1.0, "count": 1.0, "position": 1.0}


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


def simple_config(train_config: SyntheticConfig) -> SyntheticConfig:
    """The `train_simple` split's config: the train split's settings with one shape per image and colour, count
    and position questions in equal shares."""
    return replace(train_config, max_shapes=1, type_weights=SIMPLE_TYPE_WEIGHTS)


def _settings(
    num_train: int, num_validation: int, num_test: int, seed: int, image_size: int | tuple[int, int],
    type_weights: Mapping[str, float] | None, multi_turn_fraction: float, max_turns: int, low_rating_fraction: float,
    eval_low_rating_fraction: float, corrupt_low_rated_answers: bool, train_multi_turn_fraction: float | None,
    train_max_turns: int | None, num_train_simple: int,
) -> tuple[dict[str, int], dict[str, SyntheticConfig], dict[str, Any]]:
    """(samples per split, config per split, the settings record `synthetic_config.json` holds, as JSON reads it
    back) for `build_synthetic_dataset`'s arguments; raises ValueError naming a bad one."""
    counts = {"train": num_train, "validation": num_validation, "test": num_test, SIMPLE_SPLIT: num_train_simple}
    for split, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
    if sum(counts.values()) == 0:
        raise ValueError("num_train, num_validation and num_test are all 0; ask for at least one sample")
    train_config = SyntheticConfig(
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        type_weights=type_weights,
        multi_turn_fraction=multi_turn_fraction,
        max_turns=max_turns,
        low_rating_fraction=low_rating_fraction,
        corrupt_low_rated_answers=corrupt_low_rated_answers,
    )
    eval_config = replace(train_config, low_rating_fraction=eval_low_rating_fraction)
    try:
        train_config = replace(
            train_config,
            multi_turn_fraction=multi_turn_fraction if train_multi_turn_fraction is None else train_multi_turn_fraction,
            max_turns=max_turns if train_max_turns is None else train_max_turns,
        )
    except ValueError as error:  # name the train-only option the user gave
        raise ValueError(f"train_{error}") from None
    configs = {
        "train": train_config,
        "validation": eval_config,
        "test": eval_config,
        SIMPLE_SPLIT: simple_config(train_config),
    }
    record = {
        "seed": seed,
        **counts,
        **asdict(eval_config),
        "low_rating_fraction": train_config.low_rating_fraction,
        "eval_low_rating_fraction": eval_low_rating_fraction,
        "train_multi_turn_fraction": train_config.multi_turn_fraction,
        "train_max_turns": train_config.max_turns,
    }
    return counts, configs, json.loads(json.dumps(record))


def recorded_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings a synthetic dataset folder was built with (its `synthetic_config.json`), or None when the
    folder has none (not built by `build_synthetic_dataset`)."""
    record_file = Path(path) / SETTINGS_FILE
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    record.setdefault("train_simple", 0)  # written before the curriculum split existed
    return record


def settings_differences(
    built: Mapping[str, Any], requested: Mapping[str, Any], flags: Mapping[str, str]
) -> list[str]:
    """One "--flag: requested X, built Y" per setting of `requested` that the `built` record holds differently
    (keys as `synthetic_config.json` names them; `flags` maps each to the option that sets it)."""
    requested = json.loads(json.dumps(requested))  # tuples -> lists, as the record reads back
    return [
        f"--{flags.get(key, key)}: requested {value!r}, built {built.get(key)!r}"
        for key, value in requested.items()
        if built.get(key) != value
    ]


# Over 60 lines only through its signature and docstring (one keyword per generator setting); the body is short.
def build_synthetic_dataset(
    output_dir: str | Path | None,
    num_train: int,
    num_validation: int,
    num_test: int,
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    type_weights: Mapping[str, float] | None = None,
    multi_turn_fraction: float = 0.3,
    max_turns: int = 3,
    low_rating_fraction: float = 0.05,
    eval_low_rating_fraction: float = 0.0,
    corrupt_low_rated_answers: bool = True,
    write_parquet: bool = True,
    train_multi_turn_fraction: float | None = None,
    train_max_turns: int | None = None,
    num_train_simple: int = 0,
) -> datasets.DatasetDict:
    """Build train/validation/test splits and write them to `output_dir`.

    Writes `save_to_disk(output_dir)` (read back with `datasets.load_from_disk`), `output_dir/parquet/{split}.parquet`
    (read back with `load_dataset("parquet", data_files=...)`; images decode as PIL) and
    `output_dir/synthetic_config.json` (the arguments, for reproducing the data). `output_dir=None` writes nothing.

    Args:
        output_dir: destination folder, or None to only return the data.
        num_train, num_validation, num_test: samples per split (a split with 0 samples is left out).
        seed: dataset seed; the three splits are disjoint streams of it.
        image_size: side of square images, or (width, height).
        type_weights, multi_turn_fraction, max_turns, corrupt_low_rated_answers: see `SyntheticConfig`.
        low_rating_fraction: fraction of low-rated turns in the train split.
        eval_low_rating_fraction: the same for validation and test (0 keeps evaluation references all correct).
        write_parquet: also write the parquet copies.
        train_multi_turn_fraction, train_max_turns: `multi_turn_fraction` and `max_turns` for the train split only
            (None: the same as the other splits). More follow-up turns per training image give more supervised
            answers per image encoded, while validation and test keep the standard mix that the blind guess is
            measured on.
        num_train_simple: also write a `train_simple` split of this many single-object rows (`max_shapes=1`,
            colour, count and position questions in equal shares, otherwise the train split's settings): a
            curriculum to read before the train split (`--curriculum_split train_simple`). A tiny model trained
            from scratch learns to read where a shape is from these; from the full mix alone it did not (see
            BENCHMARKS.md, "Demo").

    Returns:
        The `datasets.DatasetDict` that was written.
    """
    import datasets

    counts, configs, record = _settings(
        num_train, num_validation, num_test, seed, image_size, type_weights, multi_turn_fraction, max_turns,
        low_rating_fraction, eval_low_rating_fraction, corrupt_low_rated_answers, train_multi_turn_fraction,
        train_max_turns, num_train_simple,
    )
    splits = {}
    for split, n in counts.items():
        if n == 0:
            continue
        start = time.perf_counter()
        splits[split] = generate_split(n, split, seed, configs[split])
        elapsed = time.perf_counter() - start
        logger.info("generated %d %s samples in %.2f s (%.0f samples/s)", n, split, elapsed, n / max(elapsed, 1e-9))
    dataset = datasets.DatasetDict(splits)
    if output_dir is not None:
        _write_dataset(dataset, Path(output_dir), write_parquet, record)
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


__all__ = [
    "SETTINGS_FILE",
    "SIMPLE_SPLIT",
    "SIMPLE_TYPE_WEIGHTS",
    "SPLITS",
    "build_synthetic_dataset",
    "generate_split",
    "recorded_settings",
    "settings_differences",
    "simple_config",
    "synthetic_features",
]
