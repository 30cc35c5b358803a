"""Kept for older commands: runs `python -m nanovlm.evaluation.merge_results` (see that module)."""

import sys

from nanovlm.evaluation.merge_results import main, merge_step_results

__all__ = ["main", "merge_step_results"]

if __name__ == "__main__":
    sys.exit(main())
