"""FineVision rows -> training samples (token ids, assistant-only labels, pixel values), or counted skips.

A sample is exactly what the packer and the collator consume::

    {"input_ids": LongTensor (T,), "labels": LongTensor (T,),
     "pixel_values": uint8 tensor (n_tiles, 3, S, S) or None, "n_images": int}

(`pixel_values` stay uint8 until the model normalises them; `SampleBuilder(uint8_tiles=False)` gives the
processor's normalised float32 instead.)

`labels` equal `input_ids` on every assistant reply and its `<|im_end|>` (the chat template's generation markers)
and IGNORE_INDEX (-100) elsewhere; they are unshifted (the model shifts them).

Every bad input is a skip with a stable reason, never a crash: `SampleBuilder.build(row)` returns `(sample, None)`
or `(None, reason)` and counts the reason in its `SkipCounter`. Reasons are the keys of `SKIP_REASONS`, plus
`"error:<ExceptionType>"` for anything unexpected (logged once per type with its traceback and row index).
Images are decoded here (not by `datasets`), so a corrupt image is a `bad_image` skip: the adapters read
`datasets` rows with image decoding off. Unusual modes (P with transparency, LA, CMYK, I;16, 1, ...) are converted
to RGB (transparency composited on white) and kept.

Two stages per row: `SampleBuilder.measure(row)` gives the sample's exact token length, image and tile counts from
the text and the image headers (no pixel decoded) and applies every skip rule that needs no pixels;
`SampleBuilder.build(row, measure=...)` decodes, tiles and tokenizes later, for the pack about to be yielded.
Both render the same text (`SampleBuilder._render`): the chat template over the messages, each placeholder replaced
in order by the string of the row's k-th image. The row's image list goes to the image processor as it is, never
through the message blocks and back (what `processor.apply_chat_template(tokenize=True)` does for inference, which
regroups images by counting placeholders); the result is the same ids, answer mask and pixels (tested).

The adapters that serve a row source to the packer through those two stages, `SampleDataset` (map-style) and
`SampleStream` (a stream), are in `nanovlm.data.readers`.

Counters live in the process that builds: with DataLoader workers each worker counts its own rows (and logs its
own summary every `log_every` rows); the main process's builder sees none of them.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..image_processing_nanovlm import ImageTooLargeError, image_size, load_image
from ..processing_nanovlm import NanoVLMProcessor
from .conversations import (
    SKIP_REASONS as CONVERSATION_SKIP_REASONS,
)
from .conversations import (
    RatingThresholds,
    SkipSample,
    as_image_list,
    filter_turns,
    turns_to_messages,
)
from .packing import Measured
from .sources import SHARD_ERROR_COLUMN

logger = logging.getLogger(__name__)
_UNREADABLE = object()  # SampleDataset._read_counted: the row could not be read

IGNORE_INDEX = -100
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

SKIP_REASONS: dict[str, str] = {
    **CONVERSATION_SKIP_REASONS,
    "bad_image": "an image cannot be decoded (corrupt, truncated, empty, zero-size, missing file, unsupported type)",
    "image_too_large": "an image has more source pixels than max_image_pixels (decompression-bomb guard)",
    "too_many_images": "the row has more images than max_images_per_example",
    "too_long": "the tokenized sample is longer than max_sample_length (samples are never truncated)",
    "no_label_tokens": "no token is an assistant token",
    "bad_shard": "a shard of a stream failed while being read (e.g. a corrupt parquet file): the rest of it is skipped",
    "measure_mismatch": "the built sample's length or tile count differs from its measure (a bug: please report it)",
}


class SkipCounter:
    """Counts skipped rows per reason, built samples and turns dropped by the rating filter.

    `as_dict()` gives {reason: count} for logging; `log_summary()` logs one line.
    """

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.built = 0
        self.turns_dropped = 0

    def add(self, reason: str, count: int = 1) -> None:
        """Count `count` skips for `reason`."""
        self.reasons[reason] += count

    @property
    def skipped(self) -> int:
        """Rows skipped, all reasons together."""
        return sum(self.reasons.values())

    @property
    def seen(self) -> int:
        """Rows seen: built + skipped."""
        return self.built + self.skipped

    def as_dict(self) -> dict[str, int]:
        """{reason: count} of the skips, most frequent first."""
        return dict(self.reasons.most_common())

    def totals(self) -> dict[str, int]:
        """{"seen", "built", "skipped", "turns_dropped"}."""
        return {"seen": self.seen, "built": self.built, "skipped": self.skipped, "turns_dropped": self.turns_dropped}

    def update(self, other: SkipCounter) -> None:
        """Add another counter's counts (e.g. to combine workers' counters)."""
        self.reasons.update(other.reasons)
        self.built += other.built
        self.turns_dropped += other.turns_dropped

    def reset(self) -> None:
        """Zero every count."""
        self.reasons.clear()
        self.built = self.turns_dropped = 0

    def summary(self) -> str:
        """One line: built, skipped per reason, turns dropped."""
        reasons = ", ".join(f"{r} {c}" for r, c in self.reasons.most_common()) or "none"
        return (
            f"{self.seen} rows: {self.built} built, {self.skipped} skipped ({reasons}); "
            f"{self.turns_dropped} turns dropped by the rating filter"
        )

    def log_summary(self, log: logging.Logger | None = None, level: int = logging.INFO, prefix: str = "") -> None:
        """Log `summary()` on one line."""
        (log or logger).log(level, "%s%s", prefix, self.summary())

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()})"


class SampleBuilder:
    """Turns one FineVision row into a training sample, or a counted skip.

    Args:
        processor: the `NanoVLMProcessor` (tokenizer, chat template, image processor).
        thresholds: per-turn rating minimums (default: keep every turn).
        max_sample_length: longest sample in tokens (images included); longer ones are skipped, never truncated.
            None for no limit. Set it <= the packer's sequence length.
        max_images_per_example: most images per row; rows with more are skipped. None for no limit.
        max_image_pixels: images with more source pixels are skipped before decoding (decompression bombs).
        uint8_tiles: keep `pixel_values` uint8 (0-255; the model normalises them on the device, see
            `NanoVLMConfig.image_mean`), 4x smaller than float32. False gives the processor's normalised floats.

    Two stages (see `measure`): `measure(row)` sizes a row from its text and image headers without decoding a pixel;
    `build(row, measure=...)` decodes and tokenizes it later and checks it against that measure.

    Picklable, so it can go into DataLoader workers (each worker then has its own counter).
    """

    def __init__(
        self,
        processor: NanoVLMProcessor,
        thresholds: RatingThresholds | None = None,
        max_sample_length: int | None = 4096,
        max_images_per_example: int | None = 8,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        uint8_tiles: bool = True,
    ) -> None:
        for name, value in (
            ("max_sample_length", max_sample_length),
            ("max_images_per_example", max_images_per_example),
            ("max_image_pixels", max_image_pixels),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None (no limit), got {value!r}.")
        if not hasattr(processor, "apply_chat_template") or not hasattr(processor, "image_token"):
            raise TypeError(
                f"processor must be a NanoVLMProcessor (see NanoVLMProcessor.from_config), got {type(processor).__name__}."
            )
        self.processor = processor
        self.thresholds = thresholds if thresholds is not None else RatingThresholds()
        if not isinstance(self.thresholds, RatingThresholds):
            raise TypeError(f"thresholds must be a RatingThresholds, got {type(thresholds).__name__}.")
        self.max_sample_length = max_sample_length
        self.max_images_per_example = max_images_per_example
        self.max_image_pixels = max_image_pixels
        self.uint8_tiles = uint8_tiles
        # The builder's own processor: the same tokenizer and settings, tiles kept uint8 (normalised by the model).
        self._build_processor = processor
        if uint8_tiles:
            self._build_processor = copy.copy(processor)
            self._build_processor.image_processor = processor.image_processor.as_uint8()
        self.image_token = processor.image_token
        self.reserved_tokens = _reserved_tokens(processor)
        self.counter = SkipCounter()
        self._logged: set[str] = set()

    # -- public --------------------------------------------------------------------------------------------------

    def measure(self, row: Any, index: int | None = None) -> tuple[Measured | None, str | None]:
        """`(Measured, None)`: the built sample's exact token length, image and tile counts, from the rating-filtered
        conversation through the chat template and each image's header size (no pixel is decoded); or
        `(None, reason)` for a row skipped by a rule that needs no pixels (counted): every rule except a corrupt
        image, which only `build` can find. The `Measured`'s key is None: the source sets it.
        """
        try:
            length, n_images, n_tiles = self._measure(row)
        except SkipSample as skip:
            self._skip(skip.reason, skip.detail, index)
            return None, skip.reason
        except Exception as err:  # one bad row must never stop training
            return None, self.record_error(err, index)
        return Measured(length, n_images, n_tiles, None), None

    def build(
        self, row: Any, index: int | None = None, measure: Measured | None = None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """`(sample, None)`, or `(None, reason)` for a skipped row (counted). Never raises for a bad row.

        `index` (the row's position in its source) only goes into log messages. With the row's `measure` (from
        `measure`), the turns the rating filter drops are not counted again, and a sample whose length or tile
        count differs from it is skipped as "measure_mismatch" (the packer planned with the measure).
        """
        try:
            sample = self._build(row, count_turns=measure is None)
            if measure is not None:
                tiles = 0 if sample["pixel_values"] is None else int(sample["pixel_values"].shape[0])
                if (len(sample["input_ids"]), tiles) != (measure.length, measure.n_tiles):
                    raise SkipSample(
                        "measure_mismatch",
                        f"built {len(sample['input_ids'])} tokens / {tiles} tiles, measured {measure.length} / "
                        f"{measure.n_tiles}",
                    )
        except SkipSample as skip:
            self._skip(skip.reason, skip.detail, index)
            return None, skip.reason
        except Exception as err:  # one bad row must never stop training: count it, log the first of each type
            return None, self.record_error(err, index)
        self.counter.built += 1
        return sample, None

    def record_error(self, err: BaseException, index: int | None = None) -> str:
        """Count an unexpected error for one row as "error:<ExceptionType>" (logged with its traceback the first
        time per type) and return that reason. For errors met outside `build`, e.g. while reading the row."""
        reason = f"error:{type(err).__name__}"
        self._skip(reason, f"{type(err).__name__}: {err}", index, exc_info=err)
        return reason

    __call__ = build

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(thresholds={self.thresholds}, max_sample_length={self.max_sample_length}, "
            f"max_images_per_example={self.max_images_per_example}, max_image_pixels={self.max_image_pixels})"
        )

    # -- steps -----------------------------------------------------------------------------------------------------

    def _messages(self, row: Any, count_turns: bool = True) -> tuple[list, list[dict]]:
        """(images, chat messages with empty image blocks) of a row, or SkipSample: the checks both stages share."""
        if not isinstance(row, Mapping):
            raise SkipSample("bad_row", f"expected a dict, got {type(row).__name__}")
        if row.get(SHARD_ERROR_COLUMN):  # the marker row `skip_bad_shards` puts where a shard failed
            raise SkipSample("bad_shard", row[SHARD_ERROR_COLUMN])
        images = as_image_list(row.get("images"))
        if self.max_images_per_example is not None and len(images) > self.max_images_per_example:
            raise SkipSample(
                "too_many_images", f"{len(images)} images > max_images_per_example={self.max_images_per_example}"
            )
        turns, dropped = filter_turns(row, self.thresholds)
        if count_turns:
            self.counter.turns_dropped += dropped
        return images, turns_to_messages(turns, len(images), self.image_token, self.reserved_tokens)

    def _measure(self, row: Any) -> tuple[int, int, int]:
        """(tokens, images, tiles) of the sample `_build` would make, without decoding pixels."""
        images, messages = self._messages(row)
        image_processor = self.processor.image_processor
        grids = [image_processor.grid(*self._header_size(image, k)) for k, image in enumerate(images)]
        text, _ = self._render(messages, grids)
        length = len(self.processor.tokenizer(text, add_special_tokens=self._add_special(text))["input_ids"])
        if self.max_sample_length is not None and length > self.max_sample_length:
            raise SkipSample("too_long", f"{length} tokens > max_sample_length={self.max_sample_length}")
        return length, len(images), sum(image_processor.num_tiles(g) for g in grids)

    def _render(self, messages: list[dict], grids: Sequence[Sequence[int]]) -> tuple[str, list[tuple[int, int]]]:
        """The processor's own steps, with the row's image list kept as it is: render the chat template, replace the
        k-th placeholder by the k-th image's string (`<image: k>` only with several images), and return that text
        with the character spans of the assistant answers (the template's `{% generation %}` blocks) in it.

        Why not `processor.apply_chat_template(tokenize=True)` (what inference uses): it takes the images back out
        of the message blocks and regroups them by counting placeholders; the builder already holds the list."""
        rendered, generation = render_jinja_template(
            conversations=[messages], chat_template=self.processor.chat_template,
            return_assistant_tokens_mask=True, **self.processor.tokenizer.special_tokens_map,
        )
        parts = rendered[0].split(self.image_token)
        if len(parts) != len(grids) + 1:
            raise SkipSample("image_placeholder_mismatch", f"{len(parts) - 1} placeholders for {len(grids)} images")
        several = len(grids) > 1
        strings = [self.processor.image_string(g, k if several else None) for k, g in enumerate(grids)]
        # where each placeholder ended in the rendered text, and the characters gained by expanding it
        ends = list(itertools.accumulate(len(p) + len(self.image_token) for p in parts[:-1]))
        gained = [0, *itertools.accumulate(len(s) - len(self.image_token) for s in strings)]
        spans = [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in generation[0]]
        return parts[0] + "".join(s + p for s, p in zip(strings, parts[1:])), spans

    def _add_special(self, text: str) -> bool:
        """As `apply_chat_template(tokenize=True)`: no special tokens added when the template starts with BOS."""
        bos = self.processor.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _header_size(self, image: Any, k: int) -> tuple[int, int]:
        """(width, height) of one image of the row from its header, or SkipSample like `_decode`."""
        return self._read_image(image_size, image, k)

    def _build(self, row: Any, count_turns: bool = True) -> dict[str, Any]:
        images, messages = self._messages(row, count_turns)
        pixel_values, grids = None, []
        if images:  # the row's image list, in order, straight to the image processor (tiles uint8 unless disabled)
            processed = self._build_processor.image_processor([[self._decode(im, k) for k, im in enumerate(images)]])
            pixel_values, grids = processed["pixel_values"], processed["image_grids"].tolist()
        text, spans = self._render(messages, grids)
        tokens = self.processor.tokenizer(text, add_special_tokens=self._add_special(text), return_offsets_mapping=True)
        input_ids = torch.tensor(tokens["input_ids"], dtype=torch.long)  # (T,)
        if self.max_sample_length is not None and input_ids.numel() > self.max_sample_length:
            raise SkipSample("too_long", f"{input_ids.numel()} tokens > max_sample_length={self.max_sample_length}")
        # A token is an answer token when it overlaps an answer span (the rule of transformers' assistant mask).
        mask = torch.tensor([any(a < end and b > start for start, end in spans) for a, b in tokens["offset_mapping"]])
        if not mask.any():
            raise SkipSample("no_label_tokens", "the chat template marked no assistant token")
        labels = input_ids.masked_fill(~mask, IGNORE_INDEX)  # (T,)
        if pixel_values is not None:  # (n_tiles, 3, S, S) uint8, or float32 without uint8_tiles
            pixel_values = torch.as_tensor(pixel_values)
            pixel_values = (pixel_values if self.uint8_tiles else pixel_values.float()).contiguous()
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "n_images": len(images)}

    def _decode(self, image: Any, k: int):
        """One image of the row -> RGB PIL image, or SkipSample("bad_image" / "image_too_large")."""
        return self._read_image(load_image, image, k)

    def _read_image(self, read: Any, image: Any, k: int) -> Any:
        """`read(image, max_image_pixels)` (the header size or the decoded image), its failures as SkipSample."""
        if image is None:
            raise SkipSample("bad_image", f"image {k} is None")
        try:
            return read(image, self.max_image_pixels)
        except ValueError as err:
            # load_image's pixel-cap message; pinned by tests/test_data_samples.py.
            reason = "image_too_large" if isinstance(err, ImageTooLargeError) else "bad_image"
            raise SkipSample(reason, f"image {k}: {err}") from err
        except Exception as err:  # PIL plugins raise more than OSError on hostile files
            raise SkipSample("bad_image", f"image {k}: {type(err).__name__}: {err}") from err

    def _skip(self, reason: str, detail: str, index: int | None, exc_info: BaseException | None = None) -> None:
        self.counter.add(reason)
        where = f"row {index}" if index is not None else "a row"
        if reason == "bad_shard":  # shards are few and each loses many rows: log every one
            logger.warning("skipping the rest of a stream shard at %s (bad_shard): %s", where, detail)
        elif reason not in self._logged:
            self._logged.add(reason)
            level = logging.WARNING if reason.startswith("error:") else logging.INFO
            logger.log(
                level,
                "skipping %s (%s): %s [first '%s'; later ones are only counted]",
                where,
                reason,
                detail,
                reason,
                exc_info=exc_info,
            )
        else:
            logger.debug("skipping %s (%s): %s", where, reason, detail)


def _reserved_tokens(processor: NanoVLMProcessor) -> tuple[str, ...]:
    """Structural special tokens no text may hold: ChatML, the image/global-image/tile tokens, eos/pad/bos.
    (Not every special token: pretrained tokenizers carry ones like `<filename>` that plain texts may hold.)"""
    tokenizer = processor.tokenizer
    tokens = {"<|im_start|>", "<|im_end|>", processor.image_token, processor.global_image_token}
    tokens.update(str(t) for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) if t)
    tokens.update(t for t in tokenizer.get_added_vocab() if t.startswith("<row_") and t.endswith(">"))
    return tuple(sorted(t for t in tokens if t))


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IGNORE_INDEX",
    "SKIP_REASONS",
    "SampleBuilder",
    "SkipCounter",
]
