"""Training: the recipe from arguments to a trained checkpoint.

- `arguments` (model and data), `training_arguments` (`TrainingArguments` plus nanoVLM's knobs, the run name),
  `checks` (the checks they share), `parser`: the three argument dataclasses and the YAML + CLI parser that fills
  them (exported here);
- `build`: tokenizer, processor, model and packed datasets from the arguments (what `train_accelerate.py` wires);
- `checkpoints` (which checkpoint folders are complete, which one a resume starts from);
- `trainer`: `NanoVLMTrainer`, with `optim` (per-module parameter groups, freezing, the non-finite-loss guard) and
  `flops` (the MFU estimate);
- `model_card` (the README.md card and `training_info.json` the trainer writes with every save),
  `reports` (the synthetic run's held-out accuracy report);
- `callbacks` (asynchronous lmms-eval of saved checkpoints), `lora` (PEFT adapters on the decoder and merging),
  `plots` (loss and LR curves), `errors` (the errors the entry point reports as one line, `ArgumentsError` among them).
"""

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
