"""The training recipe's arguments, which `nanovlm.training.parser.parse_args` fills from YAML + CLI.

- `ModelArguments`: which model to train (pretrained backbones, a nanovlm checkpoint, or a random-init config) and
  how images become tiles.
- `DataArguments`: where the data comes from, how it is filtered (FineVision's per-turn ratings) and packed, and the
  demo's synthetic dataset (`--synthetic_<name>`: fields of `SyntheticSettings`, see `SYNTHETIC_FLAG_DEFAULTS`).
- `NanoVLMTrainingArguments` and `run_name` (defined in `training_arguments`): `transformers.TrainingArguments` plus
  nanoVLM's knobs, and nanoVLM's descriptive run name.

The parser converts each value to its field's type. Left to check here: the bounds fields declare in their metadata
(`min`, `range`, `choices`; `checks.field_errors`) and, in `__post_init__`, the rules across fields. All problems
are collected into one `ArgumentsError` listing each as `--flag must ...: got X`, so a bad YAML recipe fails at once
with everything to fix.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from transformers.hf_argparser import HfArg

from ..data.conversations import RATING_COLUMNS
from ..data.synthetic.settings import SyntheticSettings
from .checks import as_str_list, field_errors, is_int, is_number, parse_json_dict
from .errors import ArgumentsError
from .training_arguments import NanoVLMTrainingArguments, run_name

ATTN_IMPLEMENTATIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention", "torch_varlen"]
RATING_FIELDS = tuple(f"min_{name}_rating" for name in RATING_COLUMNS)  # one flag per FineVision rating column
MIN_TOKENIZER_VOCAB_SIZE = 259  # 256 bytes + the three ChatML tokens, see `nanovlm.tokenizer.train_tokenizer`


# --------------------------------------------------------------------------------------------------------------
# the model


# The image settings' values without --model_name_or_path; with it, None means the checkpoint processor's value.
_IMAGE_DEFAULTS = {"max_image_size": 2048, "max_grid": 8, "upscale_images": False, "normalize_images": True}


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

    vision_model: str | None = HfArg(
        default="google/siglip2-base-patch16-512",
        help="Vision backbone: a SigLIP/SigLIP2 hub id or local folder (its pooling head is dropped).",
    )
    text_model: str | None = HfArg(
        default="HuggingFaceTB/SmolLM2-360M-Instruct",
        help="Language backbone: a causal-LM hub id or local folder (Llama/SmolLM2 by default).",
    )
    model_name_or_path: str | None = HfArg(
        default=None,
        help="A nanovlm checkpoint (hub id or folder) to start from. None builds the model from --vision_model and "
        "--text_model (or from --model_config with --random_init).",
    )
    tokenizer_name_or_path: str | None = HfArg(
        default=None,
        help="Tokenizer to extend with the image and tile tokens. None uses the text model's (or the checkpoint's "
        "with --model_name_or_path).",
    )
    pixel_shuffle_factor: int = HfArg(
        default=4,
        help="Pixel-shuffle factor s of the projector: an n x n patch grid becomes (n/s)^2 image tokens of s^2 * D "
        "channels. Larger means fewer image tokens per tile.",
        metadata={"min": 1},
    )
    tile_size: int | None = HfArg(
        default=None,
        help="Side of one image tile in pixels. None uses the vision model's image size.",
        metadata={"min": 1},
    )
    max_image_size: int | None = HfArg(
        default=None,
        help="Longest side an image is resized to (aspect preserved, rounded to whole tiles). Must be a multiple of "
        "the tile size. None: 2048, or with --model_name_or_path the checkpoint processor's, which a value replaces "
        "(as AutoProcessor.from_pretrained(path, max_image_size=N) does).",
        metadata={"min": 1},
    )
    max_grid: int | None = HfArg(
        default=None,
        help="Most tiles per image side; also sets how many <row_i_col_j> tile tokens exist. None: 8, or with "
        "--model_name_or_path the checkpoint processor's, which a smaller value replaces (its tokenizer has tile "
        "tokens up to its own grid only).",
        metadata={"min": 1},
    )
    upscale_images: bool | None = HfArg(
        default=None,
        help="Resize every image's long side to --max_image_size, as nanoVLM did (more tiles, more tokens); by "
        "default it is only rounded up to the next whole tile. None: false, or with --model_name_or_path the "
        "checkpoint processor's, which a value replaces.",
    )
    normalize_images: bool | None = HfArg(
        default=None,
        help="Normalize pixels with SigLIP's mean/std, as the vision model was trained (the original nanoVLM fed "
        "un-normalized pixels). None: true, or with --model_name_or_path the checkpoint processor's (the pixels "
        "its model was trained on; another value is refused).",
    )
    image_mean: list[float] | None = HfArg(
        default=None,
        help="Per-channel (R, G, B) mean for pixel normalization, in [0, 1] units; None keeps SigLIP's 0.5. A "
        "pretrained vision tower needs the statistics it was trained with; one trained from scratch learns faster "
        "with its training images' own mean and std (the demo sets both).",
    )
    image_std: list[float] | None = HfArg(
        default=None,
        help="Per-channel (R, G, B) standard deviation for pixel normalization; None keeps SigLIP's 0.5.",
    )
    attn_implementation: str = HfArg(
        default="sdpa",
        help="Attention kernel. All keep packed samples isolated: sdpa, eager and flex_attention by a mask from "
        "position_ids; flash_attention_2 (flash-attn package) and torch_varlen (PyTorch's own flash varlen kernel, "
        "GPU only; nanovlm/attention.py) by the collator's cu_seq_lens, skipping the other samples' blocks. "
        "flex_attention has no backward on CPU.",
        metadata={"choices": ATTN_IMPLEMENTATIONS},
    )
    random_init: bool = HfArg(
        default=False,
        help="Build a randomly initialised model (no pretrained weights) from --model_config (NanoVLMConfig kwargs) "
        "instead of loading pretrained backbones. Used by the demo.",
    )
    model_config: dict[str, Any] | str | None = HfArg(
        default=None,
        help='NanoVLMConfig keyword arguments for --random_init, e.g. {"vision_config": {...}, "text_config": {...}, '
        '"pixel_shuffle_factor": 2}: a YAML mapping, or a JSON object on the CLI.',
    )
    vision_sincos_position_scale: float | None = HfArg(
        default=None,
        help="With --random_init: start the vision tower's learned position embeddings from a 2-D sin-cos grid (as "
        "MAE does) times this scale instead of random noise. A tower trained from scratch then tells its patches' "
        "positions apart from the first step; the demo uses 2.0. None keeps the random init. Recorded in the model "
        "config (vision_sincos_position_scale).",
    )
    tokenizer_train_vocab_size: int | None = HfArg(
        default=None,
        help="If set, train a byte-level BPE tokenizer with this many BPE tokens on the training texts instead of "
        "loading one (needs --random_init; the demo uses this). At least 259.",
        metadata={"min": MIN_TOKENIZER_VOCAB_SIZE},
    )


    def __post_init__(self) -> None:
        errors = field_errors(self)
        if self.model_name_or_path is None:  # a checkpoint keeps its processor's (apply_checkpoint_image_settings)
            for name, default in _IMAGE_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        for name in ("vision_model", "text_model", "model_name_or_path", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                errors.append(f"--{name} must be a hub id or a local path: got {value!r}")
        self.model_config = parse_json_dict(errors, "model_config", self.model_config)
        errors += self._image_errors() + self._source_errors() + self._model_config_errors()
        if errors:
            raise ArgumentsError(errors)

    def _image_errors(self) -> list[str]:
        """Pixel normalisation and tiling: what the processor is built with."""
        errors: list[str] = []
        for name, low in (("image_mean", -math.inf), ("image_std", 0.0)):
            value = getattr(self, name)
            if value is None:
                continue
            bound = "" if low == -math.inf else f" > {low:g}"
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(is_number(v) and math.isfinite(v) and v > low for v in value)
            ):
                errors.append(f"--{name} must be three finite numbers{bound} (R G B): got {value!r}")
            elif self.normalize_images is False:
                errors.append(f"--{name} has no effect with --normalize_images false: got {value!r}; drop one")
            elif self.model_name_or_path is not None:
                errors.append(
                    f"--{name} must be unset when starting from --model_name_or_path (its saved processor keeps the "
                    f"normalization the model was trained with): got {value!r}"
                )
        tile, size, grid = self.tile_size, self.max_image_size, self.max_grid
        if all(is_int(v) and v >= 1 for v in (tile, size, grid)):
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
        return errors

    def _model_config_errors(self) -> list[str]:
        """`--model_config` built as the random-init model's config (the tokenizer's vocabulary aside): its size
        checks fail here, at parse time, rather than after the data is loaded and the tokenizer trained."""
        if self.random_init is not True or not isinstance(self.model_config, dict):
            return []
        from ..configuration_nanovlm import NanoVLMConfig

        config = {"pixel_shuffle_factor": self.pixel_shuffle_factor, **self.model_config}
        config.pop("image_token_id", None)  # set from the tokenizer
        try:
            built = NanoVLMConfig(**config)
        except Exception as exc:  # noqa: BLE001 - any failure is the config's; transformers' validators raise their own type
            return [f"--model_config is not a valid NanoVLMConfig: {' '.join(str(exc).split())}"]
        # A config class keeps any unknown keyword as an attribute: a misspelled key would be silently ignored.
        errors = _unknown_config_keys("model_config", config, type(built))
        for sub in ("vision_config", "text_config"):
            if isinstance(config.get(sub), dict):
                errors += _unknown_config_keys(f"model_config {sub}", config[sub], type(getattr(built, sub)))
        return errors

    def _source_errors(self) -> list[str]:
        """Where the model and tokenizer come from: a checkpoint, a random init or pretrained backbones."""
        errors: list[str] = []
        scale = self.vision_sincos_position_scale
        if scale is not None and (not is_number(scale) or not math.isfinite(scale) or scale <= 0):
            errors.append(f"--vision_sincos_position_scale must be a number > 0 or None: got {scale!r}")
        elif scale is not None and self.random_init is not True:
            errors.append(
                f"--vision_sincos_position_scale needs --random_init true (a pretrained tower keeps its "
                f"position embeddings): got {scale!r}"
            )
        backbones = f"vision_model={self.vision_model!r}, text_model={self.text_model!r}"
        no_backbone = self.vision_model is None or self.text_model is None
        if self.random_init is True:
            if self.model_name_or_path is not None:
                errors.append(
                    f"--model_name_or_path must be unset with --random_init true (a fresh model has no checkpoint): "
                    f"got {self.model_name_or_path!r}; drop one of the two"
                )
            if self.model_config is None and no_backbone:
                errors.append(
                    "--random_init needs --model_config or both --vision_model and --text_model (their configs): "
                    f"got model_config=None, {backbones}"
                )
        elif self.model_config is not None:
            errors.append(
                "--model_config only applies with --random_init true (pretrained models bring their own config): "
                f"got {self.model_config!r}; set --random_init true or drop --model_config"
            )
        if self.random_init is not True and self.model_name_or_path is None and no_backbone:
            errors.append(
                "--vision_model and --text_model must both be set to build from pretrained backbones: got "
                f"{backbones}; or pass --model_name_or_path"
            )
        vocab = self.tokenizer_train_vocab_size
        if vocab is not None and self.random_init is not True:
            errors.append(
                f"--tokenizer_train_vocab_size needs --random_init true (a pretrained model needs its own "
                f"tokenizer): got {vocab}; set --random_init true or drop it"
            )
        if vocab is not None and self.tokenizer_name_or_path is not None:
            errors.append(
                f"--tokenizer_name_or_path must be unset when --tokenizer_train_vocab_size trains one: got "
                f"{self.tokenizer_name_or_path!r}; drop one of the two"
            )
        return errors


def _unknown_config_keys(where: str, given: dict, config_class: type) -> list[str]:
    """One message per key of `given` that `config_class` (a transformers config dataclass) does not declare."""
    known = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    known |= {"model_type", "rope_theta", "rope_scaling"}  # read by transformers although not fields
    return [
        f"--{where} has the unknown key `{key}`{_did_you_mean(key, known)}; {config_class.__name__} would silently "
        "ignore it"
        for key in given if key not in known
    ]


def _did_you_mean(name: str, candidates: set[str]) -> str:
    matches = difflib.get_close_matches(name, sorted(candidates), n=2, cutoff=0.7)
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


# --------------------------------------------------------------------------------------------------------------
# the data

# The `SyntheticSettings` fields the recipe exposes as `--synthetic_<name>` flags, with the recipe's defaults. Each
# flag takes one value of its default's type; its help and bounds come from the field. The dataset's seed is `--seed`;
# the other settings keep `SyntheticSettings`' defaults.
SYNTHETIC_FLAG_DEFAULTS: dict[str, Any] = {
    "num_train": 4000, "num_validation": 200, "num_test": 200, "image_size": 64, "train_multi_turn_fraction": 0.3,
    "train_max_turns": 3, "num_train_simple": 0,
}
# SyntheticSettings field -> the flag that sets it (for "built with other settings" messages)
SYNTHETIC_FLAGS = {"seed": "seed", **{name: f"synthetic_{name}" for name in SYNTHETIC_FLAG_DEFAULTS}}


def _synthetic_flag(name: str, default: Any) -> tuple[str, type, Any]:
    """The `DataArguments` field of flag `--synthetic_<name>`: `SyntheticSettings.<name>` with the recipe's default."""
    setting = SyntheticSettings.__dataclass_fields__[name]
    metadata = {**setting.metadata, "help": f"Synthetic dataset: {setting.metadata['help']}."}
    return f"synthetic_{name}", type(default), field(default=default, metadata=metadata)


# The `--synthetic_<name>` flags as a dataclass, the base of `DataArguments`: one flag per field, declared once.
_SyntheticFlags = dataclasses.make_dataclass(
    "SyntheticFlags", [_synthetic_flag(name, default) for name, default in SYNTHETIC_FLAG_DEFAULTS.items()]
)


@dataclass
class DataArguments(_SyntheticFlags):
    """Where the training data comes from, how turns are filtered and how samples are packed.

    Rows follow the FineVision schema (`images`, `texts`, per-turn `*_ratings`). A turn is kept only if each of its
    four ratings reaches the matching `min_*_rating`. Samples longer than `max_sample_length` tokens or with more than
    `max_images_per_example` images are skipped (and counted); the rest are packed into rows of `seq_length` tokens
    with at most `max_images_per_knapsack` images each.

    With `synthetic_dataset`, the demo's data is built at `dataset_name_or_path` from the `--synthetic_<name>` flags
    (see `SYNTHETIC_FLAG_DEFAULTS`) and `--seed`: `synthetic_settings`.
    """

    dataset_name_or_path: str = HfArg(
        default="HuggingFaceM4/FineVision_concat_shuffled_2",
        help="Training data: a hub dataset id, a `save_to_disk` folder, or a parquet/json file glob such as "
        "'data/*.parquet'.",
    )
    dataset_configs: list[str] | None = HfArg(
        default=None,
        help="Dataset configs (subsets) to concatenate; 'all' takes every config; None the default one.",
    )
    train_split: str = HfArg(default="train", help="Split to train on.")
    curriculum_split: str | None = HfArg(
        default=None,
        help="A split of the same dataset read before --train_split: the first epoch reads all its rows (shuffled "
        "among themselves), then the training rows; later epochs shuffle both together. The demo uses the synthetic "
        "`train_simple` split (single-object scenes). Not with --streaming.",
    )
    streaming: bool = HfArg(
        default=False,
        help="Stream the dataset instead of downloading it first (for FineVision-sized data).",
    )
    val_size: int = HfArg(
        default=0,
        help="Validation examples. Without --eval_split they are held out from the training split (0 = no "
        "validation; --streaming: its first N rows, whatever the ranks and workers); with --eval_split they cap "
        "how many of that split are used (0 = all of it).",
        metadata={"min": 0},
    )
    eval_split: str | None = HfArg(
        default=None,
        help="A split to validate on. None holds --val_size examples out of the training split.",
    )
    max_sample_length: int = HfArg(
        default=4096,
        help="Longest sample in tokens (text + image tokens); longer samples are skipped and counted.",
        metadata={"min": 1},
    )
    max_images_per_example: int = HfArg(
        default=4,
        help="Samples with more images are skipped and counted.",
        metadata={"min": 1},
    )
    max_images_per_knapsack: int = HfArg(
        default=18,
        help="Most images in one packed row (bounds the vision tower's batch and memory).",
        metadata={"min": 1},
    )
    seq_length: int = HfArg(
        default=4096,
        help="Tokens per packed row; must be >= --max_sample_length so every kept sample fits.",
        metadata={"min": 1},
    )
    pack_buffer_size: int = HfArg(
        default=2048,
        help="Rows each DataLoader worker packs together: larger packs tighter (real-token fraction 0.99 at 2048 for "
        "4096-token packs). The buffer holds each row's measures (a stream's undecoded rows wait in a per-worker temp file "
        "under $TMPDIR, ~0.27 MiB each); images are decoded only for the pack about to be yielded.",
        metadata={"min": 1},
    )
    balance_batches: bool = HfArg(
        default=False,
        help="Order each pack round so that every batch of a worker costs about the same training FLOPs (packs dealt "
        "by their FLOP estimate, heavy with light): ranks then wait less for each other. 460m recipe: on; "
        "bench/rank_balance.py measures it.",
    )
    stream_shuffle_buffer_size: int = HfArg(
        default=1000,
        help="With --streaming: rows in each DataLoader worker's shuffle buffer (`datasets`' "
        "IterableDataset.shuffle). Each holds an undecoded row (FineVision: ~0.45 MB), so 1000 hold ~0.45 GB per "
        "worker; more mixes the stream better.",
        metadata={"min": 1},
    )
    min_relevance_rating: int = HfArg(
        default=1,
        help="Keep turns whose relevance rating is at least this (1-5; 1 keeps all).",
    )
    min_image_correspondence_rating: int = HfArg(
        default=1,
        help="Keep turns whose image-correspondence rating is at least this (1-5; 1 keeps all).",
    )
    min_visual_dependency_rating: int = HfArg(
        default=1,
        help="Keep turns whose visual-dependency rating is at least this (1-5; 1 keeps all).",
    )
    min_formatting_rating: int = HfArg(
        default=1,
        help="Keep turns whose formatting rating is at least this (1-5; 1 keeps all).",
    )
    max_image_pixels: int = HfArg(
        default=50_000_000,
        help="Decompression-bomb guard: images with more pixels are skipped and counted.",
        metadata={"min": 1},
    )
    synthetic_dataset: bool = HfArg(
        default=False,
        help="If --dataset_name_or_path does not exist yet, build the embedded synthetic dataset there (rendered "
        "scenes whose questions only vision can answer) before training.",
    )
    pad_to_multiple_of: int | None = HfArg(
        default=None,
        help="Pad each batch's length to a multiple of this (e.g. 64 for tensor cores); None pads to the longest row "
        "only.",
        metadata={"min": 1},
    )

    def __post_init__(self) -> None:
        errors = field_errors(self)
        for name in ("dataset_name_or_path", "train_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                errors.append(f"--{name} must be a non-empty string: got {value!r}")
        for name in ("eval_split", "curriculum_split"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                errors.append(f"--{name} must be a split name or None: got {value!r}")
        if self.eval_split and self.eval_split == self.train_split:  # it would validate on the training rows
            errors.append(f"--eval_split must differ from --train_split (validation on the training rows): got "
                          f"{self.eval_split!r}; use --eval_split none with --val_size N to hold out N rows")
        if self.curriculum_split and self.curriculum_split in (self.train_split, self.eval_split):
            errors.append(
                f"--curriculum_split must differ from --train_split and --eval_split: got {self.curriculum_split!r}"
            )
        elif self.curriculum_split and self.streaming is True:
            errors.append(
                f"--curriculum_split needs a map-style dataset, not --streaming true: got {self.curriculum_split!r}"
            )
        self.dataset_configs = as_str_list(errors, "dataset_configs", self.dataset_configs)
        if self.dataset_configs is not None and "all" in self.dataset_configs and len(self.dataset_configs) > 1:
            errors.append(f"--dataset_configs must be 'all' alone or a list of configs: got {self.dataset_configs}")
        repeated = sorted({c for c in self.dataset_configs or () if self.dataset_configs.count(c) > 1})
        if repeated:  # each would be loaded again: its rows read twice per epoch
            errors.append(f"--dataset_configs lists {', '.join(repeated)} more than once: name each config once")
        for name in RATING_FIELDS:
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= 5:
                errors.append(f"--{name} must be an integer in 1..5 (1 keeps every turn): got {value!r}")
        if is_int(self.seq_length) and is_int(self.max_sample_length) and self.seq_length < self.max_sample_length:
            errors.append(
                f"--seq_length must be >= --max_sample_length ({self.max_sample_length}) so every kept sample fits "
                f"in a pack: got {self.seq_length}"
            )
        per_example, per_pack = self.max_images_per_example, self.max_images_per_knapsack
        if is_int(per_example) and is_int(per_pack) and per_pack < per_example:
            errors.append(
                f"--max_images_per_knapsack must be >= --max_images_per_example ({per_example}) so every kept sample "
                f"fits in a pack: got {per_pack}"
            )
        if self.synthetic_dataset is True and self.synthetic_num_train == 0:
            errors.append("--synthetic_num_train must be >= 1 with --synthetic_dataset true: got 0")
        if errors:
            raise ArgumentsError(errors)

    @property
    def has_validation(self) -> bool:
        """Whether this configuration yields validation data (`--eval_split` or `--val_size` > 0)."""
        return self.eval_split is not None or self.val_size > 0

    def synthetic_settings(self, seed: int) -> SyntheticSettings:
        """What `--synthetic_dataset true` builds: the `--synthetic_<name>` flags, with `seed` (the run's `--seed`)."""
        flags = {name: getattr(self, f"synthetic_{name}") for name in SYNTHETIC_FLAG_DEFAULTS}
        return SyntheticSettings(seed=seed, **flags)


__all__ = [
    "ArgumentsError",
    "DataArguments",
    "ModelArguments",
    "NanoVLMTrainingArguments",
    "SYNTHETIC_FLAGS",
    "SYNTHETIC_FLAG_DEFAULTS",
    "run_name",
]
