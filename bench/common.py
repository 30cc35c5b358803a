"""Shared pieces of the bench scripts: model shapes, a FineVision-like random sample source, FLOPs, machine info.

Shapes (what `--shape` picks in `train_throughput.py` and `generation.py`):

- `tiny`: the test suite's ~0.2M-parameter model (32 px tiles, 8 px patches, pixel shuffle 2 -> 4 image tokens per
  tile), images of up to 2x2 tiles plus a global view, packs of 256 tokens.
- `demo`: `configs/train/demo.yaml` as the demo runs it (its `model_config`, tokenizer size, image, packing and
  batch settings are read from the YAML through the package's own parser, so they cannot drift apart).
- `460m`: `NanoVLMConfig()` defaults (SigLIP2-B/16-512 + SmolLM2-360M shapes) with SmolLM2's vocabulary plus the 66
  image/tile tokens (49152 + 66), random weights, nothing downloaded; settings of `configs/train/nanovlm_460m.yaml`
  (512 px tiles, up to 4x4 tiles + a global view, 4096-token packs with at most 18 images, batch 2, 4 workers).

Every shape gets a byte-level BPE tokenizer trained locally (`nanovlm.train_tokenizer`) on synthetic-dataset texts,
with the shape's tile tokens, so prompts and samples are built by the real processor. For `460m` the tokenizer is
smaller than the model's 49218-row vocabulary; the unused rows cost what they cost in the real model.

Two sample sources for training:

- `synthetic`: rows of the embedded synthetic visual-QA dataset (PNG images, multi-turn texts) through the real
  `SampleBuilder` (decode, tile, chat template, labels): exactly what the demo trains on.
- `random`: FineVision-like samples with the length distribution of `bench/packing.py` (0-4 images per sample, tile
  grids of 1x1 to 4x4, log-normal text lengths with median 150 tokens), random text ids and random pixel tiles,
  built lazily per index (in the DataLoader workers) with the processor's exact image-token strings.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanovlm import devices
from nanovlm.data.samples import IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "train" / "demo.yaml"
SHAPES = ("tiny", "demo", "460m")

# The `tiny` model: the same sizes as tests/conftest.py's `make_tiny_config`.
TINY_MODEL_CONFIG = {
    "pixel_shuffle_factor": 2,
    "vision_config": {
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
}
SMOLLM2_VOCAB = 49152
NANOVLM_EXTRA_TOKENS = 66  # <|image|>, <|global_image|> and the 8x8 <row_i_col_j> tile tokens


def setup_environment() -> None:
    """No network: the benches never download anything (environment defaults only, nothing global changed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_logging() -> None:
    """Library warnings and progress bars off: for command-line runs only (it changes process-wide settings)."""
    import datasets
    import transformers

    logging.getLogger("nanovlm").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with `threads` torch intra-op threads (None: unchanged), restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass
class ShapeSpec:
    """Everything a bench needs to know about one shape (see the module docstring)."""

    name: str
    model_config: dict[str, Any]  # NanoVLMConfig kwargs without the tokenizer-dependent ids
    tokenizer_vocab_size: int  # BPE tokens of the locally trained tokenizer
    text_vocab_size: int | None  # the model's vocabulary; None = the tokenizer's length
    max_image_size: int
    max_grid: int  # tile tokens the tokenizer has (<row_i_col_j> up to max_grid x max_grid)
    synthetic_image_size: int
    seq_length: int
    max_sample_length: int
    max_images_per_example: int
    max_images_per_pack: int
    pack_buffer_size: int
    batch_size: int
    num_workers: int
    lrs: tuple[float, float, float]  # projector, vision, language
    default_data: str


def get_shape(name: str) -> ShapeSpec:
    """The ShapeSpec of `name`; unknown names fail listing the choices."""
    if name == "tiny":
        return ShapeSpec(
            name="tiny", model_config=TINY_MODEL_CONFIG, tokenizer_vocab_size=300, text_vocab_size=None,
            max_image_size=64, max_grid=2, synthetic_image_size=64, seq_length=256, max_sample_length=256,
            max_images_per_example=3, max_images_per_pack=12, pack_buffer_size=64, batch_size=4, num_workers=1,
            lrs=(1e-3, 5e-4, 5e-4), default_data="synthetic",
        )
    if name == "demo":
        return _demo_shape()
    if name == "460m":
        from nanovlm.configuration_nanovlm import SIGLIP2_B16_512, SMOLLM2_360M

        return ShapeSpec(
            name="460m",
            model_config={"vision_config": dict(SIGLIP2_B16_512), "text_config": dict(SMOLLM2_360M),
                          "pixel_shuffle_factor": 4},
            tokenizer_vocab_size=1024, text_vocab_size=SMOLLM2_VOCAB + NANOVLM_EXTRA_TOKENS,
            max_image_size=2048, max_grid=8, synthetic_image_size=64, seq_length=4096, max_sample_length=4096,
            max_images_per_example=4, max_images_per_pack=18, pack_buffer_size=512, batch_size=2, num_workers=4,
            lrs=(0.00512, 5e-5, 5e-5), default_data="random",
        )
    raise ValueError(f"shape {name!r} is not supported; choose one of {list(SHAPES)}.")


def _demo_shape() -> ShapeSpec:
    """The demo's settings, read from configs/train/demo.yaml by the package's parser."""
    from nanovlm.training.parser import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        model_args, data_args, training_args = parse_args(["--config", str(DEMO_CONFIG), "--output_dir", tmp])
    return ShapeSpec(
        name="demo", model_config=dict(model_args.model_config), tokenizer_vocab_size=model_args.tokenizer_train_vocab_size,
        text_vocab_size=None, max_image_size=model_args.max_image_size, max_grid=model_args.max_grid,
        synthetic_image_size=data_args.synthetic_image_size, seq_length=data_args.seq_length,
        max_sample_length=data_args.max_sample_length, max_images_per_example=data_args.max_images_per_example,
        max_images_per_pack=data_args.max_images_per_knapsack, pack_buffer_size=data_args.pack_buffer_size,
        batch_size=training_args.per_device_train_batch_size, num_workers=training_args.dataloader_num_workers,
        lrs=(training_args.lr_mp, training_args.lr_vision_backbone, training_args.lr_language_backbone),
        default_data="synthetic",
    )


def synthetic_rows(spec: ShapeSpec, n: int, seed: int = 0):
    """n rows of the embedded synthetic dataset (a `datasets.Dataset`, images as PNG bytes) at the shape's size."""
    from nanovlm.data.synthetic import SyntheticConfig, generate_split

    return generate_split(n, "train", seed=seed, config=SyntheticConfig(image_size=spec.synthetic_image_size))


def build_tokenizer(spec: ShapeSpec, rows=None):
    """A byte-level BPE tokenizer trained locally on synthetic texts, with the shape's tile tokens."""
    from nanovlm import train_tokenizer
    from nanovlm.training.build import iter_texts

    rows = rows if rows is not None else synthetic_rows(spec, 500, seed=12345)
    return train_tokenizer(iter_texts(rows), vocab_size=spec.tokenizer_vocab_size, max_grid=spec.max_grid)


def build_config(spec: ShapeSpec, tokenizer):
    """The NanoVLMConfig of the shape, with the tokenizer's image token and special ids."""
    from nanovlm import NanoVLMConfig

    cfg = json.loads(json.dumps(spec.model_config))  # deep copy
    text = dict(cfg.pop("text_config", {}) or {})
    text.update(
        vocab_size=spec.text_vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return NanoVLMConfig(
        text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        max_grid=spec.max_grid, **cfg,
    )


def build_model(spec: ShapeSpec, tokenizer, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised NanoVLM of the shape (fp32, on CPU), generation ids set from the tokenizer."""
    from nanovlm import NanoVLMForConditionalGeneration

    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = NanoVLMForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_processor_for_shape(spec: ShapeSpec, tokenizer, config):
    """The processor the shape trains with (tile size, max image size, grid)."""
    from nanovlm import NanoVLMProcessor

    return NanoVLMProcessor.from_config(tokenizer, config, max_image_size=spec.max_image_size)


def parameter_counts(model) -> dict[str, int]:
    """Parameters per part (tied weights counted once)."""
    inner = model.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "vision": count(inner.vision_tower),
        "projector": count(inner.multi_modal_projector),
        "language": count(inner.language_model),
    }


def image_token_ids(tokenizer) -> list[int]:
    """Ids of <|image|>, <|global_image|> and every tile token: never generated by a VLM."""
    tokens = [tokenizer.image_token, tokenizer.global_image_token]
    tokens += [t for t in tokenizer.get_added_vocab() if t.startswith("<row_") and t.endswith(">")]
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in tokens)


# ----------------------------------------------------------------------------------------------------------------
# FineVision-like random samples


def draw_image_grids(rng: np.random.Generator, max_side: int) -> list[tuple[int, int]]:
    """Tile grids of one sample's images, with bench/packing.py's FineVision-like distribution."""
    n_images = int(rng.choice(5, p=[0.10, 0.75, 0.08, 0.04, 0.03]))
    grid = np.minimum(max_side, rng.choice([1, 2, 3, 4], size=(n_images, 2), p=[0.35, 0.30, 0.20, 0.15]))
    return [(int(r), int(c)) for r, c in grid]


class RandomSamples:
    """Map-style source of FineVision-like processed samples: random text ids, random pixel tiles.

    Sample i is drawn from its own seeded generator, so it is the same in every worker and on every epoch. Its ids
    are `<|im_start|>user\\n` + the processor's image strings + question ids + `<|im_end|>\\n<|im_start|>assistant\\n`
    + answer ids + `<|im_end|>`; labels cover the answer and its `<|im_end|>`. Pixels are copies of tiles from a
    fixed pool of random tiles (a copy costs what the image processor's output costs to move; decoding and resizing
    are measured by bench/preprocess.py). Samples longer than `max_sample_length` tokens or with more than
    `max_images` images are None (skipped, as `SampleBuilder` skips them).
    """

    def __init__(
        self, processor, n: int, max_sample_length: int, max_images: int | None = None, seed: int = 0,
        pool_tiles: int = 8,
    ) -> None:
        tokenizer = processor.tokenizer
        self.n, self.max_sample_length, self.max_images, self.seed = n, max_sample_length, max_images, seed
        ip = processor.image_processor
        self.max_side = max(1, ip.max_image_size // ip.tile_size)
        specials = set(tokenizer.all_special_ids) | set(image_token_ids(tokenizer))
        self.text_ids = np.array([i for i in range(len(tokenizer)) if i not in specials], dtype=np.int64)
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.user_prefix = enc("<|im_start|>user\n")
        self.assistant_prefix = enc("<|im_end|>\n<|im_start|>assistant\n")
        self.end = enc("<|im_end|>")
        self._image_ids: dict[tuple[int, int, int | None], list[int]] = {}
        self.processor = processor
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pool_tiles, 3, ip.tile_size, ip.tile_size, generator=gen)  # (P, 3, S, S)

    def __len__(self) -> int:
        return self.n

    def _image(self, grid: tuple[int, int], index: int | None) -> list[int]:
        key = (*grid, index)
        if key not in self._image_ids:
            text = self.processor.image_string(grid, index)
            self._image_ids[key] = self.processor.tokenizer.encode(text, add_special_tokens=False)
        return self._image_ids[key]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rng = np.random.default_rng([self.seed, i])
        grids = draw_image_grids(rng, self.max_side)
        text = max(8, int(rng.lognormal(math.log(150), 1.1)))
        answer = max(1, int(0.3 * text))
        images: list[int] = []
        for k, grid in enumerate(grids):
            images += self._image(grid, k if len(grids) > 1 else None)
        words = self.text_ids[rng.integers(0, len(self.text_ids), size=text)].tolist()
        prompt = self.user_prefix + images + words[answer:] + self.assistant_prefix
        reply = words[:answer] + self.end
        if len(prompt) + len(reply) > self.max_sample_length:
            return None
        if self.max_images is not None and len(grids) > self.max_images:
            return None
        input_ids = torch.tensor(prompt + reply, dtype=torch.long)  # (T,)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(prompt) :] = input_ids[len(prompt) :]
        tiles = sum(r * c + (1 if r * c > 1 else 0) for r, c in grids)
        pixel_values = None
        if tiles:
            pixel_values = self.pool[torch.from_numpy(rng.integers(0, len(self.pool), size=tiles))]  # (n, 3, S, S)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "n_images": len(grids)}


# ----------------------------------------------------------------------------------------------------------------
# Test images


def photo_like_image(width: int, height: int, seed: int = 0):
    """A smooth colour gradient with noise: photo-like content (JPEG-friendly, not flat) of the given size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 37.0)], axis=-1)
    rgb = rgb * 200 + rng.normal(0, 12, size=rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def document_like_image(width: int, height: int, seed: int = 0, screenshot: bool = False):
    """Dark text lines on white (a scanned page), or with coloured panels (a screenshot)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if screenshot:
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
            color = tuple(int(c) for c in rng.integers(40, 240, size=3))
            draw.rectangle([x0, y0, x0 + width // 4, y0 + height // 5], fill=color)
    words = ["the", "model", "vision", "token", "packing", "image", "tile", "report", "table", "2048", "loss"]
    line_height = max(12, height // 80)
    for top in range(line_height, height - line_height, line_height + line_height // 2):
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), size=max(1, width // 60)))
        draw.text((line_height, top), text, fill=(20, 20, 20))
    return image


# ----------------------------------------------------------------------------------------------------------------
# Machine, memory, output


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions, torch threads and the load average now."""
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": ram_bytes(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if device is not None:
        info["device"] = str(device)
    return info


def max_rss_bytes(children: bool = False) -> int:
    """Peak resident set size of this process (or of its largest finished child), in bytes (Linux: KiB * 1024)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


def resolve_device(name: str | None) -> torch.device:
    """`--device`: None/"auto" picks cuda when available; a cuda request without a GPU fails naming the fix."""
    try:
        return devices.resolve_device(name)
    except ValueError as error:
        raise SystemExit(f"--device {name}: {error}") from None


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A text table: `columns` are (key, header, format spec); missing values print as '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else (format(value, spec) if spec else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path | str, report: dict[str, Any]) -> Path:
    """Write `report` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def args_dict(args) -> dict[str, Any]:
    """argparse Namespace -> JSON-friendly dict."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


__all__ = [
    "SHAPES",
    "RandomSamples",
    "ShapeSpec",
    "args_dict",
    "build_config",
    "build_model",
    "build_processor_for_shape",
    "build_tokenizer",
    "document_like_image",
    "draw_image_grids",
    "format_table",
    "get_shape",
    "image_token_ids",
    "machine_info",
    "max_rss_bytes",
    "parameter_counts",
    "photo_like_image",
    "quiet_logging",
    "resolve_device",
    "setup_environment",
    "synthetic_rows",
    "torch_threads",
    "write_json",
]
