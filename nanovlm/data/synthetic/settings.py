"""`SyntheticSettings`: everything a synthetic dataset is built from, declared once.

Its readers: `build_synthetic_dataset` (builds what it describes), the command line `python -m nanovlm.data.synthetic`
(one `--<field>` option per field), the training recipe (`--synthetic_<field>` for the fields it exposes, see
`nanovlm.training.arguments.SYNTHETIC_FLAG_DEFAULTS`), the record `synthetic_config.json` (`record`) and the check that
a folder was built with the requested settings (`differences`).

Field metadata: `help` (the option's help), and the bounds the training recipe checks its flags against: `min` (an
integer >= it) or `range` (a number in [low, high]). Values the generator cannot use are refused by `SyntheticConfig`
when the settings are made, naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .questions import QUESTION_TYPES, SyntheticConfig
from .scenes import MIN_IMAGE_SIDE

# A curriculum split of single-object scenes (`SyntheticSettings.num_train_simple`).
SIMPLE_SPLIT = "train_simple"
SIMPLE_TYPE_WEIGHTS: dict[str, float] = {"color": 1.0, "count": 1.0, "position": 1.0}


def simple_config(train_config: SyntheticConfig) -> SyntheticConfig:
    """The `train_simple` split's config: the train split's settings with one shape per image and colour, count
    and position questions in equal shares."""
    return replace(train_config, max_shapes=1, type_weights=SIMPLE_TYPE_WEIGHTS)


@dataclass(frozen=True)
class SyntheticSettings:
    """What `build_synthetic_dataset` builds: samples per split, the seed and the sampling settings of each split.

    The splits `train`, `validation` and `test` (and `train_simple` when `num_train_simple` > 0) share `image_size`,
    `type_weights` and `corrupt_low_rated_answers` (see `SyntheticConfig`); the train-only settings leave the
    validation and test splits, and so the blind guess measured on them, unchanged. A split with 0 samples is left out.
    """

    num_train: int = field(default=4000, metadata={"help": "training samples", "min": 0})
    num_validation: int = field(default=500, metadata={"help": "validation samples", "min": 0})
    num_test: int = field(default=500, metadata={"help": "test samples", "min": 0})
    seed: int = field(default=0, metadata={"help": "dataset seed (splits are disjoint streams of it)"})
    image_size: int | tuple[int, int] = field(
        default=64,
        metadata={
            "help": "side of the square images in pixels (python -m nanovlm.data.synthetic also takes WIDTHxHEIGHT)",
            "min": MIN_IMAGE_SIDE,
        },
    )
    type_weights: Mapping[str, float] | None = field(
        default=None,
        metadata={
            "help": f"relative question-type frequencies, e.g. color=1,count=1 (types: {', '.join(QUESTION_TYPES)}; "
            "missing types get 0)"
        },
    )
    multi_turn_fraction: float = field(default=0.3, metadata={"help": "share of samples with follow-ups"})
    max_turns: int = field(default=3, metadata={"help": "most turns per sample"})
    train_multi_turn_fraction: float | None = field(
        default=None,
        metadata={
            "help": "share of training samples with follow-up questions about the same image; validation and test "
            "keep multi_turn_fraction (0.3 by default), as does train when this is unset",
            "range": (0, 1),
        },
    )
    train_max_turns: int | None = field(
        default=None,
        metadata={
            "help": "most turns per training sample (follow-ups ask one question per type, so at most 4 are "
            "reached); validation and test keep max_turns (3 by default), as does train when this is unset",
            "min": 1,
        },
    )
    num_train_simple: int = field(
        default=0,
        metadata={
            "help": f"rows of a {SIMPLE_SPLIT} split of single-object colour/count/position scenes, a curriculum "
            f"to read first (the recipe's --curriculum_split {SIMPLE_SPLIT}); 0 writes none",
            "min": 0,
        },
    )
    low_rating_fraction: float = field(default=0.05, metadata={"help": "low-rated turns in train"})
    eval_low_rating_fraction: float = field(default=0.0, metadata={"help": "low-rated turns in val/test"})
    corrupt_low_rated_answers: bool = field(default=True, metadata={"help": "give low-rated turns a wrong answer"})

    def __post_init__(self) -> None:
        for split, n in self.counts.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
        if sum(self.counts.values()) == 0:
            raise ValueError("num_train, num_validation and num_test are all 0; ask for at least one sample")
        self.split_configs()  # SyntheticConfig refuses what the generator cannot use, naming the field

    @property
    def counts(self) -> dict[str, int]:
        """Samples per split."""
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test,
                SIMPLE_SPLIT: self.num_train_simple}

    def split_configs(self) -> dict[str, SyntheticConfig]:
        """The `SyntheticConfig` of each split."""
        size = self.image_size
        base = SyntheticConfig(
            image_size=size if isinstance(size, int) else tuple(size),
            type_weights=self.type_weights,
            multi_turn_fraction=self.multi_turn_fraction,
            max_turns=self.max_turns,
            low_rating_fraction=self.low_rating_fraction,
            corrupt_low_rated_answers=self.corrupt_low_rated_answers,
        )
        eval_config = replace(base, low_rating_fraction=self.eval_low_rating_fraction)
        turns, fraction = self.train_max_turns, self.train_multi_turn_fraction
        try:
            train_config = replace(
                base,
                multi_turn_fraction=self.multi_turn_fraction if fraction is None else fraction,
                max_turns=self.max_turns if turns is None else turns,
            )
        except ValueError as error:  # name the train-only field the user set
            raise ValueError(f"train_{error}") from None
        return {"train": train_config, "validation": eval_config, "test": eval_config,
                SIMPLE_SPLIT: simple_config(train_config)}

    def record(self) -> dict[str, Any]:
        """The record `synthetic_config.json` holds, as JSON reads it back (tuples as lists). Keyed as datasets built
        before this class record it: each split's count under the split's name, then the validation/test config."""
        configs = self.split_configs()
        train, evaluation = configs["train"], configs["validation"]
        record = {
            "seed": self.seed,
            **self.counts,
            **asdict(evaluation),
            "low_rating_fraction": train.low_rating_fraction,
            "eval_low_rating_fraction": self.eval_low_rating_fraction,
            "train_multi_turn_fraction": train.multi_turn_fraction,
            "train_max_turns": train.max_turns,
        }
        return json.loads(json.dumps(record))

    def differences(self, built: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> list[str]:
        """One "--flag: requested X, built Y" per setting the `built` record holds differently.

        Args:
            built: a `synthetic_config.json` record (`recorded_settings`).
            flags: field name -> the option that sets it, for the fields to compare; None compares every setting,
                each under its field name.
        """
        problems = []
        for key, value in self.record().items():
            name = f"num_{key}" if key in self.counts else key  # a count is recorded under its split's name
            if flags is not None and name not in flags:
                continue
            if built.get(key) != value:
                flag = name if flags is None else flags[name]
                problems.append(f"--{flag}: requested {value!r}, built {built.get(key)!r}")
        return problems


__all__ = ["SIMPLE_SPLIT", "SIMPLE_TYPE_WEIGHTS", "SyntheticSettings", "simple_config"]
