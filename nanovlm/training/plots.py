"""PNG plots of the loss and learning-rate curves from Trainer's log history."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], output_dir: str) -> list[str]:
    """Write `loss.png` (train and eval loss) and `learning_rate.png` (every group's LR) into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    lr_keys = sorted({k for e in log_history for k in e if k.startswith("lr/")})
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("Loss"), ax.grid(alpha=0.3)
    _legend_or_note(ax, "no loss logged yet: fewer steps than --logging_steps")
    paths.append(os.path.join(output_dir, "loss.png"))
    fig.tight_layout(), fig.savefig(paths[-1], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in lr_keys:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        ax.plot(*zip(*points), label=key[3:])
    ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.set_yscale("log"), ax.set_title("Learning rates")
    ax.grid(alpha=0.3)
    _legend_or_note(ax, "no learning rate logged yet: fewer steps than --logging_steps")
    paths.append(os.path.join(output_dir, "learning_rate.png"))
    fig.tight_layout(), fig.savefig(paths[-1], dpi=100), plt.close(fig)
    return paths


def _legend_or_note(ax, note: str) -> None:
    """A legend when something was plotted, else the note in the middle of the empty axes (no matplotlib warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")


__all__ = ["plot_training_curves"]
