"""The two errors `train_accelerate.py` reports as one line and a non-zero exit instead of a traceback.

- `UsageError`: a startup problem the user fixes on the command line (a missing dataset, a `--seq_length` too small
  for one image, a checkpoint saved with other settings); the message names the flag, the value and the fix.
- `NonFiniteLossError`: training stopped after `--max_consecutive_nonfinite_losses` NaN/inf losses in a row.

Both subclass the built-in exceptions code already catches (`ValueError`, `RuntimeError`).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A one-line startup error naming the flag, the value and the fix."""


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was NaN/inf for `--max_consecutive_nonfinite_losses` steps in a row."""


__all__ = ["NonFiniteLossError", "UsageError"]
