"""NanoVLM image processor: any PIL mode -> RGB -> aspect-preserving resize to tile multiples -> row-major tiles.

For an image whose resized size is (n_h * S) x (n_w * S) (S = the vision tower's tile size):
- one tile (1x1 grid): the image itself, S x S;
- several tiles: a global view (the whole image resized to S x S) plus the n_h * n_w tiles in row-major order.
The global view comes first by default (as in nanoVLM and in the image string the processor builds), or last.

Pixels are scaled to [0, 1] and, by default, normalised with SigLIP's mean/std (0.5, 0.5); the original nanoVLM feeds
un-normalised pixels, which `do_normalize=False` reproduces.

This file is copied next to the weights by `save_pretrained`; it imports only transformers, torch, numpy and PIL.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
    """An image has more pixels than the configured cap (decompression-bomb guard)."""


class NanoVLMImageProcessorKwargs(ImagesKwargs, total=False):
    tile_size: int
    max_image_size: int
    max_grid: int
    upscale: bool
    global_image_position: str
    global_view_from: str


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on `background`, 16-bit/float modes are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # convert("L") would clip 16-bit values at 255: rescale the real range instead.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(arr.round().astype(np.uint8), mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Lift Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 178.9M pixels) while we open and decode,
    when we enforce `max_pixels` ourselves; restored on exit. Why: Pillow raises `DecompressionBombError` inside
    `Image.open` (from the header size, before any check of ours), so without this a `max_pixels` above 178.9M had no
    effect and an oversized image counted as undecodable instead of too large. Pillow has no per-call setting, so
    the module global is swapped for the duration of one open/load under a lock (DataLoader workers are processes;
    a thread of other code opening an image inside this window would see the lifted limit, never a leaked one).
    With `max_pixels=None` Pillow's limit applies unchanged."""
    if max_pixels is None:
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_header(fp, max_pixels: int | None) -> Image.Image:
    """`Image.open` (reads the header only, no pixels) with `max_pixels`, not Pillow's limit, in charge."""
    with _pillow_pixel_limit(max_pixels):
        return Image.open(fp)


def _open_image(image, max_pixels: int | None) -> Image.Image:
    """`image` (see `load_image`) as a PIL image whose header is read and checked, pixels not yet decoded."""
    if isinstance(image, dict):  # datasets' Image feature without decoding
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = _open_header(io.BytesIO(image), max_pixels)
    elif isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"Image file not found: {image}")
        image = _open_header(image, max_pixels)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes or a numpy array."
        )
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"Image has zero size ({width}x{height}).")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"Image of {width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} pixels "
            "(decompression-bomb guard)."
        )
    return image


def image_size(image, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of an image read from its header only, without decoding its pixels (a few kB read instead
    of a full decode: what the training data's measure stage uses to size samples before packing them).

    Accepts what `load_image` accepts and raises the same errors for what the header already tells: missing file,
    unknown format, zero size, more than `max_pixels` (`ImageTooLargeError`). A file whose header is fine but whose
    pixels are corrupt passes here and fails in `load_image`.
    """
    try:
        return _open_image(image, max_pixels).size
    except (ValueError, TypeError):
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot decode image: {type(err).__name__}: {err}") from err


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """Open a PIL image, path, bytes, numpy array (HW or HWC) or {"bytes"/"path"} dict as an RGB PIL image.

    Raises ValueError naming the problem for corrupt, truncated, empty or oversized images.
    """
    try:
        image = _open_image(image, max_pixels)
        # Truncated files must fail, whatever a library imported earlier set globally (lmms-eval turns PIL's
        # LOAD_TRUNCATED_IMAGES on at import, which would silently decode half an image).
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with _pillow_pixel_limit(max_pixels):  # some plugins check the size again while decoding
                image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
        return to_rgb(image)
    except (ValueError, TypeError):
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot decode image: {type(err).__name__}: {err}") from err


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32: / 255, then (x - mean) / std per channel. The one definition of the
    normalisation, used by the image processor (inference) and by the model (training tiles arrive as uint8)."""
    x = pixels.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def resized_size(height: int, width: int, tile_size: int, max_image_size: int, upscale: bool) -> tuple[int, int]:
    """Target (height, width): multiples of `tile_size`, long side <= `max_image_size`, aspect kept (short side
    rounded up so it never undershoots). With `upscale` the long side always becomes `max_image_size` (nanoVLM's
    `resize_to_max_side_len`); otherwise it is rounded up to the next tile multiple, capped at `max_image_size`."""
    long_side, short_side = max(height, width), min(height, width)
    if upscale:
        target_long = max_image_size
    else:
        target_long = min(max_image_size, math.ceil(long_side / tile_size) * tile_size)
    scale = target_long / long_side
    target_short = max(tile_size, math.ceil(short_side * scale / tile_size) * tile_size)
    return (target_long, target_short) if height >= width else (target_short, target_long)


class NanoVLMImageProcessor(BaseImageProcessor):
    r"""Splits images into square tiles of the vision tower's size, plus a global view when there are several.

    Args:
        tile_size (`int`, defaults to 512): side of a tile (the vision tower's `image_size`).
        max_image_size (`int`, defaults to 2048): the long side is resized to at most this (a multiple of tile_size).
        max_grid (`int`, defaults to 8): largest number of tile rows or columns the tokenizer has tokens for.
        upscale (`bool`, defaults to False): resize the long side to `max_image_size` even for small images.
        do_normalize (`bool`, defaults to True): normalise with `image_mean`/`image_std` (SigLIP's 0.5/0.5).
        global_image_position (`str`, defaults to "first"): where the global view goes among an image's tiles.
        global_view_from (`str`, defaults to "source"): build the global view from the source image ("source") or,
            as nanoVLM does, by an antialiased bilinear downscale of the resized image ("resized").
        max_pixels (`int`, defaults to 178956970): images with more source pixels are refused (PIL's bomb limit).

    Returns a BatchFeature with `pixel_values` (total_tiles, 3, tile_size, tile_size), all images concatenated in
    order, and `image_grids` (num_images, 2): the (rows, cols) of each image's tile grid.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = NanoVLMImageProcessorKwargs

    def __init__(
        self,
        tile_size: int = 512,
        max_image_size: int = 2048,
        max_grid: int = 8,
        upscale: bool = False,
        do_normalize: bool = True,
        image_mean: Sequence[float] = SIGLIP_MEAN,
        image_std: Sequence[float] = SIGLIP_STD,
        resample: int = Image.Resampling.BICUBIC,
        global_image_position: str = "first",
        global_view_from: str = "source",
        max_pixels: int = Image.MAX_IMAGE_PIXELS or 178956970,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if max_image_size < tile_size or max_image_size % tile_size != 0:
            raise ValueError(
                f"max_image_size ({max_image_size}) must be a multiple of tile_size ({tile_size}) and at least it."
            )
        if max_image_size // tile_size > max_grid:
            raise ValueError(
                f"max_image_size {max_image_size} / tile_size {tile_size} = {max_image_size // tile_size} tiles per "
                f"side exceeds max_grid ({max_grid}), the grid the tokenizer has <row_i_col_j> tokens for; lower "
                "max_image_size or raise max_grid (and extend the tokenizer)."
            )
        if global_image_position not in ("first", "last"):
            raise ValueError(f"global_image_position must be 'first' or 'last', got {global_image_position!r}.")
        self.tile_size = int(tile_size)
        self.max_image_size = int(max_image_size)
        self.max_grid = int(max_grid)
        self.upscale = bool(upscale)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"image_mean and image_std must be three numbers each (R, G, B), every std > 0: got "
                f"image_mean={list(image_mean)}, image_std={list(image_std)}."
            )
        self.resample = int(resample)
        if global_view_from not in ("source", "resized"):
            raise ValueError(f"global_view_from must be 'source' or 'resized', got {global_view_from!r}.")
        self.global_image_position = global_image_position
        self.global_view_from = global_view_from
        self.max_pixels = int(max_pixels)

    # Training sets this on its own copy (see `as_uint8`): tiles then stay uint8 in [0, 255] and the model
    # rescales and normalises them on the device, with the mean/std recorded in its config. Not an __init__
    # argument, so saved processors (and inference) always return normalised floats.
    output_uint8: bool = False

    def as_uint8(self) -> NanoVLMImageProcessor:
        """A copy of this processor whose tiles are uint8 (0-255, not rescaled or normalised): 4x less host memory
        and host-to-device traffic. The model normalises uint8 pixel values itself (`NanoVLMModel.get_image_features`)."""
        clone = copy.copy(self)
        clone.output_uint8 = True
        return clone

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid of an image of this size (also known from its header alone)."""
        s = self.tile_size
        resized_height, resized_width = resized_size(height, width, s, self.max_image_size, self.upscale)
        rows, cols = resized_height // s, resized_width // s
        if rows > self.max_grid or cols > self.max_grid:
            raise ValueError(f"Image grid {rows}x{cols} exceeds max_grid {self.max_grid}; lower max_image_size.")
        return rows, cols

    def split_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB image -> (tiles (n, 3, S, S), (rows, cols)): float in [0, 1] or normalised, or uint8 when
        `output_uint8`."""
        s = self.tile_size
        rows, cols = self.grid(image.width, image.height)
        resized = image.resize((cols * s, rows * s), resample=self.resample)
        pixels = self._to_uint8_tensor(resized)  # (3, rows*S, cols*S)
        tiles = pixels.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        if rows * cols > 1:
            if self.global_view_from == "resized":
                # nanoVLM: the resized image downscaled bilinearly with antialiasing (torchvision's tensor resize)
                # (on floats; uint8 output rounds the result, a difference of at most half a grey level)
                source = pixels.float() if self.output_uint8 else self.normalize_tiles(pixels)
                global_view = F.interpolate(source.unsqueeze(0), size=(s, s), mode="bilinear", align_corners=False,
                                            antialias=True)
                if self.output_uint8:
                    global_view = global_view.round_().clamp_(0, 255).to(torch.uint8)
            else:
                global_view = self._to_uint8_tensor(image.resize((s, s), resample=self.resample)).unsqueeze(0)
                global_view = global_view if self.output_uint8 else self.normalize_tiles(global_view)
            tiles = tiles if self.output_uint8 else self.normalize_tiles(tiles)
            parts = (global_view, tiles) if self.global_image_position == "first" else (tiles, global_view)
            return torch.cat(parts, dim=0), (rows, cols)
        return (tiles if self.output_uint8 else self.normalize_tiles(tiles)), (rows, cols)

    @staticmethod
    def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)

    def normalize_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (..., 3, S, S) -> float32 in [0, 1], normalised with image_mean/std when `do_normalize`.
        The model does the same on the device for uint8 inputs (same operations, same order)."""
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        return normalize_pixels(tiles, mean, std)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """Process one image or a (nested) list of images. Extra kwargs are accepted for processor compatibility."""
        flat = list(_flatten(images))
        if not flat:
            raise ValueError("No images were given to the image processor.")
        all_tiles, grids = [], []
        for image in flat:
            tiles, grid = self.split_image(load_image(image, self.max_pixels))
            all_tiles.append(tiles)
            grids.append(grid)
        return BatchFeature(
            data={"pixel_values": torch.cat(all_tiles, dim=0), "image_grids": torch.tensor(grids, dtype=torch.long)}
        )

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def num_tiles(self, grid: tuple[int, int]) -> int:
        """Tiles (global view included) an image with this grid becomes."""
        rows, cols = grid
        return rows * cols + (1 if rows * cols > 1 else 0)


def _flatten(images):
    if images is None:
        return
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _flatten(item)
    else:
        yield images


__all__ = [
    "NanoVLMImageProcessor", "ImageTooLargeError", "image_size", "load_image", "normalize_pixels", "to_rgb",
    "resized_size",
]
