"""Scoring answers to the synthetic dataset's questions: normalised exact match (`answer_is_correct`, used by the
lmms-eval task and the demo report), and the blind baseline: the accuracy of a model that never looks at the image
and always gives its question type's majority answer (`blind_guess_accuracy`)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..data.synthetic.questions import QUESTION_TYPES, RATING_COLUMNS

_TRAILING_PUNCTUATION = string.punctuation + " \t\n"


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding whitespace, quotes and trailing punctuation."""
    text = " ".join(str(text).lower().split())
    text = text.strip("\"'`")
    return text.rstrip(_TRAILING_PUNCTUATION).strip("\"'`").strip()


def answer_is_correct(prediction: str, reference: str) -> bool:
    """Normalised exact match: `" Red."` matches `"red"`; `"red circle"` does not."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _rows(data: Any, split: str) -> list[Mapping[str, Any]]:
    """Text-only rows from a Dataset (images never decoded), a DatasetDict split, or an iterable of dicts."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} is not in the DatasetDict (it has {list(data)}); pass split=...")
        data = data[split]
    if isinstance(data, datasets.Dataset):
        wanted = [c for c in ("texts", "question_type", *RATING_COLUMNS) if c in data.column_names]
        return data.select_columns(wanted).to_list()
    return list(data)


_FORMAT_HINT = re.compile(r"\s*answer with (?:one word|a number)$")


def _turns(rows: Iterable[Mapping[str, Any]], min_rating: int | None) -> Iterator[tuple[str, str, str]]:
    """(question_type, normalised question without its answer-format hint, normalised answer) per kept turn."""
    for row in rows:
        if "question_type" not in row or "texts" not in row:
            raise ValueError(f"rows need 'texts' and 'question_type' columns, got keys {sorted(row)}")
        for i, (qtype, turn) in enumerate(zip(row["question_type"], row["texts"])):
            if min_rating is not None and any(row[c][i] < min_rating for c in RATING_COLUMNS if c in row):
                continue
            question = _FORMAT_HINT.sub("", normalize_answer(turn["user"])).rstrip(_TRAILING_PUNCTUATION)
            yield qtype, question, normalize_answer(turn["assistant"])


def _majority(counts: Mapping[Any, Counter]) -> dict[Any, str]:
    return {key: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, c in counts.items()}


def majority_answers(rows: Iterable[Mapping[str, Any]], min_rating: int | None = None) -> dict[str, str]:
    """Most common (normalised) answer per question type; ties go to the alphabetically first answer."""
    counts: dict[str, Counter] = {}
    for qtype, _, answer in _turns(rows, min_rating):
        counts.setdefault(qtype, Counter())[answer] += 1
    return _majority(counts)


def blind_guess_report(
    data: Any,
    reference: Any = None,
    *,
    split: str = "test",
    min_rating: int | None = None,
    per_question: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per question type: turns, correct, majority answer and accuracy (see `blind_guess_accuracy`)."""
    import datasets

    if reference is None and isinstance(data, datasets.DatasetDict) and "train" in data:
        reference = data["train"]
    rows = _rows(data, split)
    reference_turns = list(_turns(_rows(reference, "train") if reference is not None else rows, min_rating))
    by_type: dict[str, Counter] = {}
    by_question: dict[tuple[str, str], Counter] = {}
    for qtype, question, answer in reference_turns:
        by_type.setdefault(qtype, Counter())[answer] += 1
        by_question.setdefault((qtype, question), Counter())[answer] += 1
    type_majority, question_majority = _majority(by_type), _majority(by_question)
    report: dict[str, dict[str, Any]] = {}
    for qtype, question, answer in _turns(rows, min_rating):
        guess = type_majority.get(qtype)
        if per_question:
            guess = question_majority.get((qtype, question), guess)
        entry = report.setdefault(qtype, {"turns": 0, "correct": 0, "majority": type_majority.get(qtype)})
        entry["turns"] += 1
        entry["correct"] += int(answer == guess)
    total = sum(e["turns"] for e in report.values())
    correct = sum(e["correct"] for e in report.values())
    for entry in report.values():
        entry["accuracy"] = entry["correct"] / entry["turns"]
    report["overall"] = {"turns": total, "correct": correct, "majority": None, "accuracy": correct / max(total, 1)}
    return report


def blind_guess_accuracy(
    data: Any,
    reference: Any = None,
    *,
    split: str = "test",
    min_rating: int | None = None,
    per_question: bool = False,
) -> dict[str, float]:
    """Accuracy of a model that never looks at the image and always gives its question type's majority answer.

    Args:
        data: the rows to evaluate on: a `datasets.Dataset`, a list of row dicts, or a `DatasetDict` (then
            `data[split]` is evaluated and, unless `reference` is given, majorities come from `data["train"]`).
        reference: rows whose answer distribution defines each type's majority answer (the training split); None
            means `data["train"]` for a DatasetDict, else `data` itself (an optimistic bound).
        split: which split of a DatasetDict to evaluate.
        min_rating: skip turns with any rating below this (as a rating filter would).
        per_question: a stronger text-only baseline: the majority answer of each exact question (format hints
            stripped) in `reference`, falling back to the type's majority for unseen questions. Binary questions
            that name both options ("left or the right?") make this about 0.5 for `position` and `size`.

    Returns:
        {question_type: accuracy} for each type present in the evaluated rows, plus "overall" over all turns. A
        type missing from `reference` has no majority answer and scores 0.
    """
    report = blind_guess_report(data, reference, split=split, min_rating=min_rating, per_question=per_question)
    return {t: e["accuracy"] for t, e in report.items()}


def format_blind_guess_table(
    report: Mapping[str, Mapping[str, Any]], per_question: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """A plain-text table of `blind_guess_report` output, optionally with the per-question baseline beside it."""
    header = f"{'question_type':<14} {'turns':>6} {'majority':>10} {'blind acc':>9}"
    lines = [header + (f" {'per-question':>12}" if per_question else "")]
    for qtype in [t for t in QUESTION_TYPES if t in report] + ["overall"]:
        e = report[qtype]
        line = f"{qtype:<14} {e['turns']:>6} {e['majority'] or '-':>10} {e['accuracy']:>9.3f}"
        if per_question:
            line += f" {per_question[qtype]['accuracy']:>12.3f}"
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "answer_is_correct",
    "blind_guess_accuracy",
    "blind_guess_report",
    "format_blind_guess_table",
    "majority_answers",
    "normalize_answer",
]
