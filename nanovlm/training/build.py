"""Build what a training run needs from its arguments: tokenizer, processor, model, packed datasets, collator.

Kept out of `train_accelerate.py` so each piece is importable and tested on its own.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from transformers import AutoProcessor

from ..configuration_nanovlm import NanoVLMConfig
from ..data.collator import PackedCollator
from ..data.conversations import RATING_COLUMNS, RatingThresholds
from ..data.packing import PackedDataset
from ..data.readers import SampleDataset, SampleStream
from ..data.samples import SampleBuilder
from ..data.sources import (
    has_one_split,
    load_finevision,
    shard_for_rank,
    shuffle_dataset,
    split_train_val,
    stream_read_factor,
)
from ..modeling_nanovlm import NanoVLMForConditionalGeneration
from ..processing_nanovlm import NanoVLMProcessor
from ..tokenizer import extend_tokenizer, train_tokenizer
from .arguments import RATING_FIELDS, SYNTHETIC_FLAGS
from .checks import is_local_path
from .errors import UsageError
from .flops import pack_flops

logger = logging.getLogger(__name__)


def prepare_synthetic_dataset(data_args, training_args) -> None:
    """With `--synthetic_dataset true`, build the synthetic dataset at `dataset_name_or_path` if it is not there yet
    (main process first). An existing one built with other `--synthetic_*` settings or `--seed` is an error, not
    silently reused; a folder without the settings record (not built by us) is used as given."""
    from ..data.synthetic import build_synthetic_dataset, build_then_rename, recorded_settings

    if not data_args.synthetic_dataset:
        return
    path = Path(data_args.dataset_name_or_path)
    settings = data_args.synthetic_settings(training_args.seed)
    # Every check inside: the other processes look only once the main one has finished writing (one that looked
    # while it wrote saw a folder without its settings record, took it as given and read a partial dataset).
    with training_args.main_process_first(desc="building the synthetic dataset"):
        if not path.exists():
            logger.info("Building the synthetic dataset in %s", path)
            build_then_rename(path, lambda tmp: build_synthetic_dataset(tmp, settings))
        built = recorded_settings(path)
        differences = [] if built is None else settings.differences(built, SYNTHETIC_FLAGS)
        if differences:
            raise UsageError(
                f"The synthetic dataset in {path} was built with other settings ({'; '.join(differences)}). Delete "
                "the folder to rebuild it, or point --dataset_name_or_path at a new folder."
            )


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "org/name", as the Hub spells dataset ids


def check_dataset_path(path: str) -> None:
    """Raise a one-line `UsageError` when `--dataset_name_or_path` is a local path (or glob) that matches nothing;
    a hub id is left to `load_finevision`."""
    if os.path.exists(path) or (_HUB_ID.match(path) and not path.startswith(".")):
        return
    if any(char in path for char in "*?[") and glob.glob(path):
        return
    raise UsageError(
        f"--dataset_name_or_path {path}: no such file or folder; pass a `save_to_disk` folder, a parquet/json file "
        "glob such as 'data/*.parquet', or a hub dataset id (org/name), or add --synthetic_dataset true to build the "
        "synthetic dataset there"
    )


def _load_split(data_args, split: str, streaming: bool | None = None):
    """`load_finevision` of one split; its every-config-failed error becomes one line naming the flags."""
    streaming = data_args.streaming if streaming is None else streaming
    configs = data_args.dataset_configs
    configs = "all" if configs == ["all"] else configs  # the command line gives a list; "all" alone means every one
    try:
        return load_finevision(data_args.dataset_name_or_path, configs, split=split, streaming=streaming)
    except ValueError as err:
        detail = " ".join(str(err).split())  # its per-config list, on one line
        raise UsageError(
            f"--dataset_name_or_path {data_args.dataset_name_or_path} (--dataset_configs {data_args.dataset_configs}, "
            f"split {split!r}): {detail}"
        ) from err


def check_single_split(data_args) -> None:
    """Raise a one-line `UsageError` when `--eval_split` / `--curriculum_split` is asked of a source that holds one
    split (data files, a `save_to_disk` Dataset): it is returned under any split name, so the run validated on its
    training rows (or read every row twice per epoch) without a word."""
    if not has_one_split(data_args.dataset_name_or_path, data_args.dataset_configs):
        return
    for flag in ("eval_split", "curriculum_split"):
        if getattr(data_args, flag):
            raise UsageError(
                f"--{flag} {getattr(data_args, flag)}: --dataset_name_or_path {data_args.dataset_name_or_path} holds "
                "one split (data files or a saved Dataset: all training rows); use --eval_split none with --val_size "
                "N to hold out N rows (and --curriculum_split none), or a DatasetDict folder or a folder whose file "
                "names give the splits (train-*.parquet, validation-*.parquet)"
            )


def load_rows(data_args, training_args):
    """(train rows, eval rows or None): loaded, held out and (streaming) shuffled, NOT yet split by process: the
    tokenizer is trained on the same rows in every process; `build_datasets` takes each process's share."""
    check_dataset_path(data_args.dataset_name_or_path)
    check_single_split(data_args)
    rows = _load_split(data_args, data_args.train_split)
    if data_args.eval_split:
        eval_rows = _load_split(data_args, data_args.eval_split)
        if data_args.val_size and not data_args.streaming and data_args.val_size < len(eval_rows):
            eval_rows = eval_rows.select(range(data_args.val_size))
    else:
        try:
            rows, eval_rows = split_train_val(rows, data_args.val_size, seed=training_args.seed)
        except ValueError as err:  # more held out than there are rows: one line, not a traceback
            raise UsageError(f"--val_size {data_args.val_size} (--dataset_name_or_path "
                             f"{data_args.dataset_name_or_path}): {err}") from err
    if data_args.streaming:
        rows = shuffle_dataset(rows, seed=training_args.seed, buffer_size=data_args.stream_shuffle_buffer_size)
    return rows, eval_rows


def iter_texts(rows, limit: int = 20000) -> Iterator[str]:
    """User and assistant texts of the first `limit` rows (to train a tokenizer), images never decoded."""
    source = rows.select_columns(["texts"]) if hasattr(rows, "select_columns") else rows
    for i, row in enumerate(source):
        if i >= limit:
            return
        for turn in row.get("texts") or []:
            if isinstance(turn, dict):
                yield from (t for t in (turn.get("user"), turn.get("assistant")) if isinstance(t, str))


def build_processor_for(config: NanoVLMConfig, tokenizer, model_args) -> NanoVLMProcessor:
    """A processor matching `config` with the image settings of `model_args` (whose `--max_grid` built the
    tokenizer)."""
    check_tiling(config, model_args)
    normalization = {
        key: value for key in ("image_mean", "image_std") if (value := getattr(model_args, key)) is not None
    }
    return NanoVLMProcessor.from_config(
        tokenizer, config, max_image_size=model_args.max_image_size, max_grid=model_args.max_grid,
        upscale=model_args.upscale_images, do_normalize=model_args.normalize_images, **normalization,
    )


def check_tiling(config: NanoVLMConfig, model_args) -> None:
    """Raise a one-line `UsageError` when `--tile_size` / `--max_image_size` / `--max_grid` do not fit the model's
    tile (its vision tower's input size): the parser checks them only against an explicit `--tile_size`."""
    tile, size, grid = config.tile_size, model_args.max_image_size, model_args.max_grid
    where = f"the vision tower takes {tile} px tiles (vision_config.image_size)"
    if model_args.tile_size not in (None, tile):  # the processor tiles at the tower's size: another would be ignored
        raise UsageError(f"--tile_size {model_args.tile_size}: {where}; drop --tile_size or set it to {tile}")
    if size < tile or size % tile:
        raise UsageError(
            f"--max_image_size {size}: must be a multiple of the tile size, as {where}; use "
            f"{max(tile, size // tile * tile)}"
        )
    if size // tile > grid:
        raise UsageError(
            f"--max_image_size {size}: {size // tile} tiles per side, over --max_grid {grid} ({where}); set "
            f"--max_image_size {grid * tile} or raise --max_grid"
        )


@contextlib.contextmanager
def _loading(what: str, fix: str) -> Iterator[None]:
    """Turn a failed load (missing or unreadable folder, unreachable hub id, corrupt weights) into one `UsageError`
    line naming the flag, instead of transformers' traceback after the data was loaded."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise UsageError(f"{what}: cannot load it ({type(err).__name__}: {first}); {fix}") from err


def build_model_and_processor(model_args, train_rows=None):
    """(model, processor) from a nanovlm checkpoint, from pretrained backbones, or randomly initialised."""
    kw = {"attn_implementation": model_args.attn_implementation}
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        if is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
            raise UsageError(f"--model_name_or_path {path}: no such folder; pass a folder saved by this trainer "
                             "(OUTPUT_DIR/final) or a hub id (org/name)")
        with _loading(f"--model_name_or_path {path}", "pass a folder saved by this trainer (OUTPUT_DIR/final) or a hub id"):
            # a local folder as an absolute path: it becomes the model's name_or_path, which a LoRA adapter records
            # as its base; a relative one failed to merge or evaluate from any other working directory
            source = os.path.abspath(os.path.expanduser(path)) if os.path.isdir(os.path.expanduser(path)) else path
            model = NanoVLMForConditionalGeneration.from_pretrained(source, **kw)
            processor = AutoProcessor.from_pretrained(source)
        if not isinstance(processor, NanoVLMProcessor):
            raise UsageError(f"--model_name_or_path {path}: holds a {type(processor).__name__}, not a NanoVLMProcessor")
        processor = apply_checkpoint_image_settings(source, processor, model_args)
        model.config.max_grid = processor.image_processor.max_grid  # checkpoints saved before the field say 8
        record_normalization(model.config, processor)
        return model, processor

    if model_args.tokenizer_train_vocab_size:
        if train_rows is None:
            raise ValueError("--tokenizer_train_vocab_size needs the training data to train the tokenizer on.")
        tokenizer = train_tokenizer(
            iter_texts(train_rows), vocab_size=model_args.tokenizer_train_vocab_size, max_grid=model_args.max_grid
        )
    else:
        tokenizer = extend_tokenizer(model_args.tokenizer_name_or_path or model_args.text_model, max_grid=model_args.max_grid)

    if model_args.random_init:
        cfg = dict(model_args.model_config or {})
        if model_args.vision_sincos_position_scale is not None:  # applied by the model's `_init_weights`
            cfg["vision_sincos_position_scale"] = model_args.vision_sincos_position_scale
        text = dict(cfg.pop("text_config", {}) or {})
        text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        config = NanoVLMConfig(
            text_config=text,
            pixel_shuffle_factor=cfg.pop("pixel_shuffle_factor", model_args.pixel_shuffle_factor),
            image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            **cfg,
        )
        model = NanoVLMForConditionalGeneration._from_config(config, **kw)
        model.resize_for_tokenizer(tokenizer)
    else:
        with _loading(f"--vision_model {model_args.vision_model} / --text_model {model_args.text_model}",
                      "pass local folders or hub ids (the hub needs network access)"):
            model = NanoVLMForConditionalGeneration.from_backbones(
                model_args.vision_model, model_args.text_model, tokenizer=tokenizer,
                pixel_shuffle_factor=model_args.pixel_shuffle_factor, **kw,
            )
    model.config.max_grid = model_args.max_grid  # the grid the tokenizer was built for
    processor = build_processor_for(model.config, tokenizer, model_args)
    record_normalization(model.config, processor)
    return model, processor


def apply_checkpoint_image_settings(path: str, processor: NanoVLMProcessor, model_args) -> NanoVLMProcessor:
    """The checkpoint's processor with the image flags given on the command line applied, as transformers'
    `AutoProcessor.from_pretrained(path, max_image_size=N)` overrides a saved setting (before, the flags were
    silently ignored): `--max_image_size`, `--upscale_images` and a `--max_grid` up to the checkpoint's. What cannot
    change is a one-line `UsageError` naming the flag: `--tile_size` (the tower's input), a larger `--max_grid` (the
    tokenizer's tile tokens) and `--normalize_images` (the pixels the model was trained on). Writes the processor's
    tiling back into `model_args`, so the run settings checked on resume record what the data is built with rather
    than the flags' defaults."""
    image_processor = processor.image_processor
    tile, grid = image_processor.tile_size, image_processor.max_grid
    where = f"with --model_name_or_path {path}"
    if model_args.tile_size not in (None, tile):  # the tower's input size: no processor setting can change it
        raise UsageError(f"--tile_size {model_args.tile_size} {where}: its vision tower takes {tile} px tiles; drop "
                         "--tile_size")
    if model_args.normalize_images not in (None, image_processor.do_normalize):
        raise UsageError(f"--normalize_images {str(model_args.normalize_images).lower()} {where}: its model was "
                         f"trained on {'normalized' if image_processor.do_normalize else 'raw'} pixels; drop "
                         "--normalize_images")
    if model_args.max_grid is not None and model_args.max_grid > grid:
        raise UsageError(f"--max_grid {model_args.max_grid} {where}: its tokenizer has tile tokens for up to {grid} "
                         f"tiles per side; use at most {grid}")
    given = {"max_image_size": model_args.max_image_size, "max_grid": model_args.max_grid,
             "upscale": model_args.upscale_images}
    changes = {k: v for k, v in given.items() if v is not None and v != getattr(image_processor, k)}
    if changes:
        size, new_grid = changes.get("max_image_size", image_processor.max_image_size), changes.get("max_grid", grid)
        if size < tile or size % tile:
            raise UsageError(f"--max_image_size {size} {where}: must be a multiple of its {tile} px tiles; use "
                             f"{max(tile, size // tile * tile)}")
        if size // tile > new_grid:  # the tokenizer has <row_i_col_j> tokens up to the checkpoint's grid only
            if model_args.max_image_size is None:  # the checkpoint's size with a smaller --max_grid
                raise UsageError(f"--max_grid {new_grid} {where}: its max_image_size {size} makes {size // tile} "
                                 f"tiles per side; add --max_image_size {new_grid * tile}")
            over = f"--max_grid {new_grid}" if "max_grid" in changes else f"the checkpoint's max_grid {grid}"
            raise UsageError(f"--max_image_size {size} {where} (its {tile} px tiles): {size // tile} tiles per "
                             f"side, over {over}; use at most {new_grid * tile}")
        logger.info("Replacing the checkpoint processor's %s", ", ".join(
            f"{k} {getattr(image_processor, k)} -> {v}" for k, v in changes.items()))
        processor = AutoProcessor.from_pretrained(path, **changes)
        image_processor = processor.image_processor
    model_args.tile_size, model_args.max_grid = image_processor.tile_size, image_processor.max_grid
    model_args.max_image_size, model_args.upscale_images = image_processor.max_image_size, image_processor.upscale
    model_args.normalize_images = image_processor.do_normalize
    return processor


def record_normalization(config: NanoVLMConfig, processor: NanoVLMProcessor) -> None:
    """Write the processor's pixel normalisation into the model config: training tiles stay uint8 until the device,
    where the model normalises them with these values (mean 0 / std 1 when the processor does not normalise)."""
    image_processor = processor.image_processor
    if image_processor.do_normalize:
        config.image_mean, config.image_std = list(image_processor.image_mean), list(image_processor.image_std)
    else:
        config.image_mean, config.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def warn_stream_read_factor(num_shards: int, world_size: int, num_workers: int) -> int:
    """Warn once when a training stream has too few shards for its ranks x workers; returns the read factor."""
    factor = stream_read_factor(num_shards, world_size, num_workers)
    if factor > 1:
        readers = world_size * max(1, num_workers)
        logger.warning(
            "The training stream has %d shard(s) for %d rank(s) x %d DataLoader worker(s): whole shards cannot go "
            "to every reader, so readers read shared shards and keep every k-th row; each row is read %dx from "
            "storage (not decoded). For one read per row give it a multiple of %d shards (more data files, "
            "`dataset.reshard()`, or fewer --dataloader_num_workers).",
            num_shards, world_size, max(1, num_workers), factor, readers,
        )
    return factor


def smallest_image_sample_length(processor: NanoVLMProcessor) -> int:
    """Tokens of the shortest sample that has an image: one single-tile image, a one-letter question and a one-letter
    answer in the chat template. Built by the real SampleBuilder, so it follows the template and the image blocks."""
    from PIL import Image

    builder = SampleBuilder(processor, max_sample_length=None, max_images_per_example=None)
    side = processor.image_processor.tile_size
    row = {"images": [Image.new("RGB", (side, side))], "texts": [{"user": "a", "assistant": "a"}]}
    sample, reason = builder.build(row)
    if sample is None:  # cannot happen with a working processor; say so rather than validate nothing
        raise RuntimeError(f"could not build the smallest image sample: {reason}")
    return int(sample["input_ids"].numel())


def check_sample_fits(data_args, processor: NanoVLMProcessor) -> None:
    """Raise a one-line `UsageError` when the smallest sample with an image exceeds `--max_sample_length` or
    `--seq_length`: every image sample would be skipped as too long and the loader would find nothing to pack."""
    need = smallest_image_sample_length(processor)
    short = [f"--{name} {getattr(data_args, name)}" for name in ("seq_length", "max_sample_length")
             if getattr(data_args, name) < need]
    if short:
        raise UsageError(
            f"{' and '.join(short)}: below the smallest sample with an image, {need} tokens ({processor.image_seq_len} "
            f"image tokens per tile plus the chat template); set --seq_length and --max_sample_length to at least "
            f"{need}"
        )


def build_datasets(data_args, training_args, processor, train_rows, eval_rows, model_config=None):
    """(train PackedDataset, eval PackedDataset or None, collator) over this process's share of the rows.
    `model_config` prices packs for `--balance_batches` (training packs only; evaluation order does not matter).
    Raises `UsageError` when no sample with an image fits `--seq_length` / `--max_sample_length`."""
    check_sample_fits(data_args, processor)

    def source(rows, seed, first=0):
        # a builder (and so a skip counter) per dataset: with a shared one, the rows evaluation skipped were counted
        # in the training's data/skipped_* when there are no DataLoader workers (and not with workers)
        builder = SampleBuilder(
            processor,
            thresholds=RatingThresholds(**{name: getattr(data_args, f"min_{name}_rating") for name in RATING_COLUMNS}),
            max_sample_length=data_args.max_sample_length,
            max_images_per_example=data_args.max_images_per_example,
            max_image_pixels=data_args.max_image_pixels,
        )
        if data_args.streaming:
            return SampleStream(rows, builder)
        return SampleDataset(rows, builder, seed=seed, first=first)

    balance = {}
    if data_args.balance_batches:
        if model_config is None:
            raise UsageError("--balance_batches true needs the model config to price packs: pass model_config")
        balance = {"pack_cost": functools.partial(pack_flops, model_config),
                   "balance_group": training_args.per_device_train_batch_size}

    def packed(rows, infinite, seed, first=0, **kwargs):
        return PackedDataset(
            source(rows, seed, first), seq_length=data_args.seq_length,
            max_images_per_pack=data_args.max_images_per_knapsack, buffer_size=data_args.pack_buffer_size,
            seed=training_args.seed, infinite=infinite, **kwargs,
        )

    rank, world = training_args.process_index, training_args.world_size
    if data_args.streaming and rank == 0:
        warn_stream_read_factor(train_rows.num_shards, world, training_args.dataloader_num_workers)
    train_rows = shard_for_rank(train_rows, rank, world)
    first = 0
    if data_args.curriculum_split:
        # Each rank gets its share of both splits, so every rank starts with curriculum rows.
        curriculum = shard_for_rank(_load_split(data_args, data_args.curriculum_split, streaming=False), rank, world)
        train_rows, first = datasets.concatenate_datasets([curriculum, train_rows]), len(curriculum)
        share = f" (this process's share, 1 of {world})" if world > 1 else ""
        logger.info("Curriculum: the first epoch reads %d %s rows before the %d %s rows%s", first,
                    data_args.curriculum_split, len(train_rows) - first, data_args.train_split, share)
    train = packed(train_rows, infinite=True, seed=training_args.seed, first=first, **balance)
    evaluation = None
    if eval_rows is not None:
        evaluation = packed(shard_for_rank(eval_rows, rank, world), infinite=False, seed=None)
    collator = PackedCollator(processor.tokenizer.pad_token_id, pad_to_multiple_of=data_args.pad_to_multiple_of)
    return train, evaluation, collator


# Flags that fix which rows a checkpoint's data position points at and how they were tokenized and packed: a resume
# that changes one of them would continue from a position in different data (see NanoVLMTrainer.run_settings).
DATA_POSITION_FLAGS = {
    "data": (
        "dataset_name_or_path", "dataset_configs", "train_split", "curriculum_split", "streaming", "val_size",
        "eval_split", "max_sample_length", "max_images_per_example", "max_images_per_knapsack", "seq_length",
        "pack_buffer_size", "max_image_pixels", "balance_batches", *RATING_FIELDS,
    ),
    "model": ("tile_size", "max_image_size", "max_grid", "upscale_images"),  # tokens per image
    "training": ("seed", "dataloader_num_workers"),  # the shuffle; the pack state is kept per DataLoader worker
}


def data_position_settings(model_args, data_args, training_args) -> dict:
    """{flag: value} of the settings that define the data position and the packing (DATA_POSITION_FLAGS); the
    trainer saves them with every checkpoint and compares them on resume."""
    sources = {"data": data_args, "model": model_args, "training": training_args}
    settings = {name: getattr(sources[kind], name) for kind, names in DATA_POSITION_FLAGS.items() for name in names}
    if data_args.balance_batches:
        # --balance_batches cuts and orders each round's packs in batches of this size: a saved position (packs done
        # in the round) points at other packs under another batch size (a resume lost 3 of 40 rows of an epoch)
        settings["per_device_train_batch_size"] = training_args.per_device_train_batch_size
    return settings


def check_fsdp_device(training_args) -> None:
    """FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, or `--fsdp`) needs an accelerator:
    Accelerate shards only on GPUs (its CPU mode has no FSDP) and would otherwise train with DDP, every process
    holding the whole model, without a word. Raises a one-line `UsageError` instead."""
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    if wants_fsdp and (training_args.use_cpu or not torch.accelerator.is_available()):
        raise UsageError(
            "FSDP (configs/accelerate/fsdp.yaml or --fsdp) needs GPUs: this run is on CPU, where Accelerate has no "
            "FSDP and would silently train with DDP; on CPU launch with configs/accelerate/cpu_2proc.yaml (DDP), or "
            "run FSDP on a machine with GPUs"
        )


def check_attention_device(model_args, training_args) -> None:
    """`--attn_implementation torch_varlen` runs a CUDA-only kernel: a one-line `UsageError` on a CPU run, before
    any data or model is built, instead of an error at the first packed forward."""
    if model_args.attn_implementation == "torch_varlen" and (
        training_args.use_cpu or not torch.cuda.is_available()
    ):
        raise UsageError(
            "--attn_implementation torch_varlen runs PyTorch's flash-attention varlen kernel, which needs a CUDA GPU; "
            "this run is on CPU: use --attn_implementation sdpa (packed samples stay isolated)"
        )


def configure_reporting(model_args, data_args, training_args) -> None:
    """nanoVLM-style run name unless one is given; wandb in offline mode (files under the output dir) when no API
    key is configured, so a run without network never blocks on a login prompt."""
    from .arguments import run_name

    if not training_args.run_name or training_args.run_name == training_args.output_dir:
        training_args.run_name = run_name(model_args, data_args, training_args)
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_DIR", training_args.output_dir)
        os.makedirs(training_args.output_dir, exist_ok=True)
        has_key = os.environ.get("WANDB_API_KEY") or os.path.isfile(os.path.expanduser("~/.netrc"))
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            logger.info("No wandb API key: logging offline to %s/wandb (sync later with `wandb sync`).",
                        training_args.output_dir)


__all__ = ["check_attention_device", "check_fsdp_device", "data_position_settings", "check_sample_fits", "smallest_image_sample_length", "configure_reporting", "prepare_synthetic_dataset", "load_rows", "build_model_and_processor", "build_datasets", "build_processor_for", "iter_texts"]
