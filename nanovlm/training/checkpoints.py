"""Which checkpoint a run resumes from: a `checkpoint-N` folder counts only once its trainer_state.json (written last
by Trainer) is complete, so a run killed mid-write resumes from the previous one; and a run that already reached
`--max_steps` is left as it is. Used by train_accelerate.py at start and by NanoVLMTrainer.train."""

from __future__ import annotations

import json
import logging
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import UsageError

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint is complete when its trainer_state.json (written last by Trainer) parses."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step complete `checkpoint-N` folder in `output_dir` (incomplete ones are skipped and logged)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(step))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if is_complete_checkpoint(path):
            return path
        logger.warning("Skipping incomplete checkpoint %s (no readable %s).", path, TRAINER_STATE_NAME)
    return None


def check_resume_checkpoint(resume_from_checkpoint: str | bool | None) -> None:
    """Raise a one-line `UsageError` when `--resume_from_checkpoint` names a folder (not `true`) that is missing or not
    a complete checkpoint; called at start, before any data or model is built."""
    if not resume_from_checkpoint or str(resume_from_checkpoint).lower() in ("true", "false"):
        return
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        what = "no such folder" if not os.path.exists(path) else "not a folder"
    elif is_complete_checkpoint(path):
        return
    else:
        what = f"not a complete checkpoint (no readable {TRAINER_STATE_NAME})"
    raise UsageError(
        f"--resume_from_checkpoint {path}: {what}; pass a checkpoint-N folder this trainer saved, or true for the "
        "last complete one in --output_dir (--model_name_or_path DIR fine-tunes a saved model instead)"
    )


def completed_step(output_dir: str, resume_from_checkpoint: str | bool | None, max_steps: int) -> int | None:
    """The step of the checkpoint a resume would start from when it already reached `max_steps` (the run is complete:
    resuming would train an extra step and overwrite its outputs), else None. Only a positive `max_steps` is
    checked; an epoch-based run resumes as Trainer decides."""
    if str(resume_from_checkpoint).lower() == "true":
        resume_from_checkpoint = last_complete_checkpoint(output_dir)
    if not resume_from_checkpoint or max_steps <= 0 or not is_complete_checkpoint(resume_from_checkpoint):
        return None
    with open(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)) as f:
        step = json.load(f).get("global_step", 0)
    return step if step >= max_steps else None


__all__ = [
    "TRAINER_STATE_NAME", "check_resume_checkpoint", "completed_step", "is_complete_checkpoint",
    "last_complete_checkpoint",
]
