"""The end-of-run report of a synthetic-data run: held-out accuracy per question type beside the blind guess.

`train_accelerate.py` calls `report_synthetic_accuracy` after training, on the model that gets saved, and hands the
result to `NanoVLMTrainer.set_results` (the model card's evaluation table, OUTPUT_DIR/results.json).
"""

from __future__ import annotations

import logging
from typing import Any

from .arguments import DataArguments, NanoVLMTrainingArguments

logger = logging.getLogger(__name__)


def report_synthetic_accuracy(
    model: Any, processor: Any, data_args: DataArguments, training_args: NanoVLMTrainingArguments
) -> dict[str, Any]:
    """Held-out accuracy per question type (lmms-eval's `nanovlm_synthetic` task on the test split) beside the blind
    guess, printed and returned by the main process ({} by the others; every process must call it, since lmms-eval
    shares the test questions among them). A failed evaluation returns `test_accuracy_error` (one line) instead of
    raising, so that the trained model is saved before the entry point exits with that error."""
    try:
        return _synthetic_accuracy(model, processor, data_args, training_args)
    except Exception as error:  # noqa: BLE001 - any failure: save the model first, then fail the run (the caller)
        expected = isinstance(error, (RuntimeError, OSError, KeyError, ValueError))
        logger.error("Held-out evaluation failed: %s", error, exc_info=not expected)  # a traceback for bugs only
        return {"test_accuracy_error": " ".join(str(error).split()) or type(error).__name__}


def _synthetic_accuracy(
    model: Any, processor: Any, data_args: DataArguments, training_args: NanoVLMTrainingArguments
) -> dict[str, Any]:
    import datasets

    from ..evaluation.scoring import blind_guess_accuracy
    from ..evaluation.synthetic_eval import evaluate_synthetic, format_accuracy_table

    path = data_args.dataset_name_or_path
    splits = datasets.load_from_disk(path)
    if "test" not in splits:
        raise ValueError(
            f"{path} has no test split (splits: {sorted(splits)}); build the data with --synthetic_num_test > 0"
        )
    test = splits["test"]
    # The blind guess answers each question type's majority answer among every row the model trained on.
    seen = [data_args.train_split] + ([data_args.curriculum_split] if data_args.curriculum_split else [])
    reference = datasets.concatenate_datasets([splits[name].select_columns(["texts", "question_type"]) for name in seen])
    blind = blind_guess_accuracy(test, reference)
    accuracy = evaluate_synthetic(
        model, processor, path, split="test", batch_size=training_args.per_device_eval_batch_size
    )
    if training_args.process_index != 0:  # lmms-eval returns the metrics to the main process only
        return {}
    table = format_accuracy_table(accuracy, blind)
    # printed, not logged: the table is the demo's promised output on stdout (tests and the README read it)
    # every turn of a row is one question (lmms-eval's documents): the accuracies are over questions, not rows
    questions = sum(len(texts) for texts in test["texts"])
    print(f"\nHeld-out accuracy on {len(test)} synthetic test samples ({questions} questions; lmms-eval, "
          f"nanovlm_synthetic):\n{table}\n", flush=True)
    return {"test_accuracy": accuracy, "blind_guess_accuracy": blind}


__all__ = ["report_synthetic_accuracy"]
