"""The checks the argument dataclasses share. Each appends a message naming the flag, the value and the fix to
`errors` instead of raising, so `ArgumentsError` reports all problems at once.

`field_errors` checks the rules fields declare in their metadata: `min` (an integer >= it), `range` (a number in
[low, high]) and `choices`.
"""

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

# Metadata keys that declare a field's bounds for `field_errors`; argparse does not know them (the parser drops them).
RULE_KEYS = frozenset({"min", "range"})


def is_local_path(name: str) -> bool:
    """Whether a model/checkpoint argument means a local path rather than a hub id: it exists here, starts like a
    path (`.`, `/`, `~`), or is not of the hub's `org/name` form. The CLIs and the trainer use it to say "no such
    folder" at once instead of trying the hub."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def folder_overlap(folder: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `folder` lies relative to `other` on disk, after `~`, `..` and symlinks: "same", "inside" (within
    `other`), "contains" (`other` is within it) or None. Writers of output folders (nanovlm-convert, the LoRA merge)
    use it to refuse an output that would write into, or with an overwrite delete, one of their inputs."""
    a = Path(os.path.realpath(os.path.expanduser(folder)))
    b = Path(os.path.realpath(os.path.expanduser(other)))
    if a == b:
        return "same"
    if a.is_relative_to(b):
        return "inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_output_folder(output: str | os.PathLike, inputs: dict[str, str | os.PathLike], overwrite: bool, *,
                        name: str, overwrite_flag: str) -> None:
    """Refuse, in one line naming `name` (the flag or argument), an `output` folder that is, lies in or holds one of
    the local `inputs` ({what: folder}; hub ids are skipped), is a file, or (without `overwrite`, spelled
    `overwrite_flag` for the user) is not empty: `save_pretrained` writes into any folder silently, so a converted or
    merged model replaced a trained checkpoint's weights and kept its card and training files, and an overwrite
    holding an input deleted it. Raises ValueError (an input at stake) or FileExistsError. nanovlm-convert and the
    LoRA merge call it before loading anything."""
    for what, folder in inputs.items():
        if not os.path.exists(os.path.expanduser(folder)):
            continue  # a hub id: nothing here to overwrite
        relation = folder_overlap(output, folder)
        if relation is not None:
            how = {"same": f"is the {what} folder, which it would overwrite",
                   "inside": f"lies inside the {what} folder {folder}",
                   "contains": f"holds the {what} folder {folder}, which {overwrite_flag} would delete"}[relation]
            raise ValueError(f"{name} {output} {how}; pass a folder outside it")
    out = Path(os.path.expanduser(output))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{name} {output} is a file; pass a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{name} {output} exists and is not empty; pass a new folder, or {overwrite_flag} to "
                              "replace its contents")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(errors: list[str], name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """`--name` must be an int >= minimum (or None when `optional`)."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        errors.append(f"--{name} must be an integer >= {minimum}{' or None' if optional else ''}: got {value!r}")


def check_range(
    errors: list[str], name: str, value: Any, low: float, high: float, high_inclusive: bool = True
) -> None:
    """`--name` must be a number in [low, high] (or [low, high))."""
    bracket = "]" if high_inclusive else ")"
    inside = is_number(value) and math.isfinite(value) and low <= value
    inside = inside and (value <= high if high_inclusive else value < high)
    if not inside:
        errors.append(f"--{name} must be a number in [{low}, {high}{bracket}: got {value!r}")


def field_errors(args: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """The problems with the rules `args`' fields declare (fields in `skip` aside): metadata `min` (an integer >= it;
    None too when the default is None), `range` ((low, high[, high_inclusive])), `choices`, and true or false for a
    `bool` field. (The parser already enforces them; this catches arguments built in Python.)"""
    errors: list[str] = []
    for spec in dataclasses.fields(args):
        if spec.name in skip:
            continue
        value, rules = getattr(args, spec.name), spec.metadata
        if spec.type in (bool, "bool") and not isinstance(value, bool):
            errors.append(f"--{spec.name} must be true or false: got {value!r}")
        if "min" in rules:
            check_int(errors, spec.name, value, rules["min"], optional=spec.default is None)
        if "range" in rules:
            check_range(errors, spec.name, value, *rules["range"])
        if "choices" in rules and value not in rules["choices"]:
            errors.append(f"--{spec.name} must be one of {list(rules['choices'])}: got {value!r}")
    return errors


def parse_json_dict(errors: list[str], name: str, value: Any) -> dict[str, Any] | None:
    """A dict field given as a dict, a JSON object string (the CLI form) or None."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            errors.append(f"--{name} must be a JSON object such as '{{\"key\": 1}}' ({exc.msg}): got {value!r}")
            return None
        if isinstance(parsed, dict):
            return parsed
    errors.append(f"--{name} must be a mapping (a YAML mapping or a JSON object string): got {value!r}")
    return None


def as_str_list(errors: list[str], name: str, value: Any) -> list[str] | None:
    """A list-of-strings field given as a list, a single string, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        errors.append(f"--{name} must be a list of non-empty strings: got {value!r}")
        return None
    return list(value)
