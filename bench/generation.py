"""Generation speed of NanoVLM: time to first token and tokens/s, with and without a KV cache, static cache + compile.

Each run calls `model.generate` (greedy) on prompts built by the real processor: the chat template around one image
(`--image_size`, tiled as the shape's processor tiles it) and a question, repeated `batch` times (equal lengths,
no padding). `min_new_tokens = max_new_tokens` so every run generates exactly `--max_new_tokens` tokens (EOS cannot
stop it early). The image and tile tokens are suppressed (`suppress_tokens`): a random-weight model may otherwise
emit `<|image|>`, which a cache-less forward then counts as an image token without features and rejects.

Modes:
    no_cache        use_cache=False: every step re-runs the whole sequence, vision tower included
    dynamic         the default DynamicCache
    static          cache_implementation="static" (a fixed-size cache: the shape compile needs)
    static_compile  static cache + torch.compile of the forward (transformers' CompileConfig; on CPU forced with
                    `_compile_all_devices`); its first call's time (compilation) is reported apart
Figures (median of `--repeats` timed runs after one warm-up run):
    ttft_s          generate(max_new_tokens=1): image encoding + prefill + the first token
    total_s         generate(max_new_tokens=N)
    tokens_per_s    batch * N / total_s                    (end to end)
    decode_tok_s    batch * (N - 1) / (total_s - ttft_s)   (after the first token)
    speedup         no_cache total_s / this mode's total_s (target: dynamic >= 3 at N = 256)
    same_as_no_cache  whether the greedy tokens equal the cache-less run's (random weights: near-ties can differ)

    python bench/generation.py --shape tiny demo --out bench/results/generation.json
    python bench/generation.py --shape 460m --device cuda --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    SHAPES,
    args_dict,
    build_model,
    build_processor_for_shape,
    build_tokenizer,
    format_table,
    get_shape,
    image_token_ids,
    machine_info,
    parameter_counts,
    photo_like_image,
    quiet_logging,
    resolve_device,
    setup_environment,
    torch_threads,
    write_json,
)
from PIL import Image

MODES = ["no_cache", "dynamic", "static", "static_compile"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_inputs(processor, batch: int, image: Image.Image, question: str, device) -> dict[str, torch.Tensor]:
    """`batch` copies of one chat prompt (image + question), as the processor builds it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text] * batch, images=[[image]] * batch, return_tensors="pt")
    inputs.pop("image_grids", None)
    return {k: v.to(device) for k, v in inputs.items()}


def mode_kwargs(mode: str, device: torch.device) -> dict[str, Any]:
    if mode == "no_cache":
        return {"use_cache": False}
    if mode == "dynamic":
        return {"use_cache": True}
    if mode == "static":
        return {"cache_implementation": "static"}
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    return {"cache_implementation": "static", "compile_config": config}


def timed_generate(model, inputs, new_tokens: int, kwargs: dict[str, Any], suppress: list[int]) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=suppress, **kwargs,
        )
    sync()
    return time.perf_counter() - start, out


def run_mode(model, inputs, mode: str, args, device, suppress: list[int]) -> dict[str, Any]:
    """Warm up, then time TTFT and the full generation `--repeats` times; medians."""
    kwargs = mode_kwargs(mode, device)
    prompt_len = inputs["input_ids"].shape[1]
    n = args.max_new_tokens
    result: dict[str, Any] = {"mode": mode}
    try:
        first_s, _ = timed_generate(model, inputs, n if mode == "static_compile" else min(n, 8), kwargs, suppress)
        if mode == "static_compile":
            result["first_call_s"] = first_s
        ttft = [timed_generate(model, inputs, 1, kwargs, suppress)[0] for _ in range(args.repeats)]
        totals, out = [], None
        for _ in range(args.repeats):
            seconds, out = timed_generate(model, inputs, n, kwargs, suppress)
            totals.append(seconds)
    except Exception as err:  # report why a mode does not work on this model, keep going
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return result
    generated = out[:, prompt_len:]
    if generated.shape[1] != n:
        raise RuntimeError(f"{mode}: generated {generated.shape[1]} tokens, expected exactly {n}")
    batch = inputs["input_ids"].shape[0]
    ttft_s, total_s = statistics.median(ttft), statistics.median(totals)
    result.update(
        ttft_s=ttft_s, total_s=total_s, tokens_per_s=batch * n / total_s,
        decode_tokens_per_s=batch * (n - 1) / (total_s - ttft_s) if n > 1 and total_s > ttft_s else None,
        new_tokens=int(generated.shape[1]), tokens=generated.cpu(),
    )
    return result


def run_shape(args: argparse.Namespace, shape: str) -> list[dict[str, Any]]:
    spec = get_shape(shape)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    tokenizer = build_tokenizer(spec)
    model = build_model(spec, tokenizer, attn_implementation=args.attn_implementation, seed=args.seed)
    model = model.to(device=device, dtype=dtype).eval()
    processor = build_processor_for_shape(spec, tokenizer, model.config)
    width, height = args.image_size
    image = photo_like_image(width, height, args.seed)
    suppress = image_token_ids(tokenizer)
    modes = [m for m in args.modes if m != "static_compile" or args.compile]
    if args.compile and "static_compile" not in modes:
        modes.append("static_compile")
    rows = []
    for batch in args.batch_sizes:
        inputs = build_inputs(processor, batch, image, args.question, device)
        results = [run_mode(model, inputs, mode, args, device, suppress) for mode in modes]
        base = next((r for r in results if r["mode"] == "no_cache" and "total_s" in r), None)
        for r in results:
            r.update(shape=shape, batch=batch, prompt_tokens=int(inputs["input_ids"].shape[1]),
                     image_tiles=int(inputs["pixel_values"].shape[0]) // batch, dtype=str(dtype).replace("torch.", ""),
                     device=str(device))
            if base is not None and "total_s" in r:
                r["speedup_vs_no_cache"] = base["total_s"] / r["total_s"]
                r["same_as_no_cache"] = bool(torch.equal(r["tokens"], base["tokens"]))
        for r in results:
            r.pop("tokens", None)
        rows += results
        print(format_table(_ms(rows[-len(results):]), COLUMNS), flush=True)
    params = parameter_counts(model)
    for r in rows:
        r["params_total"] = params["total"]
    del model
    gc.collect()
    return rows


COLUMNS = [
    ("shape", "shape", ""), ("batch", "B", "d"), ("mode", "mode", ""), ("prompt_tokens", "prompt", "d"),
    ("ttft_s", "TTFT ms", ".1f"), ("total_s", "total s", ".3f"), ("tokens_per_s", "tok/s", ".1f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"), ("speedup_vs_no_cache", "x no-cache", ".2f"),
    ("same_as_no_cache", "same", ""), ("first_call_s", "compile s", ".1f"), ("error", "error", ""),
]


def _ms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "ttft_s": r["ttft_s"] * 1000 if r.get("ttft_s") is not None else None} for r in rows]


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", default=["tiny", "demo"], choices=SHAPES,
                        help="model shape(s); 460m works on CPU but is slow (no_cache especially)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="prompts per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per prompt (exactly)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["no_cache", "dynamic", "static"],
                        help="cache modes to time")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also time static cache + torch.compile (static_compile)")
    parser.add_argument("--image_size", type=parse_size, default=(640, 480), help="prompt image WIDTHxHEIGHT")
    parser.add_argument("--question", default="What color is the circle in the top left corner of the picture?",
                        help="prompt text after the image")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--attn_implementation", choices=["eager", "sdpa", "flash_attention_2", "flex_attention"],
                        default="sdpa")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/generation.json"), help="JSON path")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise SystemExit("--repeats and --max_new_tokens must be >= 1.")
    setup_environment()
    machine = machine_info(resolve_device(args.device))
    machine["torch_threads"] = args.threads or machine["torch_threads"]
    print(f"machine: {machine['cpu']} ({machine['cpus_usable']} usable cores), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {machine.get('gpu', 'no GPU')}; load {machine['load_average']}")
    rows: list[dict[str, Any]] = []
    with torch_threads(args.threads):
        for shape in args.shape:
            rows += run_shape(args, shape)
    print(f"\n{args.max_new_tokens} new tokens per prompt:")
    print(format_table(_ms(rows), COLUMNS))
    machine["load_average_end"] = machine_info()["load_average"]
    print(f"load average start {machine['load_average']}, end {machine['load_average_end']}")
    report = {"config": args_dict(args), "machine": machine, "runs": rows}
    print(f"wrote {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    quiet_logging()
    main()
