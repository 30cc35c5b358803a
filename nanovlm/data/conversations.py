"""FineVision-schema rows -> transformers chat messages, with per-turn rating filters.

A FineVision row has `images` (a list of images, one image, or None), `texts` (a list of `{"user", "assistant"}`
turns) and, optionally, four per-turn rating lists (ints 1-5, one per turn): `relevance_ratings`,
`image_correspondence_ratings`, `visual_dependency_ratings`, `formatting_ratings`. Other columns are ignored.

What happens to a row here:

1. Validation: anything malformed is a *skip* with a stable reason string (see `SKIP_REASONS`), never an exception
   escaping `row_to_messages`. A rating column that is missing or None filters nothing; a rating list whose length
   differs from `texts` makes the row bad.
2. Rating filter: a turn is dropped if it is under ANY of the `RatingThresholds`; no turn left is a skip.
3. Messages: `[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": q}]},
   {"role": "assistant", "content": [{"type": "text", "text": a}]}, ...]`. All image blocks go into the first kept
   user turn, before its text, unless the user texts already hold the placeholder (`<|image|>`) exactly once per
   image: then the placeholders place the images (the text is split around them into image/text blocks).

Texts that contain the tokenizer's structural special tokens (`<|im_end|>`, `<|global_image|>`, `<row_1_col_1>`,
a placeholder in an answer, ...) are skipped: the tokenizer would read them as real control tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..processing_nanovlm import IMAGE_TOKEN

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = IMAGE_TOKEN  # the chat template's placeholder is the image token itself

RATING_COLUMNS: dict[str, str] = {
    "relevance": "relevance_ratings",
    "image_correspondence": "image_correspondence_ratings",
    "visual_dependency": "visual_dependency_ratings",
    "formatting": "formatting_ratings",
}
RATING_MIN, RATING_MAX = 1, 5  # FineVision's scale; thresholds and ratings outside it are errors

# Skip reasons produced here (samples.py adds image and length reasons).
SKIP_REASONS: dict[str, str] = {
    "bad_row": "the row is not a mapping (dict)",
    "no_texts": "`texts` is missing, None or an empty list",
    "bad_texts": "`texts` is not a list (e.g. a string)",
    "bad_turn": "a turn is not a dict, or its user/assistant text is missing, not a string or empty",
    "bad_ratings": "a rating list is not a list, its length differs from `texts`, or it holds a non-number or a "
    "rating outside 1..5",
    "no_turns_after_rating_filter": "every turn is under some rating threshold",
    "image_placeholder_mismatch": "the user texts hold image placeholders, but not one per image",
    "special_token_in_text": "a text holds a reserved special token (or an answer holds an image placeholder)",
}


class SkipSample(Exception):
    """A row that cannot become a training sample: `reason` is a stable key for counting, `detail` is for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RatingThresholds:
    """Minimum rating (1-5) a turn needs in each FineVision rating column to be kept; 1 keeps every turn."""

    relevance: int = 1
    image_correspondence: int = 1
    visual_dependency: int = 1
    formatting: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or not RATING_MIN <= value <= RATING_MAX:
                raise ValueError(
                    f"RatingThresholds.{f.name} must be an int in 1..5 (1 keeps every turn), got {value!r}."
                )

    @classmethod
    def uniform(cls, minimum: int) -> RatingThresholds:
        """The same minimum for all four ratings."""
        return cls(**{name: minimum for name in RATING_COLUMNS})

    def by_column(self) -> dict[str, int]:
        """{rating column name: minimum}."""
        return {column: getattr(self, name) for name, column in RATING_COLUMNS.items()}


def as_image_list(images: Any) -> list:
    """A row's `images` value as a list: None -> [], a list/tuple -> itself, anything else -> [it]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _is_rating(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def filter_turns(row: Any, thresholds: RatingThresholds | None = None) -> tuple[list[tuple[str, str]], int]:
    """Validate a row's turns and apply the rating filter.

    Returns (kept turns as (user, assistant) pairs, number of turns dropped by the filter).
    Raises `SkipSample` for a bad row or when no turn is left.
    """
    if not isinstance(row, Mapping):
        raise SkipSample("bad_row", f"expected a dict, got {type(row).__name__}")
    texts = row.get("texts")
    if texts is None:
        raise SkipSample("no_texts", "`texts` is missing or None")
    if not isinstance(texts, (list, tuple)):
        raise SkipSample("bad_texts", f"`texts` must be a list of turns, got {type(texts).__name__}")
    if not texts:
        raise SkipSample("no_texts", "`texts` is empty")
    turns = []
    for i, turn in enumerate(texts):
        if not isinstance(turn, Mapping):
            raise SkipSample("bad_turn", f"turn {i} is a {type(turn).__name__}, not a dict")
        user, assistant = turn.get("user"), turn.get("assistant")
        for key, value in (("user", user), ("assistant", assistant)):
            if not isinstance(value, str) or not value.strip():
                raise SkipSample("bad_turn", f"turn {i} has {key}={value!r}; need a non-empty string")
        turns.append((user, assistant))

    keep = [True] * len(turns)
    for column, minimum in (thresholds or RatingThresholds()).by_column().items():
        ratings = row.get(column)
        if ratings is None:  # no such column: no filter on it
            continue
        if not isinstance(ratings, (list, tuple)) or len(ratings) != len(turns):
            got = f"length {len(ratings)}" if isinstance(ratings, (list, tuple)) else type(ratings).__name__
            raise SkipSample(
                "bad_ratings", f"{column} must be a list of {len(turns)} ratings (one per turn), got {got}"
            )
        if not all(_is_rating(r) for r in ratings):
            raise SkipSample("bad_ratings", f"{column} holds a non-number: {list(ratings)!r}")
        if not all(RATING_MIN <= r <= RATING_MAX for r in ratings):  # a 7 would pass every filter, a 0 fail every one
            raise SkipSample("bad_ratings", f"{column} holds a rating outside {RATING_MIN}..{RATING_MAX}: {list(ratings)!r}")
        keep = [k and r >= minimum for k, r in zip(keep, ratings)]
    kept = [t for t, k in zip(turns, keep) if k]
    if not kept:
        raise SkipSample("no_turns_after_rating_filter", f"all {len(turns)} turns are under the rating thresholds")
    return kept, len(turns) - len(kept)


@functools.lru_cache(maxsize=16)
def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    tokens = tuple(t for t in tokens if t)
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _user_blocks(text: str, image_token: str) -> list[dict]:
    """Split a user text around image placeholders into image and text blocks."""
    blocks: list[dict] = []
    for i, part in enumerate(text.split(image_token)):
        if i:
            blocks.append({"type": "image"})
        if part:
            blocks.append({"type": "text", "text": part})
    return blocks


def turns_to_messages(
    turns: Sequence[tuple[str, str]],
    num_images: int,
    image_token: str = IMAGE_PLACEHOLDER,
    reserved_tokens: Collection[str] = (),
) -> list[dict]:
    """Chat messages for (user, assistant) turns with `num_images` image blocks (see the module docstring).

    `reserved_tokens`: special tokens no text may contain (the image placeholder may appear in user texts only).
    Raises `SkipSample` ("image_placeholder_mismatch", "special_token_in_text").
    """
    reserved = _token_pattern(tuple(t for t in reserved_tokens if t != image_token))
    for i, (user, assistant) in enumerate(turns):
        for role, text in (("user", user), ("assistant", assistant)):
            found = reserved.search(text) if reserved is not None else None
            if found is not None:
                raise SkipSample("special_token_in_text", f"turn {i} {role} text holds {found.group(0)!r}")
        if image_token in assistant:
            raise SkipSample("special_token_in_text", f"turn {i} assistant text holds the placeholder {image_token!r}")

    placeholders = sum(user.count(image_token) for user, _ in turns)
    if placeholders and placeholders != num_images:
        raise SkipSample(
            "image_placeholder_mismatch",
            f"the user texts hold {placeholders} {image_token} placeholders but the row has {num_images} images",
        )
    messages: list[dict] = []
    for i, (user, assistant) in enumerate(turns):
        if placeholders:
            content = _user_blocks(user, image_token)
        else:
            content = [{"type": "image"} for _ in range(num_images if i == 0 else 0)]
            content.append({"type": "text", "text": user})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


def row_to_messages(
    row: Any,
    thresholds: RatingThresholds | None = None,
    image_token: str = IMAGE_PLACEHOLDER,
    reserved_tokens: Collection[str] = (),
) -> tuple[list[dict] | None, str | None]:
    """A FineVision row -> (chat messages, None), or (None, skip reason) for a row that cannot be used.

    Images are counted from `row["images"]` (None/empty -> no image blocks); the blocks carry no image, attach them
    with `attach_images`. See the module docstring for the filter and the placement of the image blocks.
    """
    try:
        turns, _ = filter_turns(row, thresholds)
        return turns_to_messages(turns, len(as_image_list(row.get("images"))), image_token, reserved_tokens), None
    except SkipSample as skip:
        logger.debug("skipping row: %s", skip)
        return None, skip.reason


def attach_images(messages: list[dict], images: Sequence[Any]) -> list[dict]:
    """A copy of `messages` whose image blocks, in order, carry `images` (`{"type": "image", "image": img}`)."""
    slots = sum(block.get("type") == "image" for m in messages for block in m["content"])
    if slots != len(images):
        raise ValueError(f"The messages have {slots} image blocks but {len(images)} images were given.")
    it = iter(images)
    return [
        {
            **m,
            "content": [
                {"type": "image", "image": next(it)} if block.get("type") == "image" else dict(block)
                for block in m["content"]
            ],
        }
        for m in messages
    ]


__all__ = [
    "IMAGE_PLACEHOLDER",
    "RATING_COLUMNS",
    "SKIP_REASONS",
    "RatingThresholds",
    "SkipSample",
    "as_image_list",
    "attach_images",
    "filter_turns",
    "row_to_messages",
    "turns_to_messages",
]
