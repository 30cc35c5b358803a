"""Command line of the synthetic dataset: `python -m nanovlm.data.synthetic --output_dir DIR` builds the dataset
(or reuses DIR when it already holds one built with the same settings) and prints its blind-guess table."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from ...evaluation.scoring import blind_guess_report, format_blind_guess_table
from .dataset import SETTINGS_FILE, build_synthetic_dataset, build_then_rename, recorded_settings
from .questions import QUESTION_TYPES
from .settings import SIMPLE_SPLIT, SyntheticSettings


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


# Options whose strings are not plain numbers: how each is read.
_PARSERS = {"image_size": _parse_image_size, "type_weights": _parse_type_weights}


def _option_type(hint: Any) -> Any:
    """int for `int | None`, float for `float`: the type argparse converts an option's string with."""
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)


def build_arg_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: `--output_dir`, one option per `SyntheticSettings` field, `--no_parquet` and
    `--overwrite`."""
    parser = argparse.ArgumentParser(
        prog="python -m nanovlm.data.synthetic",
        description="Build the embedded synthetic VQA dataset (save_to_disk + parquet) and print its blind-guess "
        "accuracy per question type.",
    )
    parser.add_argument("--output_dir", required=True, help="destination folder")
    hints = typing.get_type_hints(SyntheticSettings)
    for setting in dataclasses.fields(SyntheticSettings):
        option: dict[str, Any] = {"default": setting.default, "help": setting.metadata["help"]}
        if hints[setting.name] is bool:
            option["action"] = argparse.BooleanOptionalAction
        else:
            option["type"] = _PARSERS.get(setting.name) or _option_type(hints[setting.name])
        parser.add_argument(f"--{setting.name}", **option)
    parser.add_argument("--no_parquet", action="store_true", help="skip the parquet copies")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the synthetic dataset in --output_dir even when it was built with other settings (otherwise "
        "refused); a folder of other files is never replaced",
    )
    return parser


def _existing_dataset(out: Path, settings: SyntheticSettings, overwrite: bool) -> bool:
    """True when `out` already holds the dataset `settings` describe (reuse it); False when there is nothing
    there, or a synthetic dataset and `overwrite` is set (build); raises ValueError when it holds other data (a
    folder of other files even with `overwrite`)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    built = recorded_settings(out)
    if built is None:  # --overwrite replaces a synthetic dataset only, never a folder of other files
        raise ValueError(
            f"--output_dir {out} exists and is not a synthetic dataset (no {SETTINGS_FILE}); choose another "
            "--output_dir"
        )
    if overwrite:
        return False
    differences = settings.differences(built)
    if differences:
        raise ValueError(
            f"--output_dir {out} holds a synthetic dataset built with other settings ({'; '.join(differences)}); "
            "pass --overwrite to rebuild it, or choose another --output_dir"
        )
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI entry point: build the dataset, then print the blind-guess table (the command's output) to stdout."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = SyntheticSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSettings)})
        if _existing_dataset(Path(args.output_dir), settings, args.overwrite):
            print(f"{args.output_dir} already holds this dataset (built with the same settings): reusing it.")
            dataset = datasets.load_from_disk(args.output_dir)
        else:
            # built aside and renamed in: a build killed half-way never leaves a partial dataset, nor (--overwrite)
            # half a new dataset under the old one's settings record, read later as the old one
            dataset = build_then_rename(
                args.output_dir, lambda tmp: build_synthetic_dataset(tmp, settings, write_parquet=not args.no_parquet),
                replace=args.overwrite,
            )
    except ValueError as error:
        parser.error(str(error))
    split = next(s for s in ("test", "validation", "train", SIMPLE_SPLIT) if s in dataset)
    report = blind_guess_report(dataset, split=split)
    per_question = blind_guess_report(dataset, split=split, per_question=True)
    source = "train" if "train" in dataset else split
    print(f"blind guess on {split} (majority answers from {source}):")
    print(format_blind_guess_table(report, per_question))
    return {t: e["accuracy"] for t, e in report.items()}

__all__ = ["build_arg_parser", "main"]
