"""Held-out accuracy on the synthetic dataset, per question type, through lmms-eval's `nanovlm_synthetic` task.

The demo's final report runs the same path as `python -m nanovlm.evaluation.run --tasks nanovlm_synthetic`: the
`nanovlm_hf` adapter around the in-memory model, lmms-eval's `simple_evaluate`, and the packaged task
`nanovlm/evaluation/tasks/nanovlm_synthetic` (every turn of the split asked on its own with the row's images, greedy
answer, normalised exact match). The data location reaches the task as lmms-eval task config overrides
(`synthetic_task.data_overrides`), not through the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .tasks import TASKS_DIR

TASK = "nanovlm_synthetic"
_METRIC = f"{TASK}_exact_match"


def accuracy_from_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Flat lmms-eval metrics (`nanovlm_synthetic_exact_match[_{type}]`) -> {question type: accuracy, "overall"}."""
    if _METRIC not in metrics:
        raise KeyError(f"{_METRIC} is missing from the lmms-eval results: got {sorted(metrics)}")
    prefix = _METRIC + "_"
    accuracy = {key[len(prefix) :]: value for key, value in sorted(metrics.items()) if key.startswith(prefix)}
    accuracy["overall"] = metrics[_METRIC]
    return accuracy


def evaluate_synthetic(
    model,
    processor,
    data_path: str | os.PathLike,
    split: str = "test",
    batch_size: int = 32,
    max_new_tokens: int = 8,
    tasks_dir: str | os.PathLike = TASKS_DIR,
) -> dict[str, float]:
    """{question type: accuracy, ..., "overall": accuracy} of greedy answers on `split` of the synthetic dataset at
    `data_path` (a save_to_disk folder), computed by lmms-eval. Raises RuntimeError with lmms-eval's message when the
    task fails (a missing split, a crash inside lmms-eval).

    Under several processes (torchrun, accelerate) every process must call it: lmms-eval shares the questions among
    them and returns the metrics to rank 0 only; the other processes get {}."""
    from .lmms import NanoVLMLmms, distributed_context, evaluate_tasks
    from .synthetic_task import data_overrides

    tasks_dir = Path(tasks_dir)
    if not (tasks_dir / TASK).is_dir():
        raise FileNotFoundError(
            f"lmms-eval task folder {tasks_dir / TASK} not found: pass tasks_dir= a folder holding {TASK}/, or leave "
            "it at its default (nanovlm.evaluation.tasks.TASKS_DIR, shipped with the package)."
        )
    was_training = model.training
    adapter = NanoVLMLmms(pretrained=model, processor=processor, batch_size=batch_size, max_new_tokens=max_new_tokens)
    try:
        report = evaluate_tasks(adapter, [TASK], include_path=str(tasks_dir),
                                task_configs=data_overrides(data_path, split))  # fmt: skip
    finally:
        model.train(was_training)
    if TASK in report.failed_tasks:
        raise RuntimeError(f"lmms-eval could not evaluate {TASK} on {data_path} ({split}): {report.failed_tasks[TASK]}")
    if distributed_context()[0] != 0:
        return {}
    return accuracy_from_metrics(report.results)


def format_accuracy_table(accuracy: dict[str, float], blind: dict[str, float]) -> str:
    """A text table: question type, model accuracy, blind-guess accuracy, ratio."""
    lines = [f"{'question type':<14} {'model':>7} {'blind':>7} {'x blind':>8}"]
    for qtype in [k for k in accuracy if k != "overall"] + ["overall"]:
        acc, base = accuracy.get(qtype, 0.0), blind.get(qtype, 0.0)
        ratio = f"{acc / base:8.1f}" if base > 0 else f"{'-':>8}"
        lines.append(f"{qtype:<14} {acc:7.3f} {base:7.3f} {ratio}")
    return "\n".join(lines)


__all__ = ["TASK", "accuracy_from_metrics", "evaluate_synthetic", "format_accuracy_table"]
