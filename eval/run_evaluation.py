"""Kept for older commands: runs `python -m nanovlm.evaluation.run` (see that module; `--help` lists the options)."""

import sys

from nanovlm.evaluation.run import build_arg_parser, main

__all__ = ["build_arg_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
