"""Evaluation: accuracy on the synthetic test split (and, later, the lmms-eval adapter)."""
