"""The lmms-eval tasks over the nanovlm synthetic dataset, read from local files (works offline).

The task files are package data, `nanovlm/evaluation/tasks/nanovlm_synthetic/*.yaml`; their `!function` entries
name this module, so a wheel install runs them. Give lmms-eval that folder (`nanovlm.evaluation.tasks.TASKS_DIR`) as
an include path: `python -m nanovlm.evaluation.run` does, and `python -m nanovlm.evaluation.tasks` prints it for
lmms-eval's own CLI.

Data location: the task config's `dataset_path`, either a `save_to_disk` folder as written by
`python -m nanovlm.data.synthetic --output_dir DIR` and by the demo (its `parquet/{split}.parquet` copy is used when
the arrow split is missing), or one `.parquet` file; a relative path is taken from the working directory (default
`outputs/synthetic_data`). The split is the task's `test_split` (default `test`). To evaluate other data, override
both per task rather than through the environment: `data_overrides(path, split)` gives the lmms-eval task configs
(`{"task": "nanovlm_synthetic", "dataset_path": ..., "test_split": ...}`) that `evaluate_tasks(...,
task_configs=...)` passes to lmms-eval, and `python -m nanovlm.evaluation.run --synthetic_data DIR` does the same.

Every turn of every row is one document: the row's images with that turn's question (follow-up questions name
their subject, so each stands alone). Documents carry `question`, `answer`, `question_type`, `options` (the
question type's closed answer set, `nanovlm.data.synthetic.ANSWER_SETS`), `sample_id` and `turn`.

- `nanovlm_synthetic`: free generation scored by `answer_is_correct` (normalised exact match): `exact_match`
  overall and `exact_match_{question_type}` per type.
- `nanovlm_synthetic_mc`: the same questions as multiple choice over the type's answer set, scored by lmms-eval's
  log-likelihood ranking (`acc`, and `exact_match`: greedy decoding would produce the right answer).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from lmms_eval.api.task import ConfigurableTask

from ..data.synthetic import ANSWER_SETS
from .scoring import answer_is_correct, normalize_answer

SYNTHETIC_TASKS = ("nanovlm_synthetic", "nanovlm_synthetic_mc")
DEFAULT_DATA = "outputs/synthetic_data"


def data_overrides(data_path: str | os.PathLike, split: str = "test") -> dict[str, dict[str, str]]:
    """{task: lmms-eval config overrides} that point every synthetic task at `split` of `data_path` (made absolute,
    so a process started elsewhere reads the same files)."""
    location = {"dataset_path": str(Path(data_path).resolve()), "test_split": split}
    return {task: dict(location) for task in SYNTHETIC_TASKS}


def load_rows(path: Path, split: str) -> datasets.Dataset:
    """The split's rows from a .parquet file or a save_to_disk folder (arrow split, else its parquet copy)."""
    if path.is_file() and path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    if (path / split / "state.json").is_file():
        return datasets.load_from_disk(str(path / split))
    if (path / "parquet" / f"{split}.parquet").is_file():
        return datasets.Dataset.from_parquet(str(path / "parquet" / f"{split}.parquet"), keep_in_memory=True)
    raise FileNotFoundError(
        f"No synthetic {split!r} split at {path} (looked for {path / split} and "
        f"{path / 'parquet' / f'{split}.parquet'}). "
        f"Build it with `python -m nanovlm.data.synthetic --output_dir {path}`, or point the task at a save_to_disk "
        "folder or a .parquet file (`python -m nanovlm.evaluation.run --synthetic_data PATH`; in Python "
        "`evaluate_tasks(..., task_configs=data_overrides(PATH, split))`)."
    )


def to_turn_documents(rows: datasets.Dataset) -> datasets.Dataset:
    """One document per (row, turn): the row's images and the turn's question, answer, type and answer set."""
    rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))  # copy bytes, never decode
    columns: dict[str, list] = {
        k: [] for k in ("images", "question", "answer", "question_type", "options", "sample_id", "turn")
    }
    for row in rows:
        for turn, (text, qtype) in enumerate(zip(row["texts"], row["question_type"])):
            columns["images"].append(row["images"])
            columns["question"].append(text["user"])
            columns["answer"].append(text["assistant"])
            columns["question_type"].append(qtype)
            columns["options"].append(list(ANSWER_SETS[qtype]))
            columns["sample_id"].append(row["sample_id"])
            columns["turn"].append(turn)
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "options": datasets.List(datasets.Value("string")),
            "sample_id": datasets.Value("string"),
            "turn": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


class SyntheticVQATask(ConfigurableTask):
    """A ConfigurableTask whose documents come from local synthetic data (`dataset_path`, split `test_split`)
    instead of the hub."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # `class` is lmms-eval's, not TaskConfig's
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        split = self.config.test_split or "test"
        path = Path(self.config.dataset_path or DEFAULT_DATA).resolve()  # relative: from the working directory
        documents = to_turn_documents(load_rows(path, split))
        self.dataset = datasets.DatasetDict({split: documents})
        self.dataset_no_image = datasets.DatasetDict({split: documents.remove_columns("images")})


def doc_to_visual(doc: dict) -> list:
    """The row's images (PIL), in order."""
    return list(doc["images"])


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as it appears in the data (with its answer-format hint when it has one)."""
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    """The reference answer."""
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    """The question type's closed answer set."""
    return list(doc["options"])


def doc_to_choice_index(doc: dict) -> int:
    """Index of the reference answer in `doc_to_choice(doc)` (normalised match)."""
    wanted = normalize_answer(doc["answer"])
    for i, option in enumerate(doc["options"]):
        if normalize_answer(option) == wanted:
            return i
    raise ValueError(f"answer {doc['answer']!r} of {doc['sample_id']} turn {doc['turn']} is not in {doc['options']}")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match overall and for the document's question type (1.0 when `answer_is_correct`)."""
    score = float(answer_is_correct(results[0] if results else "", doc["answer"]))
    return {"exact_match": score, f"exact_match_{doc['question_type']}": score}


__all__ = [
    "DEFAULT_DATA",
    "SYNTHETIC_TASKS",
    "SyntheticVQATask",
    "data_overrides",
    "doc_to_choice",
    "doc_to_choice_index",
    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "load_rows",
    "process_results",
    "to_turn_documents",
]
