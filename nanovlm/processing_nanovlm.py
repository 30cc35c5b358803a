"""NanoVLM processor: image processor + tokenizer + ChatML chat template.

Each `<|image|>` placeholder in the text becomes the image's token string:
    [<image: k>]  <|global_image|> <|image|>*N  [<row_1_col_1> <|image|>*N  <row_1_col_2> <|image|>*N ...]
N is the number of image tokens per tile (config.image_seq_len); a single-tile image is just the global block; the
`<image: k>` prefix appears only when the sample (one text) has several images. With `global_image_position="last"`
the global block comes after the tiles, matching the pixel order.

The chat template is ChatML with `{% generation %}` markers around each assistant reply and its `<|im_end|>`, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` yields assistant-only label masks.

This file is copied next to the weights by `save_pretrained`; it imports its siblings only as `from .x import Y`.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

from .image_processing_nanovlm import NanoVLMImageProcessor

IMAGE_TOKEN = "<|image|>"
GLOBAL_IMAGE_TOKEN = "<|global_image|>"


DEFAULT_MAX_IMAGE_SIDE = 2048  # nanoVLM's max_img_size: the long side of an image at most, in pixels


def tile_token(row: int, col: int) -> str:
    """The special token that opens the tile at 1-based (row, col)."""
    return f"<row_{row}_col_{col}>"


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set text.v = text.v + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif block['type'] == 'text' -%}{%- set text.v = text.v + block['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- text + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- text + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class NanoVLMProcessor(ProcessorMixin):
    r"""Builds model inputs from images and text (or chat messages) for NanoVLM.

    Args:
        image_processor (`NanoVLMImageProcessor`): tiles images.
        tokenizer: a fast tokenizer extended by `nanovlm.tokenizer` (has `image_token`, `global_image_token`).
        image_seq_len (`int`): image tokens per tile (`NanoVLMConfig.image_seq_len`).
        chat_template (`str`, *optional*): defaults to the ChatML template above.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 64, chat_template=None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("NanoVLMProcessor needs both an image_processor and a tokenizer.")
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}.")
        self.image_seq_len = image_seq_len
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.global_image_token = getattr(tokenizer, "global_image_token", None) or GLOBAL_IMAGE_TOKEN
        missing = [
            t
            for t in (self.image_token, self.global_image_token, tile_token(image_processor.max_grid, 1))
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
        ]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the special tokens {missing}; build it with nanovlm.tokenizer.extend_tokenizer "
                f"(or train_tokenizer) with max_grid >= {image_processor.max_grid}."
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        # `generate` continues every row at its right end, so a batch of prompts must be padded on the left. Tokenizers
        # default to "right" (SmolLM2's, ours, a converted checkpoint's): batched generation then continued from pad
        # tokens and differed from one-by-one answers, with only a transformers warning. Training never pads through
        # the tokenizer (the collator builds its rows); `processor(..., padding_side="right")` still overrides this.
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @classmethod
    def from_config(cls, tokenizer, config, **image_processor_kwargs) -> NanoVLMProcessor:
        """A processor matching `config` (a `NanoVLMConfig`): tiles of `config.tile_size`, at most `config.max_grid`
        per side, `config.image_seq_len` image tokens per tile. kwargs go to `NanoVLMImageProcessor` (`max_grid`,
        `max_image_size`, `upscale`, `do_normalize`, `image_mean`, ...); `max_image_size` defaults to the largest
        grid's side, at most nanoVLM's 2048 px."""
        kwargs = {"tile_size": config.tile_size, **image_processor_kwargs}
        if "max_grid" not in kwargs:
            kwargs["max_grid"] = config.max_grid
        tile, grid = kwargs["tile_size"], kwargs["max_grid"]
        kwargs.setdefault("max_image_size", tile * min(grid, max(1, DEFAULT_MAX_IMAGE_SIDE // tile)))
        return cls(NanoVLMImageProcessor(**kwargs), tokenizer, image_seq_len=config.image_seq_len)

    # ---- image strings -------------------------------------------------------------------------------------------
    def image_string(self, grid: tuple[int, int], index: int | None = None) -> str:
        """Token string of one image with tile grid `grid`; `index` adds the `<image: k>` prefix."""
        rows, cols = int(grid[0]), int(grid[1])
        block = self.image_token * self.image_seq_len
        global_part = self.global_image_token + block
        tiles = ""
        if rows * cols > 1:
            tiles = "".join(tile_token(r + 1, c + 1) + block for r in range(rows) for c in range(cols))
        prefix = f"<image: {index}>" if index is not None else ""
        if self.image_processor.global_image_position == "last":
            return prefix + tiles + global_part
        return prefix + global_part + tiles

    def _process_images(self, images, **kwargs):
        # `images` arrive grouped per text (see __call__), so `<image: k>` counts within one sample.
        processed = self.image_processor(images, **kwargs)
        grids = processed["image_grids"].tolist()
        replacements, i = [], 0
        for sample_images in images:
            n = len(sample_images)
            for k in range(n):
                replacements.append(self.image_string(grids[i], k if n > 1 else None))
                i += 1
        return processed, replacements

    def __call__(self, images=None, text=None, **kwargs):
        """`processor(images=..., text=...)`: `text` is a string or a list; `images` one image, a flat list (assigned
        to the texts in order, by each text's count of `<|image|>`) or a list of lists (one list per text)."""
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("`text` must be a string or a list of strings.")
            if images is not None:
                images = self._group_images(images, [t.count(self.image_token) for t in texts]) or None
            text = texts
        elif images is not None:
            raise ValueError(f"Images were given without text; put one {self.image_token} per image in the text.")
        return super().__call__(images=images, text=text, **kwargs)

    def _group_images(self, images, counts: list[int]) -> list[list]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(counts) or any(len(x) != c for x, c in zip(images, counts)):
                raise ValueError(
                    f"Each text needs one {self.image_token} per image: placeholders per text {counts}, images per "
                    f"text {[len(x) for x in images]}."
                )
            return [list(x) for x in images if len(x)]
        if len(images) != sum(counts):
            raise ValueError(
                f"Found {sum(counts)} {self.image_token} placeholders in the text but {len(images)} images; put one "
                "placeholder per image."
            )
        grouped, start = [], 0
        for c in counts:
            if c:
                grouped.append(list(images[start : start + c]))
            start += c
        return grouped

    @property
    def unused_input_names(self) -> list[str]:
        return ["image_grids"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["NanoVLMProcessor", "CHAT_TEMPLATE", "IMAGE_TOKEN", "GLOBAL_IMAGE_TOKEN", "tile_token"]
