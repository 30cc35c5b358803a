"""The embedded default dataset: rendered scenes whose questions only vision can answer.

A tiny randomly initialised VLM should visibly learn this in minutes on a CPU, so every question has a short answer
from a small closed set, the answer distribution within each question type is close to uniform (a blind model that
always gives a type's most common answer scores low, see `blind_guess_accuracy`), and no question's wording gives
its answer away ("Which is bigger, the red shape or the blue shape?" names both candidates, in random order).

Rows follow the FineVision schema, so the same loaders, rating filters and packers serve this and the real data:

    images                          list of 1-3 PIL images (`datasets.Image()` feature)
    texts                           list of {"user": str, "assistant": str} turns
    source                          "nanovlm_synthetic"
    relevance_ratings, image_correspondence_ratings, visual_dependency_ratings, formatting_ratings
                                    one int in 1..5 per turn
    question_type                   one of QUESTION_TYPES per turn
    sample_id                       "{split}-{seed}-{index}"
    scenes                          JSON list, one scene description per image (shapes, text, background)

Question types: `color`, `count`, `position`, `size`, `reading`, `multi_image`; single-image samples of the first
four types sometimes carry 2-3 turns about the same image. A configurable fraction of turns is "low rated": at
least one of its four ratings is 1 or 2 (clean turns rate 4 or 5 everywhere), and by default its answer is a wrong
one, so a rating filter of 3 drops exactly the noisy turns. Validation and test splits have no low-rated turns by
default, so evaluation references are all correct.

Everything is deterministic: sample `i` of a split is drawn from `random.Random("nanovlm-synthetic:{seed}:{split}:{i}")`
only, so the same seed gives byte-identical PNGs and texts, independent of how many samples are generated, and the
splits come from disjoint seed streams.

    python -m nanovlm.data.synthetic --output_dir data/synthetic --num_train 4000
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import random
import re
import shutil
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from .conversations import RATING_COLUMNS as _RATING_COLUMN_BY_NAME

if TYPE_CHECKING:  # imported lazily at run time: rendering samples needs only PIL
    import datasets

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "tree", "fish", "bird", "book", "star", "moon", "boat", "cake")
TEXT_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "navy": (20, 30, 110),
    "maroon": (120, 20, 20),
    "forest": (20, 90, 30),
    "gray": (75, 75, 75),
}
QUESTION_TYPES: tuple[str, ...] = ("color", "count", "position", "size", "reading", "multi_image")
MAX_SHAPES = 4
MAX_IMAGES = 3
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
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# A curriculum split of single-object scenes (see `build_synthetic_dataset(num_train_simple=...)`).
SIMPLE_SPLIT = "train_simple"
SIMPLE_TYPE_WEIGHTS: dict[str, float] = {"color": 1.0, "count": 1.0, "position": 1.0}
MIN_IMAGE_SIDE = 32
# Single-image types whose scene supports follow-up turns about the same image.
_MULTI_TURN_TYPES = ("color", "count", "position", "size")
# Area ratio above which "bigger" is unambiguous at any resolution.
_MIN_AREA_RATIO = 2.0
_TRAILING_PUNCTUATION = string.punctuation + " \t\n"
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
# scenes


@dataclass(frozen=True)
class Shape:
    """A filled shape centred at (x, y) inside the square of half-side r (pixels)."""

    kind: str
    color: str
    x: int
    y: int
    r: int

    @property
    def area(self) -> float:
        """Pixel area of the filled shape (circle pi r^2, square 4 r^2, triangle 2 r^2)."""
        factor = {"circle": math.pi, "square": 4.0, "triangle": 2.0}[self.kind]
        return factor * self.r * self.r


@dataclass(frozen=True)
class Text:
    """A word drawn centred at (x, y) with PIL's default font at `font_size`."""

    word: str
    x: int
    y: int
    font_size: int
    color: str


@dataclass
class Scene:
    """Everything needed to render one image and to re-derive every answer about it."""

    width: int
    height: int
    background: int
    shapes: list[Shape] = field(default_factory=list)
    text: Text | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in the `scenes` column)."""
        return asdict(self)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _bitmap_text_mask(word: str, font_size: int) -> Image.Image:
    """Pillow built without FreeType: the bitmap font ignores `size`, so draw it small and scale it up."""
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    scale = max(1, round(font_size * 0.7 / max(1, bottom - top)))
    return mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def _text_box(word: str, font_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the drawn word relative to its centre."""
    font = _font(font_size)
    if isinstance(font, ImageFont.FreeTypeFont):
        return font.getbbox(word, anchor="mm")
    width, height = _bitmap_text_mask(word, font_size).size
    return -(width // 2), -(height // 2), width - width // 2, height - height // 2


def _draw_text(image: Image.Image, text: Text) -> None:
    rgb = TEXT_COLORS[text.color]
    font = _font(text.font_size)
    if isinstance(font, ImageFont.FreeTypeFont):
        ImageDraw.Draw(image).text((text.x, text.y), text.word, fill=rgb, font=font, anchor="mm")
        return
    mask = _bitmap_text_mask(text.word, text.font_size)
    image.paste(Image.new("RGB", mask.size, rgb), (text.x - mask.width // 2, text.y - mask.height // 2), mask)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene to an RGB PIL image (no anti-aliasing on shapes, so shape pixels have exact colours)."""
    image = Image.new("RGB", (scene.width, scene.height), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        rgb = COLORS[s.color]
        box = [s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r]
        if s.kind == "circle":
            draw.ellipse(box, fill=rgb)
        elif s.kind == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x + s.r, s.y + s.r), (s.x - s.r, s.y + s.r)], fill=rgb)
    if scene.text is not None:
        _draw_text(image, scene.text)
    return image


class _Layout:
    """Rejection sampler that places shapes without overlap, inside the image, optionally inside a region."""

    def __init__(self, rng: random.Random, width: int, height: int) -> None:
        self.rng, self.width, self.height = rng, width, height
        side = min(width, height)
        self.side = side
        self.margin = max(1, round(0.03 * side))  # to the image border
        self.gap = max(2, round(0.04 * side))  # between shapes
        self.shapes: list[Shape] = []

    def radius(self, low: float = 0.08, high: float = 0.16) -> int:
        """A half-side drawn from [low, high] x the short image side (at least 3 px)."""
        return max(3, round(self.rng.uniform(low, high) * self.side))

    def place(self, kind: str, color: str, r: int, region: tuple[float, float, float, float] | None = None) -> bool:
        """Add a shape whose whole box lies in `region` (fractions x0, x1, y0, y1 of the image); False if no room."""
        x0, x1, y0, y1 = region or (0.0, 1.0, 0.0, 1.0)
        lo_x = math.ceil(x0 * self.width) + r + self.margin
        hi_x = math.floor(x1 * self.width) - r - self.margin - 1
        lo_y = math.ceil(y0 * self.height) + r + self.margin
        hi_y = math.floor(y1 * self.height) - r - self.margin - 1
        if lo_x > hi_x or lo_y > hi_y:
            return False
        for _ in range(60):
            x, y = self.rng.randint(lo_x, hi_x), self.rng.randint(lo_y, hi_y)
            if all(abs(x - o.x) > r + o.r + self.gap or abs(y - o.y) > r + o.r + self.gap for o in self.shapes):
                self.shapes.append(Shape(kind, color, x, y, r))
                return True
        return False


# --------------------------------------------------------------------------------------------------------------
# referring to shapes and deriving answers from a scene


def _unique(shapes: Sequence[Shape], key: Callable[[Shape], Any], shape: Shape) -> bool:
    return sum(key(o) == key(shape) for o in shapes) == 1


def describe(shape: Shape, shapes: Sequence[Shape]) -> list[str]:
    """Phrases that pick out `shape` alone among `shapes` ("the circle", "the red shape", "the red circle")."""
    phrases = []
    if _unique(shapes, lambda s: s.kind, shape):
        phrases.append(f"the {shape.kind}")
    if _unique(shapes, lambda s: s.color, shape):
        phrases.append(f"the {shape.color} shape")
    if _unique(shapes, lambda s: (s.color, s.kind), shape):
        phrases.append(f"the {shape.color} {shape.kind}")
    return phrases


def side_of(shape: Shape, width: int, height: int) -> dict[str, str]:
    """The halves of the image that contain the whole shape: {"horizontal": "left"|"right", "vertical": ...}."""
    sides = {}
    if shape.x + shape.r < width / 2:
        sides["horizontal"] = "left"
    elif shape.x - shape.r > width / 2:
        sides["horizontal"] = "right"
    if shape.y + shape.r < height / 2:
        sides["vertical"] = "top"
    elif shape.y - shape.r > height / 2:
        sides["vertical"] = "bottom"
    return sides


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


# --------------------------------------------------------------------------------------------------------------
# datasets


def synthetic_features() -> datasets.Features:
    """The `datasets.Features` of a synthetic split (FineVision columns plus metadata)."""
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
            "source": datasets.Value("string"),
            **{column: ints for column in RATING_COLUMNS},
            "question_type": datasets.List(datasets.Value("string")),
            "sample_id": datasets.Value("string"),
            "scenes": datasets.Value("string"),
        }
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_split(
    num_samples: int, split: str = "train", seed: int = 0, config: SyntheticConfig | None = None
) -> datasets.Dataset:
    """Generate one split as an in-memory `datasets.Dataset` (images stored as PNG bytes)."""
    import datasets

    features = synthetic_features()
    columns: dict[str, list] = {name: [] for name in features}
    for row in iter_samples(num_samples, split, seed, config):
        row["images"] = [{"bytes": _png(image), "path": None} for image in row["images"]]
        for name in columns:
            columns[name].append(row[name])
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.NamedSplit(split))


SETTINGS_FILE = "synthetic_config.json"  # the settings a dataset folder was built with


def simple_config(train_config: SyntheticConfig) -> SyntheticConfig:
    """The `train_simple` split's config: the train split's settings with one shape per image and colour, count
    and position questions in equal shares."""
    return replace(train_config, max_shapes=1, type_weights=SIMPLE_TYPE_WEIGHTS)


def _settings(
    num_train: int, num_validation: int, num_test: int, seed: int, image_size: int | tuple[int, int],
    type_weights: Mapping[str, float] | None, multi_turn_fraction: float, max_turns: int, low_rating_fraction: float,
    eval_low_rating_fraction: float, corrupt_low_rated_answers: bool, train_multi_turn_fraction: float | None,
    train_max_turns: int | None, num_train_simple: int,
) -> tuple[dict[str, int], dict[str, SyntheticConfig], dict[str, Any]]:
    """(samples per split, config per split, the settings record `synthetic_config.json` holds, as JSON reads it
    back) for `build_synthetic_dataset`'s arguments; raises ValueError naming a bad one."""
    counts = {"train": num_train, "validation": num_validation, "test": num_test, SIMPLE_SPLIT: num_train_simple}
    for split, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
    if sum(counts.values()) == 0:
        raise ValueError("num_train, num_validation and num_test are all 0; ask for at least one sample")
    train_config = SyntheticConfig(
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        type_weights=type_weights,
        multi_turn_fraction=multi_turn_fraction,
        max_turns=max_turns,
        low_rating_fraction=low_rating_fraction,
        corrupt_low_rated_answers=corrupt_low_rated_answers,
    )
    eval_config = replace(train_config, low_rating_fraction=eval_low_rating_fraction)
    try:
        train_config = replace(
            train_config,
            multi_turn_fraction=multi_turn_fraction if train_multi_turn_fraction is None else train_multi_turn_fraction,
            max_turns=max_turns if train_max_turns is None else train_max_turns,
        )
    except ValueError as error:  # name the train-only option the user gave
        raise ValueError(f"train_{error}") from None
    configs = {
        "train": train_config,
        "validation": eval_config,
        "test": eval_config,
        SIMPLE_SPLIT: simple_config(train_config),
    }
    record = {
        "seed": seed,
        **counts,
        **asdict(eval_config),
        "low_rating_fraction": train_config.low_rating_fraction,
        "eval_low_rating_fraction": eval_low_rating_fraction,
        "train_multi_turn_fraction": train_config.multi_turn_fraction,
        "train_max_turns": train_config.max_turns,
    }
    return counts, configs, json.loads(json.dumps(record))


def recorded_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings a synthetic dataset folder was built with (its `synthetic_config.json`), or None when the
    folder has none (not built by `build_synthetic_dataset`)."""
    record_file = Path(path) / SETTINGS_FILE
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    record.setdefault("train_simple", 0)  # written before the curriculum split existed
    return record


def settings_differences(
    built: Mapping[str, Any], requested: Mapping[str, Any], flags: Mapping[str, str]
) -> list[str]:
    """One "--flag: requested X, built Y" per setting of `requested` that the `built` record holds differently
    (keys as `synthetic_config.json` names them; `flags` maps each to the option that sets it)."""
    requested = json.loads(json.dumps(requested))  # tuples -> lists, as the record reads back
    return [
        f"--{flags.get(key, key)}: requested {value!r}, built {built.get(key)!r}"
        for key, value in requested.items()
        if built.get(key) != value
    ]


def build_synthetic_dataset(
    output_dir: str | Path | None,
    num_train: int,
    num_validation: int,
    num_test: int,
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    type_weights: Mapping[str, float] | None = None,
    multi_turn_fraction: float = 0.3,
    max_turns: int = 3,
    low_rating_fraction: float = 0.05,
    eval_low_rating_fraction: float = 0.0,
    corrupt_low_rated_answers: bool = True,
    write_parquet: bool = True,
    train_multi_turn_fraction: float | None = None,
    train_max_turns: int | None = None,
    num_train_simple: int = 0,
) -> datasets.DatasetDict:
    """Build train/validation/test splits and write them to `output_dir`.

    Writes `save_to_disk(output_dir)` (read back with `datasets.load_from_disk`), `output_dir/parquet/{split}.parquet`
    (read back with `load_dataset("parquet", data_files=...)`; images decode as PIL) and
    `output_dir/synthetic_config.json` (the arguments, for reproducing the data). `output_dir=None` writes nothing.

    Args:
        output_dir: destination folder, or None to only return the data.
        num_train, num_validation, num_test: samples per split (a split with 0 samples is left out).
        seed: dataset seed; the three splits are disjoint streams of it.
        image_size: side of square images, or (width, height).
        type_weights, multi_turn_fraction, max_turns, corrupt_low_rated_answers: see `SyntheticConfig`.
        low_rating_fraction: fraction of low-rated turns in the train split.
        eval_low_rating_fraction: the same for validation and test (0 keeps evaluation references all correct).
        write_parquet: also write the parquet copies.
        train_multi_turn_fraction, train_max_turns: `multi_turn_fraction` and `max_turns` for the train split only
            (None: the same as the other splits). More follow-up turns per training image give more supervised
            answers per image encoded, while validation and test keep the standard mix that the blind guess is
            measured on.
        num_train_simple: also write a `train_simple` split of this many single-object rows (`max_shapes=1`,
            colour, count and position questions in equal shares, otherwise the train split's settings): a
            curriculum to read before the train split (`--curriculum_split train_simple`). A tiny model trained
            from scratch learns to read where a shape is from these; from the full mix alone it did not (see
            BENCHMARKS.md, "Demo").

    Returns:
        The `datasets.DatasetDict` that was written.
    """
    import datasets

    counts, configs, record = _settings(
        num_train, num_validation, num_test, seed, image_size, type_weights, multi_turn_fraction, max_turns,
        low_rating_fraction, eval_low_rating_fraction, corrupt_low_rated_answers, train_multi_turn_fraction,
        train_max_turns, num_train_simple,
    )
    splits = {}
    for split, n in counts.items():
        if n == 0:
            continue
        start = time.perf_counter()
        splits[split] = generate_split(n, split, seed, configs[split])
        elapsed = time.perf_counter() - start
        logger.info("generated %d %s samples in %.2f s (%.0f samples/s)", n, split, elapsed, n / max(elapsed, 1e-9))
    dataset = datasets.DatasetDict(splits)
    if output_dir is not None:
        out = Path(output_dir)
        dataset.save_to_disk(str(out))
        if write_parquet:
            (out / "parquet").mkdir(parents=True, exist_ok=True)
            for split, ds in dataset.items():
                ds.to_parquet(str(out / "parquet" / f"{split}.parquet"))
        # A rebuild with fewer splits must not leave an earlier build's split files that a glob would pick up.
        for split in {*SPLITS, SIMPLE_SPLIT} - set(dataset):
            stale = out / "parquet" / f"{split}.parquet"
            if stale.is_file():
                stale.unlink()
                logger.info("removed stale %s", stale)
            if (out / split / "state.json").is_file():
                shutil.rmtree(out / split)
                logger.info("removed stale %s", out / split)
        (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("wrote %s (save_to_disk%s)", out, " + parquet/" if write_parquet else "")
    return dataset


# --------------------------------------------------------------------------------------------------------------
# evaluation helpers


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


# --------------------------------------------------------------------------------------------------------------
# command line


def _parse_image_size(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            width, height = text.lower().split("x")
            return int(width), int(height)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like 64 or 96x64, got {text!r}") from None


def _parse_type_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--type_weights must look like color=1,count=2 (types {list(QUESTION_TYPES)}), got {text!r}"
            ) from None
    return weights


def build_arg_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m nanovlm.data.synthetic",
        description="Build the embedded synthetic VQA dataset (save_to_disk + parquet) and print its blind-guess "
        "accuracy per question type.",
    )
    parser.add_argument("--output_dir", required=True, help="destination folder")
    parser.add_argument("--num_train", type=int, default=4000, help="training samples")
    parser.add_argument("--num_validation", type=int, default=500, help="validation samples")
    parser.add_argument("--num_test", type=int, default=500, help="test samples")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (splits are disjoint streams of it)")
    parser.add_argument("--image_size", type=_parse_image_size, default=64, help="64 (square) or WIDTHxHEIGHT")
    parser.add_argument(
        "--type_weights",
        type=_parse_type_weights,
        default=None,
        help=f"relative question-type frequencies, e.g. color=1,count=1 (types: {', '.join(QUESTION_TYPES)}; "
        "missing types get 0)",
    )
    parser.add_argument("--multi_turn_fraction", type=float, default=0.3, help="share of samples with follow-ups")
    parser.add_argument("--max_turns", type=int, default=3, help="most turns per sample")
    parser.add_argument(
        "--train_multi_turn_fraction", type=float, default=None, help="--multi_turn_fraction for train only"
    )
    parser.add_argument("--train_max_turns", type=int, default=None, help="--max_turns for train only")
    parser.add_argument(
        "--num_train_simple",
        type=int,
        default=0,
        help=f"also write a {SIMPLE_SPLIT} split of single-object colour/count/position rows (a curriculum)",
    )
    parser.add_argument("--low_rating_fraction", type=float, default=0.05, help="low-rated turns in train")
    parser.add_argument("--eval_low_rating_fraction", type=float, default=0.0, help="low-rated turns in val/test")
    parser.add_argument(
        "--corrupt_low_rated_answers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give low-rated turns a wrong answer",
    )
    parser.add_argument("--no_parquet", action="store_true", help="skip the parquet copies")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild into --output_dir even when it holds data built with other settings (otherwise refused)",
    )
    return parser


# synthetic_config.json key -> the option of this command that sets it
_CLI_FLAGS = {
    "train": "num_train", "validation": "num_validation", "test": "num_test", SIMPLE_SPLIT: "num_train_simple",
}


def _existing_dataset(args: argparse.Namespace) -> bool:
    """True when --output_dir already holds the dataset these arguments build (reuse it); False when there is
    nothing there or --overwrite is given (build); raises ValueError when it holds other data."""
    out = Path(args.output_dir)
    if args.overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    built = recorded_settings(out)
    if built is None:
        raise ValueError(
            f"--output_dir {out} exists and is not a synthetic dataset (no {SETTINGS_FILE}); choose another "
            "--output_dir, or pass --overwrite to build into it"
        )
    _, _, requested = _settings(
        args.num_train, args.num_validation, args.num_test, args.seed, args.image_size, args.type_weights,
        args.multi_turn_fraction, args.max_turns, args.low_rating_fraction, args.eval_low_rating_fraction,
        args.corrupt_low_rated_answers, args.train_multi_turn_fraction, args.train_max_turns, args.num_train_simple,
    )
    differences = settings_differences(built, requested, _CLI_FLAGS)
    if differences:
        raise ValueError(
            f"--output_dir {out} holds a synthetic dataset built with other settings ({'; '.join(differences)}); "
            "pass --overwrite to rebuild it, or choose another --output_dir"
        )
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI entry point: build the dataset, then print the blind-guess table (the command's output) to stdout."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        reuse = _existing_dataset(args)
    except ValueError as error:
        build_arg_parser().error(str(error))
    if reuse:
        import datasets

        print(f"{args.output_dir} already holds this dataset (built with the same settings): reusing it.")
        dataset = datasets.load_from_disk(args.output_dir)
    else:
        dataset = _build_from_args(args)
    split = next(s for s in ("test", "validation", "train", SIMPLE_SPLIT) if s in dataset)
    report = blind_guess_report(dataset, split=split)
    per_question = blind_guess_report(dataset, split=split, per_question=True)
    source = "train" if "train" in dataset else split
    print(f"blind guess on {split} (majority answers from {source}):")
    print(format_blind_guess_table(report, per_question))
    return {t: e["accuracy"] for t, e in report.items()}


def _build_from_args(args: argparse.Namespace) -> datasets.DatasetDict:
    try:
        return build_synthetic_dataset(
            args.output_dir,
            args.num_train,
            args.num_validation,
            args.num_test,
            seed=args.seed,
            image_size=args.image_size,
            type_weights=args.type_weights,
            multi_turn_fraction=args.multi_turn_fraction,
            max_turns=args.max_turns,
            low_rating_fraction=args.low_rating_fraction,
            eval_low_rating_fraction=args.eval_low_rating_fraction,
            corrupt_low_rated_answers=args.corrupt_low_rated_answers,
            write_parquet=not args.no_parquet,
            train_multi_turn_fraction=args.train_multi_turn_fraction,
            train_max_turns=args.train_max_turns,
            num_train_simple=args.num_train_simple,
        )
    except ValueError as error:
        build_arg_parser().error(str(error))


__all__ = [
    "ANSWER_SETS",
    "COLORS",
    "QUESTION_TYPES",
    "RATING_COLUMNS",
    "SIMPLE_SPLIT",
    "SHAPES",
    "WORDS",
    "Scene",
    "Shape",
    "SyntheticConfig",
    "Text",
    "answer_is_correct",
    "blind_guess_accuracy",
    "blind_guess_report",
    "build_synthetic_dataset",
    "describe",
    "format_blind_guess_table",
    "generate_sample",
    "generate_split",
    "iter_samples",
    "majority_answers",
    "normalize_answer",
    "recorded_settings",
    "render_scene",
    "sample_rng",
    "settings_differences",
    "side_of",
    "simple_config",
    "synthetic_features",
]


if __name__ == "__main__":
    main()
