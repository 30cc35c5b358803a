"""The errors `train_accelerate.py` reports as one line and a non-zero exit instead of a traceback.

- `ArgumentsError`: invalid arguments, every problem of the YAML recipe and the command line at once (one line each).
- `UsageError`: a startup problem the user fixes on the command line (a missing dataset, a `--seq_length` too small
  for one image, a checkpoint saved with other settings); the message names the flag, the value and the fix.
- `NonFiniteLossError`: training stopped after `--max_consecutive_nonfinite_losses` NaN/inf losses in a row.
- (`nanovlm.data.packing.NoSamplesError`, from the data layer: a whole epoch gave no usable sample.)

Both subclass the built-in exceptions code already catches (`ValueError`, `RuntimeError`).
"""

from __future__ import annotations


class ArgumentsError(ValueError):
    """Invalid arguments; `errors` holds one line per problem, each naming the CLI flag, the value and the fix. The
    message is that line for one problem, else "N invalid arguments:" and one indented line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(self.errors[0])
        else:
            super().__init__(f"{len(self.errors)} invalid arguments:\n" + "\n".join(f"  {e}" for e in self.errors))


class UsageError(ValueError):
    """A one-line startup error naming the flag, the value and the fix."""


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was NaN/inf for `--max_consecutive_nonfinite_losses` steps in a row."""


def one_line(err: BaseException) -> str:
    """The error's message as one line. An exception a DataLoader worker raised comes back with the worker's traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ... X: message"): its last line, less
    the type, is the message."""
    lines = str(err).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        head, _, message = lines[-1].partition(": ")
        return message if head.endswith(type(err).__name__) else lines[-1]
    return " ".join(lines)


__all__ = ["ArgumentsError", "NonFiniteLossError", "UsageError", "one_line"]
