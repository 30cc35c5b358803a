"""Question generation for the synthetic dataset: the sampling settings (`SyntheticConfig`), the question
templates, one first-turn generator per question type (each builds its scene around a uniformly drawn answer),
follow-up turns, ratings, and `generate_sample`, which assembles one FineVision-schema row.

Sample `i` of a split is drawn from its own stream `sample_rng(i, split, seed)` only; every draw below happens in a
fixed order on that stream, so reordering calls here changes the generated data.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..conversations import RATING_COLUMNS as _RATING_COLUMN_BY_NAME
from .scenes import (
    COLORS,
    MAX_IMAGES,
    MAX_SHAPES,
    MIN_IMAGE_SIDE,
    SHAPES,
    TEXT_COLORS,
    WORDS,
    Scene,
    Shape,
    Text,
    _Layout,
    _text_box,
    _unique,
    describe,
    render_scene,
    side_of,
)

QUESTION_TYPES: tuple[str, ...] = ("color", "count", "position", "size", "reading", "multi_image")
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
    "position": ("left", "right", "top", "bottom"),
    "size": tuple(COLORS) + SHAPES,
    "reading": WORDS,
    "multi_image": tuple(f"image {k}" for k in range(1, MAX_IMAGES + 1)),
}
DEFAULT_TYPE_WEIGHTS: dict[str, float] = {
    "color": 1.0,
    "count": 1.0,
    "position": 1.0,
    "size": 1.0,
    "reading": 1.0,
    "multi_image": 0.75,
}
RATING_COLUMNS: tuple[str, ...] = tuple(_RATING_COLUMN_BY_NAME.values())  # FineVision's four, in its order
SOURCE = "nanovlm_synthetic"
# Single-image types whose scene supports follow-up turns about the same image.
_MULTI_TURN_TYPES = ("color", "count", "position", "size")
# Area ratio above which "bigger" is unambiguous at any resolution.
_MIN_AREA_RATIO = 2.0
_AXIS_OPTIONS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}


# --------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SyntheticConfig:
    """How samples are drawn. Every field is validated; errors name the field, the value and the fix.

    Args:
        image_size: (width, height) in pixels of every image; an int means square. Each side >= 32.
        type_weights: relative frequency of each first-turn question type (keys from QUESTION_TYPES; missing
            keys get weight 0). None means DEFAULT_TYPE_WEIGHTS.
        multi_turn_fraction: probability that a `color`/`count`/`position`/`size` sample gets 1-2 follow-up turns.
        max_turns: upper bound on turns per sample (1 disables follow-ups).
        max_shapes: most shapes in one image (1..4). 1 gives single-object scenes (no `size` questions then).
        low_rating_fraction: probability that a turn is rated low (some rating 1 or 2).
        corrupt_low_rated_answers: give low-rated turns a wrong answer from the same closed set, as in noisy real
            data, so rating filters have a measurable effect.
    """

    image_size: tuple[int, int] = (64, 64)
    type_weights: Mapping[str, float] | None = None
    multi_turn_fraction: float = 0.3
    max_turns: int = 3
    max_shapes: int = MAX_SHAPES
    low_rating_fraction: float = 0.05
    corrupt_low_rated_answers: bool = True

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        ):
            raise ValueError(f"image_size must be an int or a (width, height) pair of ints, got {self.image_size!r}")
        if min(size) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"image_size={tuple(size)} is too small to render readable scenes; use sides >= {MIN_IMAGE_SIDE}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        weights = dict(DEFAULT_TYPE_WEIGHTS if self.type_weights is None else self.type_weights)
        unknown = sorted(set(weights) - set(QUESTION_TYPES))
        if unknown:
            raise ValueError(f"type_weights has unknown question types {unknown}; choose from {list(QUESTION_TYPES)}")
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or v < 0 or math.isnan(v)}
        if bad:
            raise ValueError(f"type_weights must be non-negative numbers, got {bad}")
        if sum(weights.values()) <= 0:
            raise ValueError(f"type_weights must give at least one question type a positive weight, got {weights}")
        object.__setattr__(self, "type_weights", {t: float(weights.get(t, 0.0)) for t in QUESTION_TYPES})
        for name in ("multi_turn_fraction", "low_rating_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {self.max_turns!r}")
        if not isinstance(self.max_shapes, int) or not 1 <= self.max_shapes <= MAX_SHAPES:
            raise ValueError(f"max_shapes must be an int in [1, {MAX_SHAPES}], got {self.max_shapes!r}")
        if self.max_shapes < 2 and self.type_weights["size"] > 0:
            raise ValueError(
                f"size questions compare two shapes, so max_shapes={self.max_shapes} needs type_weights['size'] = 0"
            )


# --------------------------------------------------------------------------------------------------------------
# question texts, and every question a scene answers (follow-up turns)


def _answer_suffix(rng: random.Random, qtype: str) -> str:
    if rng.random() < 0.5:
        return ""
    return " Answer with a number." if qtype == "count" else " Answer with one word."


def _color_question(rng: random.Random, kind: str, single: bool) -> str:
    subject = "shape" if single and rng.random() < 0.5 else kind
    template = rng.choice(["What color is the {}?", "What is the color of the {}?", "Which color does the {} have?"])
    return template.format(subject) + _answer_suffix(rng, "color")


def _count_question(rng: random.Random) -> str:
    template = rng.choice(
        ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes in the image."]
    )
    return template + _answer_suffix(rng, "count")


def _position_question(rng: random.Random, phrase: str, axis: str) -> str:
    if axis == "horizontal":
        template = rng.choice(["Is {} on the left or the right?", "Is {} in the left half or the right half?"])
    else:
        template = rng.choice(["Is {} at the top or the bottom?", "Is {} in the top half or the bottom half?"])
    return template.format(phrase) + _answer_suffix(rng, "position")


def _size_question(rng: random.Random, phrase_a: str, phrase_b: str, comparative: str) -> str:
    template = rng.choice(["Which is {c}, {a} or {b}?", "Which shape is {c}: {a} or {b}?"])
    return template.format(c=comparative, a=phrase_a, b=phrase_b) + _answer_suffix(rng, "size")


def _size_turn(rng: random.Random, a: Shape, b: Shape, mode: str) -> tuple[str, str, tuple[str, str]]:
    """A size question about two shapes referred to by `mode` ("color" or "kind"), its answer and both options."""
    word = (lambda s: s.color) if mode == "color" else (lambda s: s.kind)
    phrase = (lambda s: f"the {s.color} shape") if mode == "color" else (lambda s: f"the {s.kind}")
    comparative = rng.choice(["bigger", "larger", "smaller"])
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    big, small = (a, b) if a.area > b.area else (b, a)
    answer = word(small if comparative == "smaller" else big)
    return _size_question(rng, phrase(first), phrase(second), comparative), answer, (word(a), word(b))


def _follow_up_candidates(rng: random.Random, scene: Scene) -> dict[str, list[tuple[str, str, tuple[str, ...]]]]:
    """Every (question, answer, options) of each type that the scene answers unambiguously."""
    shapes = scene.shapes
    out = {"count": [(_count_question(rng), str(len(shapes)), ANSWER_SETS["count"])]}
    out["color"] = [
        (_color_question(rng, s.kind, len(shapes) == 1), s.color, ANSWER_SETS["color"])
        for s in shapes
        if _unique(shapes, lambda o: o.kind, s)
    ]
    out["position"] = []
    for s in shapes:
        phrases = describe(s, shapes)
        for axis, answer in side_of(s, scene.width, scene.height).items():
            if phrases:
                question = _position_question(rng, rng.choice(phrases), axis)
                out["position"].append((question, answer, _AXIS_OPTIONS[axis]))
    out["size"] = []
    for mode, key in (("color", lambda o: o.color), ("kind", lambda o: o.kind)):
        named = [s for s in shapes if _unique(shapes, key, s)]
        for i, a in enumerate(named):
            for b in named[i + 1 :]:
                if max(a.area, b.area) >= _MIN_AREA_RATIO * min(a.area, b.area):
                    out["size"].append(_size_turn(rng, a, b, mode))
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------------------------------------------
# first-turn generators: each builds the scene around a uniformly drawn answer


_Turn = tuple[str, str, str, tuple[str, ...]]  # (question_type, user, assistant, answers the question allows)
_Generated = tuple[list[Scene], list[_Turn]]


def _new_scene(rng: random.Random, cfg: SyntheticConfig) -> tuple[Scene, _Layout]:
    width, height = cfg.image_size
    return Scene(width, height, background=rng.randint(232, 255)), _Layout(rng, width, height)


def _gen_color(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    scene, layout = _new_scene(rng, cfg)
    kind, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    if not layout.place(kind, color, layout.radius()):
        return None
    others = [k for k in SHAPES if k != kind]
    for _ in range(rng.randint(0, cfg.max_shapes - 1)):
        if not layout.place(rng.choice(others), rng.choice(tuple(COLORS)), layout.radius()):
            return None
    rng.shuffle(layout.shapes)
    scene.shapes = layout.shapes
    return [scene], [("color", _color_question(rng, kind, len(scene.shapes) == 1), color, ANSWER_SETS["color"])]


def _gen_count(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    scene, layout = _new_scene(rng, cfg)
    n = rng.randint(1, cfg.max_shapes)
    for _ in range(n):
        if not layout.place(rng.choice(SHAPES), rng.choice(tuple(COLORS)), layout.radius()):
            return None
    scene.shapes = layout.shapes
    return [scene], [("count", _count_question(rng), str(n), ANSWER_SETS["count"])]


def _gen_position(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    scene, layout = _new_scene(rng, cfg)
    kind, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    axis = rng.choice(["horizontal", "vertical"])
    answer = rng.choice(_AXIS_OPTIONS[axis])
    region = {
        "left": (0.0, 0.5, 0.0, 1.0),
        "right": (0.5, 1.0, 0.0, 1.0),
        "top": (0.0, 1.0, 0.0, 0.5),
        "bottom": (0.0, 1.0, 0.5, 1.0),
    }[answer]
    if not layout.place(kind, color, layout.radius(0.08, 0.14), region):
        return None
    target = layout.shapes[0]
    for _ in range(rng.randint(0, cfg.max_shapes - 1)):
        other_kind, other_color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
        if (other_kind, other_color) == (kind, color):
            continue
        if not layout.place(other_kind, other_color, layout.radius()):
            return None
    rng.shuffle(layout.shapes)
    scene.shapes = layout.shapes
    phrase = rng.choice(describe(target, scene.shapes))
    return [scene], [("position", _position_question(rng, phrase, axis), answer, _AXIS_OPTIONS[axis])]


def _gen_size(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    scene, layout = _new_scene(rng, cfg)
    mode = rng.choice(["color", "kind"])
    values = list(COLORS) if mode == "color" else list(SHAPES)
    a_value, b_value = rng.sample(values, 2)
    pair = []
    small_r = layout.radius(0.07, 0.10)
    for value, r in ((a_value, small_r), (b_value, layout.radius(0.15, 0.22))):
        kind = value if mode == "kind" else rng.choice(SHAPES)
        color = value if mode == "color" else rng.choice(tuple(COLORS))
        pair.append(Shape(kind, color, 0, 0, r))
    if max(s.area for s in pair) < _MIN_AREA_RATIO * min(s.area for s in pair):
        return None
    for s in sorted(pair, key=lambda s: -s.r):  # big first: it is the hard one to fit
        if not layout.place(s.kind, s.color, s.r):
            return None
    spare = [v for v in values if v not in (a_value, b_value)]
    for _ in range(rng.randint(0, min(1, cfg.max_shapes - 2))):
        value = rng.choice(spare)
        kind = value if mode == "kind" else rng.choice(SHAPES)
        color = value if mode == "color" else rng.choice(tuple(COLORS))
        if not layout.place(kind, color, layout.radius(0.07, 0.12)):
            return None
    a, b = layout.shapes[0], layout.shapes[1]
    rng.shuffle(layout.shapes)
    scene.shapes = layout.shapes
    return [scene], [("size", *_size_turn(rng, a, b, mode))]


def _gen_reading(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    scene, _ = _new_scene(rng, cfg)
    word = rng.choice(WORDS)
    side = min(scene.width, scene.height)
    size = round(rng.uniform(0.26, 0.36) * side)
    left, top, right, bottom = _text_box(word, size)
    max_width = 0.92 * scene.width
    if right - left > max_width:  # long word in a narrow image: shrink to fit
        size = max(8, int(size * max_width / (right - left)))
        left, top, right, bottom = _text_box(word, size)
    margin = max(1, round(0.04 * side))
    lo_x, hi_x = margin - left, scene.width - margin - right
    lo_y, hi_y = margin - top, scene.height - margin - bottom
    if lo_x > hi_x or lo_y > hi_y:
        return None
    x, y = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
    scene.text = Text(word, x, y, size, rng.choice(tuple(TEXT_COLORS)))
    user = rng.choice(
        ["What word is written in the image?", "What does the text in the image say?", "Read the word in the image."]
    )
    return [scene], [("reading", user + _answer_suffix(rng, "reading"), word, WORDS)]


def _gen_multi_image(rng: random.Random, cfg: SyntheticConfig) -> _Generated | None:
    kind, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    target_index = rng.randrange(MAX_IMAGES)
    # Image k is the answer with probability 1/3 each: three images whenever the third one is the answer.
    n_images = MAX_IMAGES if target_index == MAX_IMAGES - 1 else rng.randint(2, MAX_IMAGES)
    scenes = []
    for k in range(n_images):
        scene, layout = _new_scene(rng, cfg)
        has_target = k == target_index
        if has_target and not layout.place(kind, color, layout.radius(0.10, 0.18)):
            return None
        for _ in range(rng.randint(0 if has_target else 1, min(2, cfg.max_shapes - has_target))):
            # Distractors mostly share one attribute with the target, so the answer needs colour AND shape.
            roll = rng.random()
            if roll < 0.4:
                other = (rng.choice([s for s in SHAPES if s != kind]), color)
            elif roll < 0.8:
                other = (kind, rng.choice([c for c in COLORS if c != color]))
            else:
                other = (rng.choice(SHAPES), rng.choice(tuple(COLORS)))
            if other == (kind, color):
                continue
            if not layout.place(*other, layout.radius(0.10, 0.18)):
                return None
        if not layout.shapes:  # a distractor image that drew only the target combination
            return None
        rng.shuffle(layout.shapes)
        scene.shapes = layout.shapes
        scenes.append(scene)
    template = rng.choice(
        [
            "Which image has a {} {}?",
            "Which image shows a {} {}?",
            "In which image is there a {} {}?",
            "Which image contains a {} {}?",
        ]
    )
    options = tuple(f"image {k + 1}" for k in range(n_images))
    return scenes, [("multi_image", template.format(color, kind), f"image {target_index + 1}", options)]


_GENERATORS: dict[str, Callable[[random.Random, SyntheticConfig], _Generated | None]] = {
    "color": _gen_color,
    "count": _gen_count,
    "position": _gen_position,
    "size": _gen_size,
    "reading": _gen_reading,
    "multi_image": _gen_multi_image,
}


# --------------------------------------------------------------------------------------------------------------
# samples


def _add_follow_ups(rng: random.Random, scene: Scene, turns: list[_Turn], max_turns: int) -> None:
    candidates = _follow_up_candidates(rng, scene)
    for _ in range(rng.randint(1, max(1, max_turns - 1))):
        if len(turns) >= max_turns:
            return
        asked = {turn[1] for turn in turns}
        used = {turn[0] for turn in turns}
        pool = {t: [c for c in cs if c[0] not in asked] for t, cs in candidates.items()}
        pool = {t: cs for t, cs in pool.items() if cs}
        fresh = [t for t in pool if t not in used]  # one question per type keeps turns non-redundant
        if not fresh:
            return
        qtype = rng.choice(sorted(fresh))
        turns.append((qtype, *rng.choice(pool[qtype])))


def _ratings(rng: random.Random, low: bool) -> list[int]:
    if not low:
        return [5 if rng.random() < 0.7 else 4 for _ in RATING_COLUMNS]
    ratings = [rng.randint(3, 5) for _ in RATING_COLUMNS]
    for i in rng.sample(range(len(RATING_COLUMNS)), rng.randint(1, len(RATING_COLUMNS))):
        ratings[i] = rng.randint(1, 2)
    return ratings


def sample_rng(index: int, split: str = "train", seed: int = 0) -> random.Random:
    """The private random stream of one sample: depends only on (seed, split, index)."""
    return random.Random(f"nanovlm-synthetic:{seed}:{split}:{index}")


def generate_sample(
    index: int, split: str = "train", seed: int = 0, config: SyntheticConfig | None = None
) -> dict[str, Any]:
    """Generate sample `index` of `split` as a FineVision-schema row with PIL images.

    Args:
        index: position in the split (any non-negative int; samples do not depend on each other).
        split: split name, part of the seed so that splits are disjoint streams.
        seed: dataset seed.
        config: sampling options; None means `SyntheticConfig()`.

    Returns:
        A dict with `images` (list of PIL RGB images), `texts`, `source`, the four rating lists, `question_type`,
        `sample_id` and `scenes` (JSON string, one scene per image).
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    cfg = config if config is not None else SyntheticConfig()
    rng = sample_rng(index, split, seed)
    types = [t for t in QUESTION_TYPES if cfg.type_weights[t] > 0]
    qtype = rng.choices(types, weights=[cfg.type_weights[t] for t in types])[0]
    generated = None
    for _ in range(100):  # rejection: a layout that did not fit is drawn again from the same stream
        generated = _GENERATORS[qtype](rng, cfg)
        if generated is not None:
            break
    if generated is None:
        raise RuntimeError(f"could not lay out a {qtype!r} scene at image_size={cfg.image_size}; use a larger size")
    scenes, turns = generated
    if qtype in _MULTI_TURN_TYPES and cfg.max_turns > 1 and rng.random() < cfg.multi_turn_fraction:
        _add_follow_ups(rng, scenes[0], turns, cfg.max_turns)

    texts, ratings = [], {c: [] for c in RATING_COLUMNS}
    for _, user, answer, options in turns:
        low = rng.random() < cfg.low_rating_fraction
        if low and cfg.corrupt_low_rated_answers:  # a plausible wrong answer: one the question allows
            answer = rng.choice([a for a in options if a != answer])
        texts.append({"user": user, "assistant": answer})
        for column, value in zip(RATING_COLUMNS, _ratings(rng, low)):
            ratings[column].append(value)
    return {
        "images": [render_scene(s) for s in scenes],
        "texts": texts,
        "source": SOURCE,
        **ratings,
        "question_type": [turn[0] for turn in turns],
        "sample_id": f"{split}-{seed}-{index}",
        "scenes": json.dumps([s.to_dict() for s in scenes], separators=(",", ":")),
    }


def iter_samples(
    num_samples: int, split: str = "train", seed: int = 0, config: SyntheticConfig | None = None, start: int = 0
) -> Iterator[dict[str, Any]]:
    """Yield samples `start .. start + num_samples - 1` of a split (see `generate_sample`)."""
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    for index in range(start, start + num_samples):
        yield generate_sample(index, split, seed, config)


__all__ = [
    "ANSWER_SETS",
    "DEFAULT_TYPE_WEIGHTS",
    "QUESTION_TYPES",
    "RATING_COLUMNS",
    "SOURCE",
    "SyntheticConfig",
    "generate_sample",
    "iter_samples",
    "sample_rng",
]
