"""Evaluation: the lmms-eval model adapter `nanovlm_hf` (`lmms`), the launcher that evaluates saved checkpoints
without blocking training (`launcher`: sbatch or a local process), and held-out accuracy on the synthetic dataset
through lmms-eval (`synthetic_eval`), scored by normalised exact match against a blind-guess baseline (`scoring`)."""
