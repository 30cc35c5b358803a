"""train_accelerate.py's failures: each is one line on stderr (no traceback) and a non-zero exit status.

The runs share one small synthetic dataset (built once, in-process, with the settings of test_entrypoint.SHORT).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--synthetic_num_train", "48", "--synthetic_num_validation", "8", "--synthetic_num_test", "8",
    "--synthetic_num_train_simple", "8", "--logging_steps", "1", "--dataloader_num_workers", "0",
    "--eval_strategy", "no", "--load_best_model_at_end", "false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The demo's synthetic dataset at SMALL's sizes, as the entry point itself would build it."""
    from nanovlm.training.build import prepare_synthetic_dataset
    from nanovlm.training.parser import parse_args

    path = tmp_path_factory.mktemp("entry") / "data"
    _, data_args, training_args = parse_args(
        ["--config", str(ROOT / "configs/train/demo.yaml"), "--output_dir", str(path.parent / "unused"),
         "--dataset_name_or_path", str(path), *SMALL]
    )
    prepare_synthetic_dataset(data_args, training_args)
    return path


def run_entry(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(ROOT / "configs/train/demo.yaml"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The stderr lines that are not logging records or progress bars (a traceback would show up here)."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return [line for line in lines if " WARNING " not in line and " INFO " not in line and "it/s]" not in line
            and "s/it]" not in line and not line.lstrip().startswith(("0%", "%"))]


def test_nonfinite_stop_is_one_line_and_a_nonzero_exit(data, tmp_path):
    lrs = ["--lr_mp", "1e30", "--lr_vision_backbone", "1e30", "--lr_language_backbone", "1e30"]
    proc = run_entry(["--output_dir", str(tmp_path), "--dataset_name_or_path", str(data), *SMALL, *lrs,
                      "--save_strategy", "no", "--max_steps", "4", "--max_consecutive_nonfinite_losses", "2"])
    assert proc.returncode == 1
    assert error_lines(proc)[-1] == (
        "train_accelerate.py: error: Training stopped at step 3: the loss was NaN/inf for 2 consecutive steps "
        "(--max_consecutive_nonfinite_losses 2). Lower the learning rates, check the data of these steps, or use bf16 "
        "instead of fp16."
    )
    assert "Traceback" not in proc.stderr
