"""Evaluation with lmms-eval, all of it shipped in the package (a wheel install runs it):

- `lmms`: the lmms-eval model adapter `nanovlm_hf`, and `evaluate_tasks` (one `simple_evaluate` per task);
  `prompts`: nanoVLM's per-benchmark prompt formatting.
- `run`: `python -m nanovlm.evaluation.run --checkpoint DIR --tasks ...` writes one results file per checkpoint;
  `merge_results` combines per-task partial files (`python -m nanovlm.evaluation.merge_results`).
- `launcher`: evaluates saved checkpoints without blocking training (an sbatch job, or a local process).
- `tasks/` (package data) and `synthetic_task`: the offline lmms-eval tasks over the synthetic dataset;
  `python -m nanovlm.evaluation.tasks` prints the folder to pass lmms-eval's CLI as `--include_path`.
- `synthetic_eval`: held-out accuracy of an in-memory model on the synthetic dataset through those tasks, scored by
  normalised exact match against a blind-guess baseline (`scoring`).
"""
