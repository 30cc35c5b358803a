"""Scenes of the synthetic dataset: what is drawn (shapes, a word, a background), how it is rendered, and how a
shape is referred to.

A `Scene` holds everything needed to render one image and to re-derive every answer about it; `render_scene` draws
it with PIL (no anti-aliasing on shapes, so shape pixels have exact colours); `_Layout` places shapes without
overlap from a sample's random stream; `describe` and `side_of` give the phrases and halves that questions use.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

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
MAX_SHAPES = 4
MAX_IMAGES = 3
MIN_IMAGE_SIDE = 32


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


__all__ = [
    "COLORS",
    "MAX_IMAGES",
    "MAX_SHAPES",
    "MIN_IMAGE_SIDE",
    "SHAPES",
    "TEXT_COLORS",
    "WORDS",
    "Scene",
    "Shape",
    "Text",
    "describe",
    "render_scene",
    "side_of",
]
