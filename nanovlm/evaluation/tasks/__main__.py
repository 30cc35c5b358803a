"""`python -m nanovlm.evaluation.tasks`: print the folder of nanovlm's lmms-eval tasks (for `--include_path`)."""

from . import TASKS_DIR

print(TASKS_DIR)
