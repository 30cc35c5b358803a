"""lmms-eval tasks over the nanovlm synthetic dataset, read from local files (works offline).

Data location: `$NANOVLM_SYNTHETIC_DATA`, either a `save_to_disk` folder as written by
`python -m nanovlm.data.synthetic --output_dir DIR` and by the demo (its `parquet/{split}.parquet` copy is used when
the arrow split is missing), or one `.parquet` file. Default: `outputs/synthetic_data` in the working directory, else
in this repository. The split is `$NANOVLM_SYNTHETIC_SPLIT` (default `test`).

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

from nanovlm.data.synthetic import ANSWER_SETS
from nanovlm.evaluation.scoring import answer_is_correct, normalize_answer

DATA_ENV = "NANOVLM_SYNTHETIC_DATA"
SPLIT_ENV = "NANOVLM_SYNTHETIC_SPLIT"
DEFAULT_DATA = "outputs/synthetic_data"
REPO_ROOT = Path(__file__).resolve().parents[3]


def data_location() -> tuple[Path, str]:
    """(path, split) of the data to evaluate, from the environment or the defaults."""
    split = os.environ.get(SPLIT_ENV, "test")
    given = os.environ.get(DATA_ENV)
    if given:
        return Path(given), split
    local = Path(DEFAULT_DATA)
    return (local if local.exists() else REPO_ROOT / DEFAULT_DATA), split


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
        f"Build it with `python -m nanovlm.data.synthetic --output_dir {path}`, or set {DATA_ENV} to a save_to_disk "
        f"folder or a .parquet file (and {SPLIT_ENV} to choose the split)."
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
    """A ConfigurableTask whose documents come from local synthetic data instead of the hub (see `data_location`)."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # `class` is lmms-eval's, not TaskConfig's
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        path, split = data_location()
        documents = to_turn_documents(load_rows(path, split))
        test_split = self.config.test_split or "test"
        self.dataset = datasets.DatasetDict({test_split: documents})
        self.dataset_no_image = datasets.DatasetDict({test_split: documents.remove_columns("images")})


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
