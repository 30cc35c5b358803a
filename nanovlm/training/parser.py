"""One command line for the training recipe: a YAML file via `--config` supplies defaults, CLI flags override it.

    python train_accelerate.py --config configs/train/demo.yaml --output_dir runs/demo --lr_mp 1e-3

The YAML is a flat mapping of field names of `ModelArguments`, `DataArguments` and `NanoVLMTrainingArguments`;
dict-valued fields (`model_config`, `accelerator_config`, `lr_scheduler_kwargs`, ...) may hold nested mappings and
list-valued fields lists. Unlike plain `HfArgumentParser`:

- an unknown YAML key fails, naming the key and the file and suggesting close field names; so does an unknown CLI
  flag, and unique prefixes of flags are not accepted (`--lr 1` is an error, not `--lr_mp 1`);
- YAML values are converted and checked like CLI strings (`lr_mp: abc` fails naming `lr_mp` and the file);
- booleans parse from YAML (`true`/`false`) and CLI (`--compile false`, `--compile true`, bare `--compile`), also for
  optional booleans such as `--bf16`;
- `null` / `none` (any case) unset an optional field, from the CLI or the YAML (`--curriculum_split none` drops the
  demo's curriculum), except `report_to`, where "none" names no logger;
- parse and validation errors raise `ValueError` (`ArgumentsError` lists every invalid value of all three
  dataclasses at once) instead of exiting, so callers and tests see the message;
- `--output_dir` is required, from the YAML or the CLI; an empty `--config` file is an error, not "all defaults";
- without validation data (`--val_size 0` and no `--eval_split`) the default `--eval_strategy steps` becomes "no";
  an explicit `--eval_strategy` or `--load_best_model_at_end` then fails naming the fix.
"""

import argparse
import copy
import dataclasses
import difflib
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .arguments import ArgumentsError, DataArguments, ModelArguments, NanoVLMTrainingArguments
from .checks import RULE_KEYS

logger = logging.getLogger(__name__)

DATACLASS_TYPES = (ModelArguments, DataArguments, NanoVLMTrainingArguments)
# Optional fields whose "none" is a value of its own, not "unset": Trainer's `report_to none` means no logger.
NONE_IS_A_VALUE = frozenset({"report_to"})
NONE_WORDS = ("none", "null")


def _type_allows(hint: Any, kind: type) -> bool:
    """Whether a field's type hint accepts values of `kind` (dict or list), looking through unions and generics."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_allows(arg, kind) for arg in typing.get_args(hint))
    target = origin or hint
    return isinstance(target, type) and issubclass(target, kind)


def _type_allows_none(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(hint)


def _did_you_mean(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + m for m in matches)}?)" if matches else ""


class NanoVLMArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over the three argument dataclasses plus `--config FILE.yaml`.

    Errors raise `ValueError` instead of printing usage and exiting; `--help` still prints and exits.
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("description", "Train a nanovlm model. YAML recipes via --config; CLI flags override them.")
        super().__init__(DATACLASS_TYPES, **kwargs)
        self.add_argument(
            "--config",
            type=str,
            default=None,
            help="YAML file with a flat mapping of argument names to values; CLI flags override it.",
        )
        # HfArgumentParser adds `--no_X` only to a bool defaulting to True; --normalize_images defaults to None (a
        # checkpoint's own value) and keeps the `--no_normalize_images` it had.
        self.add_argument("--no_normalize_images", dest="normalize_images", action="store_false", default=None,
                          help="same as --normalize_images false")
        # HfArgumentParser makes `bool | None` fields (bf16, tf32, ...) require a value; accept a bare flag as True.
        for action in self._actions:
            if action.type is string_to_bool and action.nargs is None:
                action.nargs, action.const = "?", True
        self.field_types: dict[str, Any] = {}
        for dtype in DATACLASS_TYPES:
            hints = typing.get_type_hints(dtype)
            self.field_types.update({f.name: hints[f.name] for f in dataclasses.fields(dtype) if f.init})
        # the field's own flag, not its `--no_*` complement (same dest, store_false)
        self._actions_by_dest = {
            a.dest: a for a in self._actions if a.dest in self.field_types and f"--{a.dest}" in a.option_strings
        }

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        """HfArgumentParser's, without the metadata keys that declare bounds (`checks.RULE_KEYS`): it passes a
        field's whole metadata to `add_argument`, which refuses keys it does not know."""
        if RULE_KEYS & set(field.metadata):
            field = copy.copy(field)
            field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k not in RULE_KEYS})
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str) -> typing.NoReturn:
        """Raise instead of argparse's print-usage-and-exit."""
        raise ValueError(f"{message} (run with --help to list the options)")

    # ---- YAML

    def load_config(self, path: str | Path) -> dict[str, Any]:
        """Read a YAML recipe and convert every value like its CLI flag would be; raises naming key and file."""
        path = Path(path)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"--config {path}: {what}; pass the path of a YAML recipe (configs/train/)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:  # PyYAML's message spans lines (with a caret): flatten
            raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if data is None:  # an empty file is a wrong or truncated path, not a recipe: every default would apply
            raise ValueError(
                f"--config {path}: the file holds no settings (empty or only comments); pass a recipe such as "
                "configs/train/demo.yaml, or drop --config and give the flags on the command line"
            )
        if not isinstance(data, dict):
            raise ValueError(
                f"--config {path}: must be a mapping of argument names to values, got {type(data).__name__}"
            )
        errors: list[str] = []
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in self.field_types:
                errors.append(f"unknown key `{key}` in {path}{_did_you_mean(str(key), list(self.field_types))}")
                continue
            try:
                values[key] = self._convert(key, value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                errors.append(f"`{key}` in {path}: {exc}")
        if errors:
            raise ArgumentsError(errors)
        return values

    def _convert(self, key: str, value: Any) -> Any:
        """Convert one YAML value with the type (and choices) of its CLI flag; nested mappings/lists where allowed."""
        hint, action = self.field_types[key], self._actions_by_dest[key]
        if isinstance(value, str) and value.strip().lower() in NONE_WORDS and self._unsets_none(key):
            value = None
        if value is None:
            if _type_allows_none(hint):
                return None
            raise ValueError("must not be null")
        if isinstance(value, dict):
            if _type_allows(hint, dict):
                return value
            raise ValueError(f"must be a single value, not a mapping: got {value!r}")
        if action.nargs in ("+", "*"):  # list fields: a scalar means a one-element list
            items = value if isinstance(value, list) else [value]
            return [self._convert_scalar(action, item) for item in items]
        if isinstance(value, list):
            if _type_allows(hint, list):
                return [str(item) for item in value]
            raise ValueError(f"must be a single value, not a list: got {value!r}")
        return self._convert_scalar(action, value)

    @staticmethod
    def _convert_scalar(action: argparse.Action, value: Any) -> Any:
        if isinstance(value, (list, dict)):
            raise ValueError(f"must be a single value: got {value!r}")
        if action.type is string_to_bool:
            if isinstance(value, bool):
                return value
            if not isinstance(value, str):
                raise ValueError(f"must be true or false: got {value!r}")
        elif action.type in (int, float) and isinstance(value, bool):
            raise ValueError(f"must be a number, not a boolean: got {value!r}")
        elif action.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"must be an integer: got {value!r}")
        converter = action.type or str
        try:
            converted = converter(value if isinstance(value, str) else str(int(value) if converter is int else value))
        except (ValueError, TypeError) as exc:
            kind = getattr(converter, "__name__", "value")
            raise ValueError(f"invalid {kind} value: {value!r}") from exc
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"must be one of {list(action.choices)}: got {value!r}")
        return converted

    # ---- CLI

    def parse(
        self, argv: Sequence[str] | None = None
    ) -> tuple[ModelArguments, DataArguments, NanoVLMTrainingArguments]:
        """Parse `argv` (None: `sys.argv[1:]`) with the `--config` YAML as defaults; see `parse_args`."""
        argv = sys.argv[1:] if argv is None else list(argv)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", default=None)
        pre_namespace, _ = pre.parse_known_args(argv)
        from_yaml = {} if pre_namespace.config is None else self.load_config(pre_namespace.config)
        self.set_defaults(**from_yaml)
        argv_without_none, unset = self._pop_none_flags(argv)
        namespace, remaining = self.parse_known_args(argv_without_none)
        for name in unset:
            setattr(namespace, name, None)
        if remaining:
            self._unknown(remaining)
        values = vars(namespace)
        config = values.pop("config")
        if values.get("output_dir") is None:
            where = f"set output_dir in {config} or " if config else ""
            raise ValueError(f"--output_dir is required: {where}pass --output_dir DIR")

        errors: list[str] = []
        model_args = self._build(ModelArguments, values, errors)
        data_args = self._build(DataArguments, values, errors)
        if data_args is not None:  # the training arguments' evaluation settings follow the data's validation split
            explicit = set(from_yaml) | self._flags_given(argv)
            errors += self._resolve_evaluation(values, explicit, data_args.has_validation)
        training_args = self._build(NanoVLMTrainingArguments, values, errors)
        if errors:
            raise ArgumentsError(errors)
        return model_args, data_args, training_args

    @staticmethod
    def _build(dtype: type, values: dict[str, Any], errors: list[str]) -> Any:
        """`dtype` from its fields in `values`, or None with its problems added to `errors`."""
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            return dtype(**{k: v for k, v in values.items() if k in keys})
        except ArgumentsError as exc:
            errors += exc.errors
        except ValueError as exc:  # TrainingArguments' own checks; some span lines: one line each, as ours
            errors.append(" ".join(str(exc).split()))
        return None

    def _unsets_none(self, name: str) -> bool:
        """Whether `null` / `none` unsets field `name` (an optional field where "none" is not a value of its own)."""
        hint = self.field_types.get(name)
        return hint is not None and name not in NONE_IS_A_VALUE and _type_allows_none(hint)

    def _pop_none_flags(self, argv: list[str]) -> tuple[list[str], set[str]]:
        """(argv without `--flag none` / `--flag=null` (any case) of optional fields, the fields they unset).
        Taken out before argparse, whose int/float/bool converters would reject the word. As in argparse, the last
        occurrence of a flag wins: `--flag none --flag x` sets x, `--flag x --flag none` unsets."""
        kept, unset, i = [], set(), 0
        while i < len(argv):
            flag, eq, inline = argv[i].partition("=")
            action = self._option_string_actions.get(flag) if flag.startswith("--") else None
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            takes_value = action is not None and action.nargs != 0 and value is not None  # not a bare last flag
            if takes_value and self._unsets_none(action.dest) and value.strip().lower() in NONE_WORDS:
                unset.add(action.dest)
                i += 1 if eq else 2
                continue
            if action is not None:  # a later value overrides an earlier `none`, as argparse's last flag wins
                unset.discard(action.dest)
            kept.append(argv[i])
            i += 1
        return kept, unset

    def _flags_given(self, argv: Sequence[str]) -> set[str]:
        """Destinations of the flags present in `argv`."""
        flags = (item.split("=", 1)[0] for item in argv if item.startswith("--"))
        return {self._option_string_actions[f].dest for f in flags if f in self._option_string_actions}

    @staticmethod
    def _resolve_evaluation(values: dict[str, Any], explicit: set[str], has_validation: bool) -> list[str]:
        """Without validation data (`--val_size 0`, no `--eval_split`) the default `eval_strategy="steps"` becomes
        "no" (Trainer refuses to evaluate without an eval dataset); an explicit one is an error naming the fix."""
        if has_validation:
            if "load_best_model_at_end" not in explicit:
                values["load_best_model_at_end"] = True  # track the best checkpoint by eval_loss, save it at the end
            return []
        errors = []
        strategy = getattr(values.get("eval_strategy"), "value", values.get("eval_strategy"))
        if strategy != "no":
            if "eval_strategy" in explicit:
                errors.append(
                    f"--eval_strategy {strategy} needs validation data: got --val_size 0 and no --eval_split; set "
                    "--val_size N (held out from the training split) or --eval_split NAME, or --eval_strategy no"
                )
            else:
                logger.info("No validation data (--val_size 0, no --eval_split): setting --eval_strategy no")
                values["eval_strategy"] = "no"
        if values.get("load_best_model_at_end"):
            errors.append(
                "--load_best_model_at_end needs validation data: got --val_size 0 and no --eval_split; set "
                "--val_size N or --eval_split NAME, or --load_best_model_at_end false"
            )
        return errors

    def _unknown(self, remaining: list[str]) -> typing.NoReturn:
        """Raise naming every unknown flag (with close matches) and stray value."""
        problems, after_unknown_flag = [], False
        for item in remaining:
            if item.startswith("-"):
                flag = item.split("=", 1)[0]
                name = flag.lstrip("-").replace("-", "_")
                problems.append(f"unknown option {flag}{_did_you_mean(name, list(self.field_types), '--')}")
                after_unknown_flag = "=" not in item
            elif after_unknown_flag:  # the unknown option's value
                after_unknown_flag = False
            else:
                problems.append(f"unexpected value {item!r} (each value follows its --flag)")
        raise ValueError("; ".join(problems) + " (run with --help to list the options)")


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, NanoVLMTrainingArguments]:
    """Parse the training command line into `(ModelArguments, DataArguments, NanoVLMTrainingArguments)`.

    `--config FILE.yaml` supplies defaults; CLI flags override them. Raises `FileNotFoundError` for a missing config
    file and `ValueError` naming the key/flag for an unknown key or flag, a value of the wrong type, a missing
    `--output_dir`, or invalid values (all invalid values of the three dataclasses are listed in one `ArgumentsError`).

    Args:
        argv: the arguments without the program name; None reads `sys.argv[1:]`.
    """
    return NanoVLMArgumentParser().parse(argv)


__all__ = ["NanoVLMArgumentParser", "parse_args"]
