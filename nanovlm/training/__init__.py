"""Training: the recipe's arguments (three dataclasses) and the YAML + CLI parser that fills them."""

from .arguments import ArgumentsError, DataArguments, ModelArguments, NanoVLMTrainingArguments, run_name
from .parser import NanoVLMArgumentParser, parse_args

__all__ = [
    "ArgumentsError",
    "DataArguments",
    "ModelArguments",
    "NanoVLMArgumentParser",
    "NanoVLMTrainingArguments",
    "parse_args",
    "run_name",
]
