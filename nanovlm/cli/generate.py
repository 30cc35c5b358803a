"""`nanovlm-generate`: answer a prompt about one or more images with a nanovlm checkpoint, streaming to stdout.

    nanovlm-generate --model outputs/demo/final --image cat.png --prompt "What is in the image?"
    nanovlm-generate --model you/nanovlm-460m --image a.png --image b.png --prompt "Compare them." \
        --do_sample --temperature 0.7 --top_p 0.9 --seed 0 --device cuda --dtype bfloat16

The checkpoint (a folder or a hub id) is loaded with AutoModel/AutoProcessor(trust_remote_code=True), so any nanovlm
checkpoint works, converted nanoVLM ones included. The images go first in the user turn, then the prompt (nanoVLM's
order); an optional `--system` turn comes before. The answer is streamed with transformers' `TextIteratorStreamer`
while `generate` runs in a thread; stdout receives only the answer. Input problems (missing or unreadable image, no such
model folder, unreachable hub id, a checkpoint that is not a nanovlm one, a LoRA adapter folder, a corrupt weights
file, an image token typed into the prompt) end with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from nanovlm.devices import DTYPES, resolve_device, resolve_dtype
from nanovlm.training.checks import is_local_path

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A problem with the command's inputs, reported as one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanovlm-generate",
        description="Answer a prompt about images with a nanovlm checkpoint, streaming the answer to stdout.",
    )
    # `~` expanded here: the shell leaves `--model=~/x` alone, and transformers read it as a malformed hub id
    parser.add_argument("--model", required=True, type=os.path.expanduser,
                        help="nanovlm checkpoint: a local folder or a hub id")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", type=os.path.expanduser,
                        help="image file; repeat for several images (they go in this order, before the prompt)")
    parser.add_argument("--prompt", required=True, help="the user's question or instruction")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="most tokens to generate (default 256)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0; with --do_sample)")
    parser.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (with --do_sample)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --do_sample)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on a GPU that supports it, else float32")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks argparse cannot express; exits through `parser.error` (status 2) naming the flag."""
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    sampling = {"--temperature": args.temperature, "--top_k": args.top_k, "--top_p": args.top_p}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given and not args.do_sample:
        parser.error(f"{', '.join(given)} only apply when sampling: add --do_sample")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")


def pick_device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Resolve `--device`/`--dtype` defaults; a requested CUDA device must exist."""
    try:
        resolved = resolve_device(device)
    except ValueError:
        raise UsageError(f"--device {device} was requested but no CUDA GPU is available; use --device cpu.") from None
    return resolved, resolve_dtype(dtype, resolved)


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    """Open every image (RGB), failing on the first missing or undecodable file with its path."""
    from nanovlm.image_processing_nanovlm import load_image

    images = []
    for path in paths:
        if path.startswith(("http://", "https://")):  # else "not found": this command reads local files only
            raise UsageError(f"--image {path} is a URL; nanovlm-generate reads local image files: download it first "
                             "(curl -o image.png URL) and pass --image image.png")
        if os.path.isdir(path):
            raise UsageError(f"--image {path} is a folder; pass one image file per --image")
        if not os.path.isfile(path):
            raise UsageError(f"image file not found: {path}")
        try:
            images.append(load_image(path))
        except (ValueError, TypeError) as err:
            raise UsageError(f"cannot read image {path}: {err}") from err
    return images


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _check_training_output_dir(model: str, path: Path) -> None:
    """A training run's --output_dir holds its checkpoints (`final/`, `checkpoint-N/`) but no config.json of its own:
    name them instead of transformers' "Unrecognized model"."""
    def saved(folder: Path) -> bool:  # a full checkpoint, or a LoRA adapter (then --model says how to merge it)
        return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()

    steps = sorted((int(p.name.split("-")[1]), p.name) for p in path.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and saved(p))
    found = (["final"] if saved(path / "final") else []) + [name for _, name in steps[-1:]]
    if found:
        choices = " or ".join(f"--model {os.path.join(model, name)}" for name in found)
        raise UsageError(f"{model} is a training output folder, not a checkpoint; pass one of its checkpoints: {choices}")


def check_checkpoint(model: str) -> None:
    """Fail early, with the fix, unless `model` names a loadable nanovlm checkpoint (folder or reachable hub id)."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if is_local_path(model) and not path.is_dir():
        raise UsageError(f"model folder not found: {model} (pass a nanovlm checkpoint folder or a hub id)")
    raw_config = path / "config.json"
    if path.is_dir() and (path / "adapter_config.json").is_file() and not raw_config.is_file():
        # a LoRA run's final/ holds the adapter only (PEFT's files): without this, transformers' "Unrecognized model"
        merged = f"{model.rstrip('/')}-merged"
        raise UsageError(
            f"{model} is a LoRA adapter, not a full checkpoint; merge it into one first: python -c \"from "
            f"nanovlm.training.lora import merge_lora_checkpoint; merge_lora_checkpoint('{model}', '{merged}')\" "
            f"then --model {merged}"
        )
    if path.is_dir() and raw_config.is_file():
        try:
            raw = json.loads(raw_config.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{raw_config} is not valid JSON ({err})") from err
        if isinstance(raw, dict) and "vit_hidden_dim" in raw and "model_type" not in raw:
            raise UsageError(
                f"{model} is an original nanoVLM checkpoint; convert it first: "
                f"nanovlm-convert --input {model} --output {model.rstrip('/')}-nanovlm"
            )
    if path.is_dir() and not raw_config.is_file():
        _check_training_output_dir(model, path)
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=True)
    except (OSError, ValueError) as err:
        where = "the folder has no loadable config.json" if path.is_dir() else "no such local folder, and the hub has no such model or is unreachable"
        raise UsageError(f"cannot load model {model}: {where} ({_first_line(err)})") from err
    if config.model_type != "nanovlm":
        raise UsageError(
            f"{model} is a {config.model_type!r} checkpoint, not a nanovlm one; nanovlm-generate needs a NanoVLM "
            "(convert original nanoVLM checkpoints with nanovlm-convert)."
        )


def build_messages(images: Sequence[Image.Image], prompt: str, system: str | None = None) -> list[dict]:
    """Chat messages: optional system turn, then the user turn with the images first and the prompt after."""
    messages = [{"role": "system", "content": system}] if system else []
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return messages


def generation_kwargs(args: argparse.Namespace, model, tokenizer) -> dict:
    """`generate` keyword arguments from the command line; eos/pad fall back to the tokenizer's."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        for name in ("temperature", "top_k", "top_p"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return kwargs


def stream_generate(model, inputs: dict, tokenizer, out=None, **kwargs) -> str:
    """Run `model.generate` in a thread and write the answer to `out` (default: stdout) as it is produced, then a
    newline; returns the whole answer."""
    from transformers import TextIteratorStreamer

    out = out if out is not None else sys.stdout

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, streamer=streamer, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread below
            failure.append(err)
            streamer.end()  # unblocks the reader

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    thread.join()
    if failure:
        raise failure[0]
    out.write("\n")
    out.flush()
    return "".join(pieces)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `nanovlm-generate`; returns the exit status (2 for bad inputs, with a one-line message)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        device, dtype = pick_device_and_dtype(args.device, args.dtype)
        images = load_images(args.image)
        check_checkpoint(args.model)
    except UsageError as err:
        print(f"nanovlm-generate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2

    from safetensors import SafetensorError
    from transformers import AutoModel, AutoProcessor, set_seed

    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        reserved = [t for t in (processor.image_token, processor.global_image_token) if t in args.prompt]
        if reserved:  # the processor would read it as an image slot without an image (a ValueError trace)
            raise UsageError(f"--prompt holds {', '.join(reserved)}, a token reserved for images; pass images with "
                             "--image (they go before the prompt) and leave the token out")
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
    except UsageError as err:
        print(f"nanovlm-generate: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, SafetensorError) as err:  # no weights or processor files; a corrupt weights file
        print(f"nanovlm-generate: error: cannot load model {args.model} ({_first_line(err)})", file=sys.stderr)
        return 2
    model = model.to(device).eval()
    logger.info("Loaded %s (%s) on %s.", args.model, dtype, device)

    inputs = processor.apply_chat_template(
        build_messages(images, args.prompt, args.system),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    ).to(device)
    if args.seed is not None:
        set_seed(args.seed)
    stream_generate(model, dict(inputs), processor.tokenizer, **generation_kwargs(args, model, processor.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_messages", "build_parser", "check_checkpoint", "load_images", "main", "stream_generate"]
