"""The training recipe's arguments: three dataclasses that `nanovlm.training.parser.parse_args` fills from YAML + CLI.

- `ModelArguments`: which model to train (pretrained backbones, a nanovlm checkpoint, or a random-init config) and
  how images become tiles.
- `DataArguments`: where the data comes from, how it is filtered (FineVision's per-turn ratings) and packed.
- `NanoVLMTrainingArguments`: `transformers.TrainingArguments` plus nanoVLM's knobs (one learning rate per module,
  evaluation cadence, LoRA), with nanoVLM's defaults where they differ (its warmup + cosine schedule among them).

Every dataclass validates in `__post_init__`, collects all problems and raises one `ArgumentsError` (a `ValueError`)
listing each as `--flag must ...: got X`, so a bad YAML recipe fails at once with everything to fix.

`run_name` builds nanoVLM's descriptive run name (backbones, devices, global batch, steps, learning rates, date).
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from ..data.conversations import RATING_COLUMNS

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]
LOSS_NORMALIZATIONS = ["global_tokens", "micro_batch_mean"]
RATING_FIELDS = tuple(f"min_{name}_rating" for name in RATING_COLUMNS)  # one flag per FineVision rating column
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_TOKENIZER_VOCAB_SIZE = 259  # 256 bytes + the three ChatML tokens, see `nanovlm.tokenizer.train_tokenizer`


class ArgumentsError(ValueError):
    """Invalid arguments; `errors` holds one line per problem, each naming the CLI flag, the value and the fix. The
    message is that line for one problem, else "N invalid arguments:" and one indented line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(self.errors[0])
        else:
            super().__init__(f"{len(self.errors)} invalid arguments:\n" + "\n".join(f"  {e}" for e in self.errors))


# --------------------------------------------------------------------------------------------------------------
# validation helpers: each appends a message to `errors` instead of raising, so all problems are reported at once


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(errors: list[str], name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """`--name` must be an int >= minimum (or None when `optional`)."""
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        errors.append(f"--{name} must be an integer >= {minimum}{' or None' if optional else ''}: got {value!r}")


def _check_range(
    errors: list[str], name: str, value: Any, low: float, high: float, high_inclusive: bool = True
) -> None:
    """`--name` must be a number in [low, high] (or [low, high))."""
    bracket = "]" if high_inclusive else ")"
    inside = _is_number(value) and math.isfinite(value) and low <= value
    inside = inside and (value <= high if high_inclusive else value < high)
    if not inside:
        errors.append(f"--{name} must be a number in [{low}, {high}{bracket}: got {value!r}")


def _check_bool(errors: list[str], name: str, value: Any) -> None:
    if not isinstance(value, bool):
        errors.append(f"--{name} must be true or false: got {value!r}")


def _parse_json_dict(errors: list[str], name: str, value: Any) -> dict[str, Any] | None:
    """A dict field given as a dict, a JSON object string (the CLI form) or None."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            errors.append(f"--{name} must be a JSON object such as '{{\"key\": 1}}' ({exc.msg}): got {value!r}")
            return None
        if isinstance(parsed, dict):
            return parsed
    errors.append(f"--{name} must be a mapping (a YAML mapping or a JSON object string): got {value!r}")
    return None


def _as_str_list(errors: list[str], name: str, value: Any) -> list[str] | None:
    """A list-of-strings field given as a list, a single string, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        errors.append(f"--{name} must be a list of non-empty strings: got {value!r}")
        return None
    return list(value)


# --------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelArguments:
    """Which model to train and how its images are tiled.

    Three ways to get a model, checked in this order:
    1. `model_name_or_path`: continue from a nanovlm checkpoint (hub id or folder) with its own tokenizer.
    2. `random_init=True`: a fresh, randomly initialised model from `model_config` (NanoVLMConfig kwargs such as
       `vision_config`/`text_config` dicts; the text vocabulary follows the tokenizer). Used by the CPU demo, together
       with `tokenizer_train_vocab_size` (a byte-level BPE tokenizer trained on the data).
    3. Otherwise `NanoVLMForConditionalGeneration.from_backbones(vision_model, text_model)`: pretrained SigLIP +
       pretrained causal LM, as in nanoVLM.
    """

    vision_model: str | None = field(
        default="google/siglip2-base-patch16-512",
        metadata={"help": "Vision backbone: a SigLIP/SigLIP2 hub id or local folder (its pooling head is dropped)."},
    )
    text_model: str | None = field(
        default="HuggingFaceTB/SmolLM2-360M-Instruct",
        metadata={"help": "Language backbone: a causal-LM hub id or local folder (Llama/SmolLM2 by default)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A nanovlm checkpoint (hub id or folder) to start from. None builds the model from "
            "--vision_model and --text_model (or from --model_config with --random_init)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to extend with the image and tile tokens. None uses the text model's (or the "
            "checkpoint's with --model_name_or_path)."
        },
    )
    pixel_shuffle_factor: int = field(
        default=4,
        metadata={
            "help": "Pixel-shuffle factor s of the projector: an n x n patch grid becomes (n/s)^2 image tokens of "
            "s^2 * D channels. Larger means fewer image tokens per tile."
        },
    )
    tile_size: int | None = field(
        default=None,
        metadata={"help": "Side of one image tile in pixels. None uses the vision model's image size."},
    )
    max_image_size: int = field(
        default=2048,
        metadata={
            "help": "Longest side an image is resized to (aspect preserved, rounded to whole tiles). Must be a "
            "multiple of the tile size."
        },
    )
    max_grid: int = field(
        default=8,
        metadata={"help": "Most tiles per image side; also sets how many <row_i_col_j> tile tokens exist."},
    )
    upscale_images: bool = field(
        default=False,
        metadata={
            "help": "Resize every image's long side to --max_image_size, as nanoVLM did (more tiles, more tokens); "
            "by default it is only rounded up to the next whole tile."
        },
    )
    normalize_images: bool = field(
        default=True,
        metadata={
            "help": "Normalize pixels with SigLIP's mean/std, as the vision model was trained (the original nanoVLM "
            "fed un-normalized pixels)."
        },
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel (R, G, B) mean for pixel normalization, in [0, 1] units; None keeps SigLIP's 0.5. "
            "A pretrained vision tower needs the statistics it was trained with; one trained from scratch learns "
            "faster with its training images' own mean and std (the demo sets both)."
        },
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={"help": "Per-channel (R, G, B) standard deviation for pixel normalization; None keeps SigLIP's 0.5."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel. sdpa, eager and flex_attention keep packed samples isolated; flash_attention_2 "
            "needs cu_seq_lens kwargs for several packed rows; flex_attention has no backward on CPU.",
            "choices": ATTN_IMPLEMENTATIONS,
        },
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Build a randomly initialised model (no pretrained weights) from --model_config (NanoVLMConfig "
            "kwargs) instead of loading pretrained backbones. Used by the demo."
        },
    )
    model_config: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'NanoVLMConfig keyword arguments for --random_init, e.g. {"vision_config": {...}, '
            '"text_config": {...}, "pixel_shuffle_factor": 2}: a YAML mapping, or a JSON object on the CLI.'
        },
    )
    vision_sincos_position_scale: float | None = field(
        default=None,
        metadata={
            "help": "With --random_init: start the vision tower's learned position embeddings from a 2-D sin-cos "
            "grid (as MAE does) times this scale instead of random noise. A tower trained from scratch then tells "
            "its patches' positions apart from the first step; the demo uses 2.0. None keeps the random init. Recorded "
            "in the model config (vision_sincos_position_scale)."
        },
    )
    tokenizer_train_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "If set, train a byte-level BPE tokenizer with this many BPE tokens on the training texts instead "
            "of loading one (needs --random_init; the demo uses this). At least 259."
        },
    )

    def __post_init__(self) -> None:
        errors: list[str] = []
        for name in ("vision_model", "text_model", "model_name_or_path", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                errors.append(f"--{name} must be a hub id or a local path: got {value!r}")
        _check_int(errors, "pixel_shuffle_factor", self.pixel_shuffle_factor, 1)
        _check_int(errors, "tile_size", self.tile_size, 1, optional=True)
        _check_int(errors, "max_image_size", self.max_image_size, 1)
        _check_int(errors, "max_grid", self.max_grid, 1)
        for name in ("upscale_images", "normalize_images", "random_init"):
            _check_bool(errors, name, getattr(self, name))
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            errors.append(
                f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}: got {self.attn_implementation!r}"
            )
        for name, low in (("image_mean", -math.inf), ("image_std", 0.0)):
            value = getattr(self, name)
            if value is None:
                continue
            bound = "" if low == -math.inf else f" > {low:g}"
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(_is_number(v) and math.isfinite(v) and v > low for v in value)
            ):
                errors.append(f"--{name} must be three finite numbers{bound} (R G B): got {value!r}")
            elif self.normalize_images is False:
                errors.append(f"--{name} has no effect with --normalize_images false: got {value!r}; drop one")
            elif self.model_name_or_path is not None:
                errors.append(
                    f"--{name} must be unset when starting from --model_name_or_path (its saved processor keeps the "
                    f"normalization the model was trained with): got {value!r}"
                )
        self.model_config = _parse_json_dict(errors, "model_config", self.model_config)
        _check_int(
            errors, "tokenizer_train_vocab_size", self.tokenizer_train_vocab_size, MIN_TOKENIZER_VOCAB_SIZE, True
        )
        scale = self.vision_sincos_position_scale
        if scale is not None:
            if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
                errors.append(f"--vision_sincos_position_scale must be a number > 0 or None: got {scale!r}")
            elif self.random_init is not True:
                errors.append(
                    f"--vision_sincos_position_scale needs --random_init true (a pretrained tower keeps its "
                    f"position embeddings): got {scale!r}"
                )

        tile, size, grid = self.tile_size, self.max_image_size, self.max_grid
        if all(_is_int(v) and v >= 1 for v in (tile, size, grid)):
            if size % tile != 0:
                errors.append(
                    f"--max_image_size must be a multiple of --tile_size ({tile}): got {size}; use "
                    f"{max(tile, size // tile * tile)}"
                )
            elif size // tile > grid:
                errors.append(
                    f"--max_image_size must be at most --max_grid x --tile_size ({grid} x {tile} = {grid * tile}): "
                    f"got {size}; lower it or raise --max_grid"
                )

        if self.random_init is True:
            if self.model_name_or_path is not None:
                errors.append(
                    f"--model_name_or_path must be unset with --random_init true (a fresh model has no checkpoint): "
                    f"got {self.model_name_or_path!r}; drop one of the two"
                )
            if self.model_config is None and (self.vision_model is None or self.text_model is None):
                errors.append(
                    "--random_init needs --model_config or both --vision_model and --text_model (their configs): "
                    f"got model_config=None, vision_model={self.vision_model!r}, text_model={self.text_model!r}"
                )
        else:
            if self.model_config is not None:
                errors.append(
                    "--model_config only applies with --random_init true (pretrained models bring their own config): "
                    f"got {self.model_config!r}; set --random_init true or drop --model_config"
                )
            if self.model_name_or_path is None and (self.vision_model is None or self.text_model is None):
                errors.append(
                    "--vision_model and --text_model must both be set to build from pretrained backbones: got "
                    f"vision_model={self.vision_model!r}, text_model={self.text_model!r}; or pass --model_name_or_path"
                )
        if self.tokenizer_train_vocab_size is not None:
            if self.random_init is not True:
                errors.append(
                    f"--tokenizer_train_vocab_size needs --random_init true (a pretrained model needs its own "
                    f"tokenizer): got {self.tokenizer_train_vocab_size}; set --random_init true or drop it"
                )
            if self.tokenizer_name_or_path is not None:
                errors.append(
                    f"--tokenizer_name_or_path must be unset when --tokenizer_train_vocab_size trains one: got "
                    f"{self.tokenizer_name_or_path!r}; drop one of the two"
                )
        if errors:
            raise ArgumentsError(errors)


# --------------------------------------------------------------------------------------------------------------
# the data


@dataclass
class DataArguments:
    """Where the training data comes from, how turns are filtered and how samples are packed.

    Rows follow the FineVision schema (`images`, `texts`, per-turn `*_ratings`). A turn is kept only if each of its
    four ratings reaches the matching `min_*_rating`. Samples longer than `max_sample_length` tokens or with more than
    `max_images_per_example` images are skipped (and counted); the rest are packed into rows of `seq_length` tokens
    with at most `max_images_per_knapsack` images each.
    """

    dataset_name_or_path: str = field(
        default="HuggingFaceM4/FineVision_concat_shuffled_2",
        metadata={
            "help": "Training data: a hub dataset id, a `save_to_disk` folder, or a parquet/json file glob such as "
            "'data/*.parquet'."
        },
    )
    dataset_configs: list[str] | None = field(
        default=None,
        metadata={"help": "Dataset configs (subsets) to concatenate; 'all' takes every config; None the default one."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    curriculum_split: str | None = field(
        default=None,
        metadata={
            "help": "A split of the same dataset read before --train_split: the first epoch reads all its rows "
            "(shuffled among themselves), then the training rows; later epochs shuffle both together. The demo "
            "uses the synthetic `train_simple` split (single-object scenes). Not with --streaming."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it first (for FineVision-sized data)."},
    )
    val_size: int = field(
        default=0,
        metadata={
            "help": "Validation examples. Without --eval_split they are held out from the training split (0 = no "
            "validation); with --eval_split they cap how many of that split are used (0 = all of it)."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "A split to validate on. None holds --val_size examples out of the training split."},
    )
    max_sample_length: int = field(
        default=4096,
        metadata={"help": "Longest sample in tokens (text + image tokens); longer samples are skipped and counted."},
    )
    max_images_per_example: int = field(
        default=4, metadata={"help": "Samples with more images are skipped and counted."}
    )
    max_images_per_knapsack: int = field(
        default=18,
        metadata={"help": "Most images in one packed row (bounds the vision tower's batch and memory)."},
    )
    seq_length: int = field(
        default=4096,
        metadata={"help": "Tokens per packed row; must be >= --max_sample_length so every kept sample fits."},
    )
    pack_buffer_size: int = field(
        default=2048,
        metadata={
            "help": "Rows each DataLoader worker packs together: larger packs tighter (real-token fraction 0.99 at "
            "2048 for 4096-token packs). The buffer holds each row's measures and, for a stream, its undecoded row "
            "(its encoded image bytes); images are decoded only for the pack about to be yielded."
        },
    )
    balance_batches: bool = field(
        default=False,
        metadata={
            "help": "Order each pack round so that every batch of a worker costs about the same training FLOPs (packs "
            "dealt by their FLOP estimate, heavy with light): ranks then wait less for each other. 460m recipe: on; "
            "bench/rank_balance.py measures it."
        },
    )
    stream_shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "With --streaming: rows in each DataLoader worker's shuffle buffer (`datasets`' "
            "IterableDataset.shuffle). Each holds an undecoded row (FineVision: ~0.45 MB), so 1000 hold ~0.45 GB "
            "per worker; more mixes the stream better."
        },
    )
    min_relevance_rating: int = field(
        default=1, metadata={"help": "Keep turns whose relevance rating is at least this (1-5; 1 keeps all)."}
    )
    min_image_correspondence_rating: int = field(
        default=1,
        metadata={"help": "Keep turns whose image-correspondence rating is at least this (1-5; 1 keeps all)."},
    )
    min_visual_dependency_rating: int = field(
        default=1,
        metadata={"help": "Keep turns whose visual-dependency rating is at least this (1-5; 1 keeps all)."},
    )
    min_formatting_rating: int = field(
        default=1, metadata={"help": "Keep turns whose formatting rating is at least this (1-5; 1 keeps all)."}
    )
    max_image_pixels: int = field(
        default=50_000_000,
        metadata={"help": "Decompression-bomb guard: images with more pixels are skipped and counted."},
    )
    synthetic_dataset: bool = field(
        default=False,
        metadata={
            "help": "If --dataset_name_or_path does not exist yet, build the embedded synthetic dataset there "
            "(rendered scenes whose questions only vision can answer) before training."
        },
    )
    synthetic_num_train: int = field(default=4000, metadata={"help": "Synthetic training samples."})
    synthetic_num_validation: int = field(default=200, metadata={"help": "Synthetic validation samples."})
    synthetic_num_test: int = field(default=200, metadata={"help": "Synthetic test samples."})
    synthetic_image_size: int = field(default=64, metadata={"help": "Side of the synthetic square images in pixels."})
    synthetic_train_multi_turn_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Share of synthetic training samples with follow-up questions about the same image (validation "
            "and test keep 0.3)."
        },
    )
    synthetic_num_train_simple: int = field(
        default=0,
        metadata={
            "help": "Rows of the synthetic `train_simple` split (single-object colour/count/position scenes, for "
            "--curriculum_split train_simple); 0 writes none."
        },
    )
    synthetic_train_max_turns: int = field(
        default=3,
        metadata={
            "help": "Most turns per synthetic training sample (validation and test keep 3). Follow-ups ask one "
            "question per type, so at most 4 turns are reached."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Pad each batch's length to a multiple of this (e.g. 64 for tensor cores); None pads to the "
            "longest row only."
        },
    )

    def __post_init__(self) -> None:
        errors: list[str] = []
        for name in ("dataset_name_or_path", "train_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                errors.append(f"--{name} must be a non-empty string: got {value!r}")
        if self.eval_split is not None and (not isinstance(self.eval_split, str) or not self.eval_split):
            errors.append(f"--eval_split must be a split name or None: got {self.eval_split!r}")
        if self.curriculum_split is not None:
            if not isinstance(self.curriculum_split, str) or not self.curriculum_split:
                errors.append(f"--curriculum_split must be a split name or None: got {self.curriculum_split!r}")
            elif self.curriculum_split in (self.train_split, self.eval_split):
                errors.append(
                    f"--curriculum_split must differ from --train_split and --eval_split: got {self.curriculum_split!r}"
                )
            elif self.streaming is True:
                errors.append(
                    f"--curriculum_split needs a map-style dataset, not --streaming true: got {self.curriculum_split!r}"
                )
        self.dataset_configs = _as_str_list(errors, "dataset_configs", self.dataset_configs)
        if self.dataset_configs is not None and "all" in self.dataset_configs and len(self.dataset_configs) > 1:
            errors.append(f"--dataset_configs must be 'all' alone or a list of configs: got {self.dataset_configs}")
        for name in ("streaming", "synthetic_dataset"):
            _check_bool(errors, name, getattr(self, name))
        _check_int(errors, "val_size", self.val_size, 0)
        for name in ("max_sample_length", "max_images_per_example", "max_images_per_knapsack", "seq_length"):
            _check_int(errors, name, getattr(self, name), 1)
        _check_int(errors, "pack_buffer_size", self.pack_buffer_size, 1)
        _check_int(errors, "stream_shuffle_buffer_size", self.stream_shuffle_buffer_size, 1)
        for name in RATING_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= 5:
                errors.append(f"--{name} must be an integer in 1..5 (1 keeps every turn): got {value!r}")
        _check_int(errors, "max_image_pixels", self.max_image_pixels, 1)
        for name in ("synthetic_num_train", "synthetic_num_validation", "synthetic_num_test", "synthetic_num_train_simple"):
            _check_int(errors, name, getattr(self, name), 0)
        _check_int(errors, "synthetic_image_size", self.synthetic_image_size, 16)
        _check_int(errors, "synthetic_train_max_turns", self.synthetic_train_max_turns, 1)
        _check_range(errors, "synthetic_train_multi_turn_fraction", self.synthetic_train_multi_turn_fraction, 0, 1)
        _check_int(errors, "pad_to_multiple_of", self.pad_to_multiple_of, 1, optional=True)

        if _is_int(self.seq_length) and _is_int(self.max_sample_length) and self.seq_length < self.max_sample_length:
            errors.append(
                f"--seq_length must be >= --max_sample_length ({self.max_sample_length}) so every kept sample fits "
                f"in a pack: got {self.seq_length}"
            )
        per_example, per_pack = self.max_images_per_example, self.max_images_per_knapsack
        if _is_int(per_example) and _is_int(per_pack) and per_pack < per_example:
            errors.append(
                f"--max_images_per_knapsack must be >= --max_images_per_example ({per_example}) so every kept sample "
                f"fits in a pack: got {per_pack}"
            )
        if self.synthetic_dataset is True:
            counts = [self.synthetic_num_train, self.synthetic_num_validation, self.synthetic_num_test]
            if all(_is_int(n) for n in counts) and self.synthetic_num_train == 0:
                errors.append("--synthetic_num_train must be >= 1 with --synthetic_dataset true: got 0")
        if errors:
            raise ArgumentsError(errors)

    @property
    def has_validation(self) -> bool:
        """Whether this configuration yields validation data (`--eval_split` or `--val_size` > 0)."""
        return self.eval_split is not None or self.val_size > 0


# --------------------------------------------------------------------------------------------------------------
# training


def _accelerator_available() -> bool:
    """A GPU (or another torch accelerator) that Trainer would place each process on."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    """True when a CUDA GPU with native bf16 is present (CPUs here have none: bf16 made CPU steps 5-33x slower)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class NanoVLMTrainingArguments(TrainingArguments):
    r"""`transformers.TrainingArguments` with nanoVLM's knobs and defaults.

    nanoVLM's own parameters:

    - `lr_mp`, `lr_vision_backbone`, `lr_language_backbone`: one learning rate per module (projector, vision tower,
      language model); 0 freezes that module. They replace `learning_rate`.
    - `weight_decay_exempt_biases_norms_embeddings`: True (the default) keeps `weight_decay` off biases, norms and
      embeddings; False decays every parameter, as the original nanoVLM's AdamW (torch's default 0.01) does.
    - `loss_normalization`: "global_tokens" (the default) divides the summed token losses by the label tokens of
      the whole optimizer step; "micro_batch_mean" is the original's mean per micro-batch / accumulation steps.
    - `eval_interval`: steps between evaluations; sets `eval_steps`, and `save_steps` to the same value, when those
      are not given.
    - `resume_restart_data`: resume weights, optimizer, schedule and step but restart the data (see its help).
    - `eval_max_batches`, `lmms_eval_tasks`, `lmms_eval_interval`, `max_consecutive_nonfinite_losses`, `compile`
      (sets `torch_compile`), and the LoRA knobs `use_lora`, `lora_r`, `lora_alpha`, `lora_dropout`,
      `lora_target_modules`.

    Defaults that differ from `transformers.TrainingArguments`:

    - `per_device_train_batch_size`: 2 instead of 8; `gradient_accumulation_steps`: 8 instead of 1.
    - `max_steps`: 40000 instead of -1; `logging_steps`: 10 instead of 500.
    - `learning_rate`: None instead of 5e-5. It is unused (the three learning rates above replace it); after init it
      mirrors `lr_mp` for code that reads it. Another value is overwritten with a warning.
    - nanoVLM's schedule, applied to every parameter group from its own peak LR (a `LambdaLR`): `lr_scheduler_type`
      "cosine_with_min_lr" instead of "linear", `lr_scheduler_kwargs` `{"min_lr_rate": 0.1}` instead of None (the
      cosine ends at 10% of each peak) and `warmup_steps` 0.03 instead of 0 (in transformers 5, `warmup_steps` < 1
      is a ratio of the total steps). Its warmup runs one step behind nanoVLM's (README, "Differences").
    - `bf16`: None instead of False, resolved before `TrainingArguments.__post_init__`: True when a bf16-capable CUDA
      GPU is present and neither `use_cpu` nor `fp16` is set, else False.
    - `remove_unused_columns`: False instead of True (the collator needs every column).
    - `accelerator_config`: `{"dispatch_batches": False}` instead of None; a given dict without `dispatch_batches`
      gets it too. Dispatching batches from an IterableDataset slices every tensor to the row count, which cuts
      `pixel_values`.
    - `dataloader_num_workers`: 2 instead of 0; `save_total_limit`: 3 instead of None.
    - `ddp_find_unused_parameters`: False instead of None (the vision tower is built without its unused head).
    - `eval_strategy`: "steps" instead of "no" (`parse_args` makes it "no" when there is no validation data);
      `save_steps`: None (= `eval_steps`) instead of 500.
    - `metric_for_best_model`: "eval_loss" instead of None; `greater_is_better`: False instead of None.
    - `report_to`: "none" (explicitly; pass "wandb" or "tensorboard" to log).
    """

    # ---- nanoVLM's learning rates and schedule
    lr_mp: float = field(
        default=0.00512,
        metadata={"help": "Learning rate of the modality projector (pixel shuffle + linear); 0 freezes it."},
    )
    lr_vision_backbone: float = field(
        default=5e-5, metadata={"help": "Learning rate of the vision tower; 0 freezes it."}
    )
    lr_language_backbone: float = field(
        default=5e-5, metadata={"help": "Learning rate of the language model (and lm_head); 0 freezes it."}
    )
    weight_decay_exempt_biases_norms_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Apply --weight_decay to weight matrices only, not to biases, norms and embeddings (common "
            "practice). false decays every parameter, as the original nanoVLM's AdamW does."
        },
    )
    loss_normalization: str = field(
        default="global_tokens",
        metadata={
            "help": "global_tokens: the loss summed over label tokens / the label tokens of the whole optimizer step "
            "(all micro-batches and processes), so every token weighs the same. micro_batch_mean: each "
            "micro-batch's mean / accumulation steps, averaged over processes, as the original nanoVLM does (a "
            "token of a short micro-batch weighs more).",
            "choices": LOSS_NORMALIZATIONS,
        },
    )
    # ---- evaluation and robustness
    eval_interval: int = field(
        default=500,
        metadata={"help": "Steps between validations; sets --eval_steps and --save_steps when they are not given."},
    )
    eval_max_batches: int | None = field(
        default=None, metadata={"help": "Cap on validation batches per evaluation; None evaluates the whole set."}
    )
    lmms_eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "lmms-eval tasks to run on saved checkpoints (e.g. mmstar mme); None runs none."},
    )
    lmms_eval_interval: int | None = field(
        default=None, metadata={"help": "Steps between lmms-eval runs; None = 2 x --eval_interval."}
    )
    lmms_eval_limit: float | None = field(
        default=None, metadata={"help": "Documents per lmms-eval task (an int, or a fraction < 1); None: all."}
    )
    lmms_eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the lmms-eval runs."})
    lmms_eval_device: str | None = field(
        default=None,
        metadata={"help": "Device of local lmms-eval processes (e.g. cuda:1, cpu); None: cuda when available."},
    )
    lmms_eval_slurm_template: str | None = field(
        default=None,
        metadata={
            "help": "SLURM job template file, or 'default': evaluate through sbatch. None: local background "
            "processes."
        },
    )
    lmms_eval_results_dir: str | None = field(
        default=None, metadata={"help": "Where step_N.json results go; None: OUTPUT_DIR/eval_results."}
    )
    lmms_eval_await_timeout: float = field(
        default=3600, metadata={"help": "Seconds to wait for pending evaluations at the end of training."}
    )
    lmms_eval_max_concurrent: int = field(default=1, metadata={"help": "Local evaluation processes at a time."})
    max_consecutive_nonfinite_losses: int = field(
        default=5,
        metadata={
            "help": "A step whose loss is NaN/inf on any process is skipped (no weight or optimizer update) and "
            "counted in train/nonfinite_steps_skipped; the logged loss is the mean of the logging window's kept "
            "steps, NaN when all were skipped. A skipped step still counts toward --max_steps and the LR schedule "
            "advances as on any step. Training stops after this many such steps in a row; 0 never stops."
        },
    )
    resume_restart_data: bool = field(
        default=False,
        metadata={
            "help": "With --resume_from_checkpoint: restore the model weights, optimizer, LR schedule, RNG and step "
            "count but NOT the data position: the data restarts from its beginning, so data/packing settings "
            "(--seq_length, --dataset_name_or_path, the number of processes, ...) may differ from the checkpoint's. "
            "The model settings must still match. Without it, a resume with changed settings is refused."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model (sets --torch_compile). Worth it on GPUs; on CPU the first compile "
            "costs 40-50 s for little gain."
        },
    )
    # ---- LoRA (applied to the language model's decoder only: SigLIP has layers with the same names)
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={"help": "Linear-layer names in the language model's decoder that get LoRA adapters."},
    )

    # ---- TrainingArguments fields with nanoVLM's defaults (listed in the class docstring)
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "Batch size (packed rows) per device per micro-step."}
    )
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Micro-steps accumulated per optimizer step."}
    )
    max_steps: int = field(default=40000, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Unused: --lr_mp, --lr_vision_backbone and --lr_language_backbone replace it."},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine_with_min_lr",
        metadata={"help": "Schedule of every group's LR; nanoVLM's: linear warmup, then cosine to min_lr_rate."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 0.1},
        metadata={"help": "Scheduler options (JSON object); min_lr_rate: the cosine's end, a fraction of each peak."},
    )
    warmup_steps: float = field(
        default=0.03,
        metadata={"help": "Linear warmup: a step count, or below 1 a fraction of the total steps (nanoVLM: 0.03)."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. None: on when a bf16-capable CUDA GPU is present, else off."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs every column of the packed dataset."}
    )
    accelerator_config: dict | str | None = field(
        default_factory=lambda: {"dispatch_batches": False},
        metadata={
            "help": "Accelerator options (JSON object, YAML mapping or a JSON file). dispatch_batches defaults to "
            "False: dispatching slices pixel_values to the row count."
        },
    )
    dataloader_num_workers: int = field(default=2, metadata={"help": "Dataloader worker processes per rank."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept on disk (oldest deleted)."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Loggers: none, wandb, tensorboard, trackio, all."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Keep False: every parameter gets a gradient (no pooling head)."}
    )
    eval_strategy: IntervalStrategy | str = field(
        default="steps", metadata={"help": "When to validate: steps (every --eval_steps), epoch or no."}
    )
    save_strategy: SaveStrategy | str = field(
        default="steps", metadata={"help": "When to save: steps, epoch, best or no."}
    )
    save_steps: float | None = field(
        default=None, metadata={"help": "Save every this many steps; None = --eval_steps."}
    )
    metric_for_best_model: str | None = field(
        default="eval_loss", metadata={"help": "Metric that ranks checkpoints (best-checkpoint tracking)."}
    )
    greater_is_better: bool | None = field(
        default=False, metadata={"help": "Whether a larger --metric_for_best_model is better."}
    )

    def __post_init__(self) -> None:
        errors = self._validate_nanovlm()
        if errors:
            raise ArgumentsError(errors)
        self._resolve_defaults()
        super().__post_init__()

    def _validate_nanovlm(self) -> list[str]:
        """Check nanoVLM's own fields; returns one message per problem."""
        errors: list[str] = []
        lrs = {name: getattr(self, name) for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone")}
        for name, value in lrs.items():
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                errors.append(f"--{name} must be a finite number >= 0 (0 freezes that module): got {value!r}")
        if all(_is_number(v) and v == 0 for v in lrs.values()):
            errors.append(
                "--lr_mp, --lr_vision_backbone and --lr_language_backbone must not all be 0 (nothing would train): "
                "got 0, 0, 0"
            )
        kwargs = self.lr_scheduler_kwargs
        if isinstance(kwargs, str) and kwargs.startswith("{"):
            kwargs = json.loads(kwargs)
        if isinstance(kwargs, dict) and "min_lr_rate" in kwargs:  # transformers accepts any value
            _check_range(errors, "lr_scheduler_kwargs min_lr_rate", kwargs["min_lr_rate"], 0, 1)
        exempt = self.weight_decay_exempt_biases_norms_embeddings
        _check_bool(errors, "weight_decay_exempt_biases_norms_embeddings", exempt)
        if exempt is False and self.weight_decay == 0:
            errors.append(
                "--weight_decay_exempt_biases_norms_embeddings false has no effect with --weight_decay 0: got "
                "--weight_decay 0; set --weight_decay (the original nanoVLM: 0.01) or drop the flag"
            )
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            errors.append(f"--loss_normalization must be one of {LOSS_NORMALIZATIONS}: got {self.loss_normalization!r}")
        _check_int(errors, "eval_interval", self.eval_interval, 1)
        _check_int(errors, "eval_max_batches", self.eval_max_batches, 1, optional=True)
        self.lmms_eval_tasks = _as_str_list(errors, "lmms_eval_tasks", self.lmms_eval_tasks)
        _check_int(errors, "lmms_eval_interval", self.lmms_eval_interval, 1, optional=True)
        _check_int(errors, "lmms_eval_batch_size", self.lmms_eval_batch_size, 1)
        _check_int(errors, "lmms_eval_max_concurrent", self.lmms_eval_max_concurrent, 1)
        if self.lmms_eval_limit is not None and (not _is_number(self.lmms_eval_limit) or self.lmms_eval_limit <= 0):
            errors.append(f"--lmms_eval_limit must be a number > 0 or None: got {self.lmms_eval_limit!r}")
        if not _is_number(self.lmms_eval_await_timeout) or self.lmms_eval_await_timeout < 0:
            errors.append(f"--lmms_eval_await_timeout must be a number >= 0: got {self.lmms_eval_await_timeout!r}")
        _check_int(errors, "max_consecutive_nonfinite_losses", self.max_consecutive_nonfinite_losses, 0)
        _check_bool(errors, "resume_restart_data", self.resume_restart_data)
        if self.resume_restart_data is True and self.resume_from_checkpoint in (None, "", "false", "False"):
            errors.append(
                "--resume_restart_data needs a checkpoint to resume from: got no --resume_from_checkpoint; pass "
                "--resume_from_checkpoint true (the last in --output_dir) or a checkpoint folder"
            )
        for name in ("compile", "use_lora"):
            _check_bool(errors, name, getattr(self, name))
        _check_int(errors, "lora_r", self.lora_r, 1)
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            errors.append(f"--lora_alpha must be a number > 0: got {self.lora_alpha!r}")
        _check_range(errors, "lora_dropout", self.lora_dropout, 0, 1, high_inclusive=False)
        targets = _as_str_list(errors, "lora_target_modules", self.lora_target_modules)
        if targets is not None:
            self.lora_target_modules = targets
            if self.use_lora is True and not targets:
                errors.append("--lora_target_modules must name at least one module with --use_lora true: got []")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            errors.append(f"--bf16 must be true, false or None (auto): got {self.bf16!r}")
        return errors

    def _use_cpu_for_several_processes_without_gpu(self) -> None:
        """Under torchrun / `accelerate launch` with several processes and no GPU, Trainer joins them into one DDP
        job on gloo only with `use_cpu`; without it every process trains alone on all the data, into one output
        folder. Set it, and say so once."""
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if self.use_cpu or world_size < 2 or _accelerator_available():
            return
        self.use_cpu = True
        if os.environ.get("RANK", "0") == "0":
            logger.warning(
                "%d processes and no GPU: training them as one DDP job on CPU (gloo), as with --use_cpu true.",
                world_size,
            )

    def _resolve_defaults(self) -> None:
        """Map nanoVLM's knobs onto TrainingArguments' fields before `TrainingArguments.__post_init__` sees them."""
        if self.learning_rate not in (None, self.lr_mp):
            logger.warning("--learning_rate=%r is unused: NanoVLMTrainer follows --lr_mp; setting it to %r",
                           self.learning_rate, self.lr_mp)
        self.learning_rate = self.lr_mp  # for code that reads it
        self._use_cpu_for_several_processes_without_gpu()
        if self.bf16 is None:
            self.bf16 = bool(not self.use_cpu and not self.fp16 and _bf16_supported())
        self.torch_compile = self.torch_compile or self.compile
        self.compile = self.torch_compile
        config = self.accelerator_config
        if isinstance(config, str) and config.startswith("{"):
            config = json.loads(config)
        if isinstance(config, dict):
            self.accelerator_config = {"dispatch_batches": False, **config}
        elif config is None:
            self.accelerator_config = {"dispatch_batches": False}
        if self.eval_steps is None:
            self.eval_steps = self.eval_interval
        if self.save_steps is None:
            self.save_steps = self.eval_steps
        if self.lmms_eval_interval is None:
            self.lmms_eval_interval = 2 * self.eval_interval


# --------------------------------------------------------------------------------------------------------------
# run names


def _short_name(name_or_path: str) -> str:
    """'google/siglip2-base-patch16-512' -> 'siglip2-base-patch16-512'; a folder -> its last part."""
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def _format_lr(lr: float) -> str:
    """0.00512 -> '5.1e-03', 5e-5 -> '5e-05', 0 -> '0' (frozen)."""
    if lr == 0:
        return "0"
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{exponent}"


def run_name(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: NanoVLMTrainingArguments,
    world_size: int | None = None,
    date: str | None = None,
) -> str:
    """nanoVLM's descriptive run name, e.g.
    `nanoVLM_siglip2-base-patch16-512_SmolLM2-360M-Instruct_8xGPU_bs128_40000steps_lr-mp5.1e-03-vis5e-05-lang5e-05_20261122`.

    Parts: the model (backbone short names; the checkpoint's name with `--model_name_or_path`; `random-init` for a
    random model built from `--model_config`), `synthetic` for the embedded dataset, processes and device kind,
    global batch (per-device x accumulation x world size), steps, the three learning rates, and the date.

    Args:
        world_size: processes taking part; None uses `training_args.world_size`.
        date: `YYYYMMDD`; None uses today.
    """
    if model_args.model_name_or_path is not None:
        model = _short_name(model_args.model_name_or_path)
    elif model_args.random_init and model_args.model_config is not None:
        model = "random-init"
    else:
        model = f"{_short_name(model_args.vision_model)}_{_short_name(model_args.text_model)}"
    world_size = training_args.world_size if world_size is None else world_size
    device = {"cuda": "GPU"}.get(training_args.device.type, training_args.device.type.upper())
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
    lrs = (
        f"lr-mp{_format_lr(training_args.lr_mp)}-vis{_format_lr(training_args.lr_vision_backbone)}"
        f"-lang{_format_lr(training_args.lr_language_backbone)}"
    )
    parts = ["nanoVLM", model]
    if data_args.synthetic_dataset:
        parts.append("synthetic")
    parts += [f"{world_size}x{device}", f"bs{batch}", f"{training_args.max_steps}steps", lrs]
    parts.append(date if date is not None else time.strftime("%Y%m%d"))
    return "_".join(parts)


__all__ = [
    "ArgumentsError",
    "DataArguments",
    "ModelArguments",
    "NanoVLMTrainingArguments",
    "run_name",
]
