"""Preprocessing speed: images/s through the NanoVLM image processor, samples/s through the full sample builder.

Image processor (`NanoVLMImageProcessor`: RGB, aspect-preserving resize to whole tiles, tiles + a global view,
normalisation) on typical sizes: photos (640x480, 1024x768), a document page (1700x2200) and a screenshot
(1920x1080), under two settings:

- `460m`: 512 px tiles, long side up to 2048 px (up to 4x4 tiles + a global view), as configs/train/nanovlm_460m.yaml;
- `demo`: 64 px tiles, long side 64 px (one tile), as configs/train/demo.yaml.

Two figures per size: `process` (a decoded PIL image in, tiles out) and `decode+process` (JPEG bytes for photos,
PNG for documents and screenshots, through `load_image`, as the sample builder reads dataset rows).

Full sample pipeline (`SampleBuilder.build`: decode, tile, chat template with the image token strings, tokenize,
assistant-only labels) on FineVision-like rows: one image per row drawn from the sizes above (equal shares), 1-3
question/answer turns; and, for the demo setting, the embedded synthetic dataset's own rows (64 px PNGs). The
tokenizer is a byte-level BPE trained locally (`nanovlm.train_tokenizer`); nothing is downloaded.

By default torch runs one thread (`--threads 1`): DataLoader workers do (torch sets one thread per worker), so
this is the rate of one worker; multiply by `--num_workers` for a loader's ceiling. Each figure is the median rate
over calls repeated for at least `--min_time` seconds.

    python bench/preprocess.py --out bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    args_dict,
    build_config,
    build_processor_for_shape,
    document_like_image,
    format_table,
    get_shape,
    machine_info,
    photo_like_image,
    quiet_logging,
    setup_environment,
    synthetic_rows,
    torch_threads,
    write_json,
)

from nanovlm import train_tokenizer
from nanovlm.data import SampleBuilder
from nanovlm.image_processing_nanovlm import load_image
from nanovlm.training.build import iter_texts

DEFAULT_SIZES = ["photo=640x480", "photo=1024x768", "document=1700x2200", "screenshot=1920x1080"]
SETTINGS = ("460m", "demo")
WORDS = (
    "what is shown in the image describe the chart table value year total left right top bottom color red blue "
    "green how many people are there read the text on the sign answer with a single word the document says that"
).split()


def parse_size(text: str) -> tuple[str, int, int]:
    """"kind=WIDTHxHEIGHT" (kind: photo, document, screenshot) -> (kind, width, height)."""
    try:
        kind, size = text.split("=")
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND=WIDTHxHEIGHT such as photo=640x480, got {text!r}") from None
    if kind not in ("photo", "document", "screenshot"):
        raise argparse.ArgumentTypeError(f"kind must be photo, document or screenshot, got {kind!r}")
    return kind, width, height


def make_image(kind: str, width: int, height: int, seed: int = 0):
    if kind == "photo":
        return photo_like_image(width, height, seed)
    return document_like_image(width, height, seed, screenshot=kind == "screenshot")


def encode(image, kind: str) -> bytes:
    """JPEG (quality 90) for photos, PNG otherwise: how such images are usually stored."""
    buffer = io.BytesIO()
    if kind == "photo":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def rate(fn: Callable[[], Any], min_time: float, min_calls: int = 3) -> float:
    """Median calls/s of `fn` over at least `min_calls` calls and `min_time` seconds (after one warm-up call)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def build_tokenizer_and_processor(setting: str, seed: int = 0):
    """A locally trained tokenizer with the setting's tile tokens, and the setting's processor."""
    spec = get_shape(setting)
    corpus = list(iter_texts(synthetic_rows(spec, 300, seed=seed))) + [" ".join(WORDS)] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=max(spec.tokenizer_vocab_size, 512), max_grid=spec.max_grid)
    config = build_config(spec, tokenizer)
    return spec, tokenizer, build_processor_for_shape(spec, tokenizer, config)


def bench_images(processor, sizes, min_time: float, seed: int) -> list[dict[str, Any]]:
    """images/s of the image processor alone and with decoding, per size."""
    image_processor = processor.image_processor
    rows = []
    for kind, width, height in sizes:
        image = make_image(kind, width, height, seed)
        data = encode(image, kind)
        out = image_processor(image)
        tiles = int(out["pixel_values"].shape[0])
        grid = tuple(int(x) for x in out["image_grids"][0])
        rows.append({
            "kind": kind, "size": f"{width}x{height}", "grid": f"{grid[0]}x{grid[1]}", "tiles": tiles,
            "image_tokens": tiles * (processor.image_seq_len + 1),
            "pixel_mib": out["pixel_values"].numel() * 4 / 2**20, "encoded_kib": len(data) / 1024,
            "process_images_per_s": rate(lambda image=image: image_processor(image), min_time),
            "decode_process_images_per_s": rate(lambda data=data: image_processor(load_image(data)), min_time),
        })
    return rows


def finevision_like_rows(sizes, n: int, seed: int) -> list[dict[str, Any]]:
    """n FineVision-schema rows: one encoded image each (sizes in turn), 1-3 turns of random words."""
    rng = np.random.default_rng(seed)
    encoded = [encode(make_image(kind, w, h, seed), kind) for kind, w, h in sizes]
    rows = []
    for i in range(n):
        turns = int(rng.integers(1, 4))
        texts = []
        for _ in range(turns):
            question = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) + "?"
            answer = " ".join(rng.choice(WORDS, size=max(1, int(rng.lognormal(np.log(20), 1.0)))))
            texts.append({"user": question, "assistant": answer})
        rows.append({
            "images": [{"bytes": encoded[i % len(encoded)], "path": None}], "texts": texts,
            "relevance_ratings": [5] * turns, "image_correspondence_ratings": [5] * turns,
            "visual_dependency_ratings": [5] * turns, "formatting_ratings": [5] * turns,
        })
    return rows


def bench_samples(spec, processor, rows, name: str, min_time: float) -> dict[str, Any]:
    """samples/s of SampleBuilder.build over `rows` (cycled), with tokens and tiles per sample."""
    builder = SampleBuilder(
        processor, max_sample_length=spec.max_sample_length, max_images_per_example=spec.max_images_per_example
    )
    samples = [builder.build(row)[0] for row in rows]
    built = [s for s in samples if s is not None]
    position = iter(range(10**12))

    def one():
        builder.build(rows[next(position) % len(rows)])

    per_s = rate(one, min_time, min_calls=len(rows))
    tokens = sum(len(s["input_ids"]) for s in built)
    tiles = sum(0 if s["pixel_values"] is None else int(s["pixel_values"].shape[0]) for s in built)
    return {
        "rows": name, "setting": spec.name, "samples_per_s": per_s,
        "tokens_per_sample": tokens / max(len(built), 1), "tiles_per_sample": tiles / max(len(built), 1),
        "tokens_per_s": per_s * tokens / max(len(built), 1), "skipped": len(samples) - len(built),
    }


IMAGE_COLUMNS = [
    ("setting", "setting", ""), ("kind", "kind", ""), ("size", "size", ""), ("grid", "grid", ""),
    ("tiles", "tiles", "d"), ("image_tokens", "img tokens", "d"), ("pixel_mib", "pixels MiB", ".1f"),
    ("process_images_per_s", "process img/s", ".1f"), ("decode_process_images_per_s", "decode+process img/s", ".1f"),
]
SAMPLE_COLUMNS = [
    ("setting", "setting", ""), ("rows", "rows", ""), ("samples_per_s", "samples/s", ".1f"),
    ("tokens_per_sample", "tokens/sample", ".0f"), ("tiles_per_sample", "tiles/sample", ".1f"),
    ("tokens_per_s", "tokens/s", ".0f"), ("skipped", "skipped", "d"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="image settings: 460m (512 px tiles, max side 2048) and/or demo (64 px, one tile)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in DEFAULT_SIZES],
                        help="images as KIND=WIDTHxHEIGHT (kind: photo, document, screenshot)")
    parser.add_argument("--rows", type=int, default=32, help="rows for the sample-pipeline figure (cycled)")
    parser.add_argument("--min_time", type=float, default=2.0, help="seconds of repeated calls per figure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DataLoader worker)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/preprocess.json"), help="JSON path")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_environment()
    images, samples = [], []
    with torch_threads(args.threads):
        machine = machine_info("cpu")
        print(f"machine: {machine['cpu']} ({machine['cpus_usable']} usable cores), torch threads "
              f"{machine['torch_threads']}; load {machine['load_average']}")
        for setting in args.settings:
            spec, _, processor = build_tokenizer_and_processor(setting, args.seed)
            images += [{"setting": setting, **r} for r in bench_images(processor, args.sizes, args.min_time, args.seed)]
            rows = finevision_like_rows(args.sizes, args.rows, args.seed)
            samples.append(bench_samples(spec, processor, rows, "finevision-like", args.min_time))
            if setting == "demo":
                synthetic = synthetic_rows(spec, args.rows, seed=args.seed).with_format("arrow")[:].to_pylist()
                samples.append(bench_samples(spec, processor, synthetic, "synthetic", args.min_time))
    print("Image processor, one image per call:")
    print(format_table(images, IMAGE_COLUMNS))
    print("\nSampleBuilder.build, one row per call:")
    print(format_table(samples, SAMPLE_COLUMNS))
    machine["load_average_end"] = machine_info()["load_average"]
    print(f"load average start {machine['load_average']}, end {machine['load_average_end']}")
    report = {"config": args_dict(args), "machine": machine, "images": images, "samples": samples}
    print(f"wrote {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    quiet_logging()
    main()
