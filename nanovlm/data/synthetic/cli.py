"""Command line of the synthetic dataset: `python -m nanovlm.data.synthetic --output_dir DIR` builds the dataset
(or reuses DIR when it already holds one built with the same settings) and prints its blind-guess table."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...evaluation.scoring import blind_guess_report, format_blind_guess_table
from .dataset import (
    SETTINGS_FILE,
    SIMPLE_SPLIT,
    _settings,
    build_synthetic_dataset,
    recorded_settings,
    settings_differences,
)
from .questions import QUESTION_TYPES

if TYPE_CHECKING:
    import datasets


def _parse_image_size(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            width, height = text.lower().split("x")
            return int(width), int(height)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like 64 or 96x64, got {text!r}") from None


def _parse_type_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--type_weights must look like color=1,count=2 (types {list(QUESTION_TYPES)}), got {text!r}"
            ) from None
    return weights


def build_arg_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m nanovlm.data.synthetic",
        description="Build the embedded synthetic VQA dataset (save_to_disk + parquet) and print its blind-guess "
        "accuracy per question type.",
    )
    parser.add_argument("--output_dir", required=True, help="destination folder")
    parser.add_argument("--num_train", type=int, default=4000, help="training samples")
    parser.add_argument("--num_validation", type=int, default=500, help="validation samples")
    parser.add_argument("--num_test", type=int, default=500, help="test samples")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (splits are disjoint streams of it)")
    parser.add_argument("--image_size", type=_parse_image_size, default=64, help="64 (square) or WIDTHxHEIGHT")
    parser.add_argument(
        "--type_weights",
        type=_parse_type_weights,
        default=None,
        help=f"relative question-type frequencies, e.g. color=1,count=1 (types: {', '.join(QUESTION_TYPES)}; "
        "missing types get 0)",
    )
    parser.add_argument("--multi_turn_fraction", type=float, default=0.3, help="share of samples with follow-ups")
    parser.add_argument("--max_turns", type=int, default=3, help="most turns per sample")
    parser.add_argument(
        "--train_multi_turn_fraction", type=float, default=None, help="--multi_turn_fraction for train only"
    )
    parser.add_argument("--train_max_turns", type=int, default=None, help="--max_turns for train only")
    parser.add_argument(
        "--num_train_simple",
        type=int,
        default=0,
        help=f"also write a {SIMPLE_SPLIT} split of single-object colour/count/position rows (a curriculum)",
    )
    parser.add_argument("--low_rating_fraction", type=float, default=0.05, help="low-rated turns in train")
    parser.add_argument("--eval_low_rating_fraction", type=float, default=0.0, help="low-rated turns in val/test")
    parser.add_argument(
        "--corrupt_low_rated_answers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give low-rated turns a wrong answer",
    )
    parser.add_argument("--no_parquet", action="store_true", help="skip the parquet copies")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild into --output_dir even when it holds data built with other settings (otherwise refused)",
    )
    return parser


# synthetic_config.json key -> the option of this command that sets it
_CLI_FLAGS = {
    "train": "num_train", "validation": "num_validation", "test": "num_test", SIMPLE_SPLIT: "num_train_simple",
}


def _existing_dataset(args: argparse.Namespace) -> bool:
    """True when --output_dir already holds the dataset these arguments build (reuse it); False when there is
    nothing there or --overwrite is given (build); raises ValueError when it holds other data."""
    out = Path(args.output_dir)
    if args.overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    built = recorded_settings(out)
    if built is None:
        raise ValueError(
            f"--output_dir {out} exists and is not a synthetic dataset (no {SETTINGS_FILE}); choose another "
            "--output_dir, or pass --overwrite to build into it"
        )
    _, _, requested = _settings(
        args.num_train, args.num_validation, args.num_test, args.seed, args.image_size, args.type_weights,
        args.multi_turn_fraction, args.max_turns, args.low_rating_fraction, args.eval_low_rating_fraction,
        args.corrupt_low_rated_answers, args.train_multi_turn_fraction, args.train_max_turns, args.num_train_simple,
    )
    differences = settings_differences(built, requested, _CLI_FLAGS)
    if differences:
        raise ValueError(
            f"--output_dir {out} holds a synthetic dataset built with other settings ({'; '.join(differences)}); "
            "pass --overwrite to rebuild it, or choose another --output_dir"
        )
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI entry point: build the dataset, then print the blind-guess table (the command's output) to stdout."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        reuse = _existing_dataset(args)
    except ValueError as error:
        build_arg_parser().error(str(error))
    if reuse:
        import datasets

        print(f"{args.output_dir} already holds this dataset (built with the same settings): reusing it.")
        dataset = datasets.load_from_disk(args.output_dir)
    else:
        dataset = _build_from_args(args)
    split = next(s for s in ("test", "validation", "train", SIMPLE_SPLIT) if s in dataset)
    report = blind_guess_report(dataset, split=split)
    per_question = blind_guess_report(dataset, split=split, per_question=True)
    source = "train" if "train" in dataset else split
    print(f"blind guess on {split} (majority answers from {source}):")
    print(format_blind_guess_table(report, per_question))
    return {t: e["accuracy"] for t, e in report.items()}


def _build_from_args(args: argparse.Namespace) -> datasets.DatasetDict:
    try:
        return build_synthetic_dataset(
            args.output_dir,
            args.num_train,
            args.num_validation,
            args.num_test,
            seed=args.seed,
            image_size=args.image_size,
            type_weights=args.type_weights,
            multi_turn_fraction=args.multi_turn_fraction,
            max_turns=args.max_turns,
            low_rating_fraction=args.low_rating_fraction,
            eval_low_rating_fraction=args.eval_low_rating_fraction,
            corrupt_low_rated_answers=args.corrupt_low_rated_answers,
            write_parquet=not args.no_parquet,
            train_multi_turn_fraction=args.train_multi_turn_fraction,
            train_max_turns=args.train_max_turns,
            num_train_simple=args.num_train_simple,
        )
    except ValueError as error:
        build_arg_parser().error(str(error))


__all__ = ["build_arg_parser", "main"]
