"""The lmms-eval task folders nanovlm ships as package data (`nanovlm_synthetic/*.yaml`; their functions live in
`nanovlm.evaluation.synthetic_task`). `TASKS_DIR` is the include path to give lmms-eval; for its CLI,
`python -m nanovlm.evaluation.tasks` prints it:

    python -m lmms_eval --model nanovlm_hf --model_args pretrained=outputs/demo/final \\
        --tasks nanovlm_synthetic --include_path "$(python -m nanovlm.evaluation.tasks)"
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]
