"""`nanovlm-convert`: turn an original huggingface/nanoVLM checkpoint into a nanovlm checkpoint.

    nanovlm-convert --input lusxvr/nanoVLM-460M-8k --output checkpoints/nanovlm-460m [--tokenizer PATH_OR_ID]
        [--dtype float32] [--overwrite]

An original checkpoint is a folder (or hub id) holding `config.json`, the flat `VLMConfig` dataclass (`vit_*`, `lm_*`,
`mp_*` fields, `lm_tokenizer`, `vlm_extra_tokens`, `lm_chat_template`, `max_img_size`, `resize_to_max_side_len`, ...)
and `model.safetensors`. The output is a `NanoVLMForConditionalGeneration` plus a processor that reproduces nanoVLM's
preprocessing, loadable anywhere with `AutoModel/AutoProcessor.from_pretrained(..., trust_remote_code=True)`.

This module reads and checks the checkpoint, converts the config, tokenizer and processor, and saves the result; the
weight mapping (the nanoVLM key -> nanovlm key table, every source key consumed and every target parameter filled,
else a `StateDictMismatchError` lists both) lives in `nanovlm/cli/convert_weights.py`.

Where nanoVLM's own code differs from the transformers modules used here:
- RMSNorm: nanoVLM computes `x * rsqrt(mean(x^2) + eps) * w` in the input dtype; Llama's RMSNorm upcasts to fp32 and
  casts back before the weight. In fp32 the two are the same operations (identical results); in bf16/fp16 Llama's is
  the more precise one, so converted bf16 logits differ from nanoVLM's bf16 logits by rounding.
- RoPE: nanoVLM divides the frequencies by `max_position / lm_max_position_embeddings` whenever a forward call sees a
  position >= `lm_max_position_embeddings` (8192), recomputed per call (so cached decoding past 8192 mixes scales);
  Llama's default RoPE never rescales. Up to 8192 positions (nanoVLM trains at 4096 tokens) the cos/sin tables are
  computed the same way and are identical; past 8192 the converted model extrapolates without rescaling. nanoVLM's
  `lm_attn_scaling` (a factor on cos and sin) has no Llama equivalent: only 1.0 (its default) is accepted.
- Attention, GQA head repetition, SiLU MLP, SigLIP blocks (tanh GELU, pre-norm, scale head_dim**-0.5) and the pixel
  shuffle are the same math, so fp32 logits agree to float rounding (kernel choice, ~1e-6).
- Preprocessing: no normalisation (`do_normalize=False`), global view first, nanoVLM's resize rule (`upscale` =
  `resize_to_max_side_len`, long side `max_img_size`, bicubic), tiles in row order, and the same token string
  (`<image: k>`, global image token, `<row_i_col_j>` tokens). nanoVLM makes its global view by a bilinear,
  antialiased downscale of the already resized image; nanovlm's image processor does that only if it offers the
  `global_view_from="resized"` option (otherwise it resizes the source image bicubically: the global view then
  differs slightly). Images with transparency: nanoVLM's `convert("RGB")` drops alpha, nanovlm composites on white.
- Tokenizer: `lm_tokenizer` extended with nanovlm's image/tile tokens; the converter checks that every one of
  nanoVLM's extra tokens (`vlm_extra_tokens`, 66 by default) gets the same id as in nanoVLM's own tokenizer, and that
  nanovlm's ChatML template renders text conversations exactly as `lm_chat_template`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer

from nanovlm.cli.convert_weights import convert_state_dict, load_into_model, preview
from nanovlm.configuration_nanovlm import NanoVLMConfig
from nanovlm.devices import DTYPES
from nanovlm.image_processing_nanovlm import NanoVLMImageProcessor
from nanovlm.modeling_nanovlm import NanoVLMForConditionalGeneration
from nanovlm.processing_nanovlm import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, NanoVLMProcessor, tile_token
from nanovlm.tokenizer import extend_tokenizer
from nanovlm.training.checks import check_output_folder, is_local_path

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Fields the conversion cannot do without (nanoVLM's own loader would silently fall back to its 460M defaults).
REQUIRED_FIELDS = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
    "lm_hidden_dim", "lm_inter_dim", "lm_re_base", "lm_max_position_embeddings", "lm_vocab_size", "lm_n_heads",
    "lm_n_kv_heads", "lm_n_blocks", "mp_pixel_shuffle_factor", "mp_image_token_length", "vlm_extra_tokens",
)  # fmt: skip
# Fields filled with nanoVLM's `VLMConfig` defaults when absent (as nanoVLM's `VLMConfig(**json)` does).
DEFAULT_FIELDS = {
    "vit_ln_eps": 1e-6,
    "vit_cls_flag": False,
    "lm_rms_eps": 1e-5,
    "lm_attn_scaling": 1.0,
    "lm_tie_weights": True,
    "lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "lm_chat_template": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
        "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "max_img_size": 2048,
    "resize_to_max_side_len": True,
}
_TILE_KEY = re.compile(r"^r(\d+)c(\d+)$")


# ---- reading the original checkpoint ---------------------------------------------------------------------------------
def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local folder with config.json and model.safetensors, or a hub id whose two files are downloaded (cached)."""
    path = Path(source)
    if path.is_dir():
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a nanoVLM checkpoint folder: it lacks {', '.join(missing)} (nanoVLM's "
                "VisionLanguageModel.save_pretrained writes config.json and model.safetensors)."
            )
        return path
    if is_local_path(str(source)):
        raise FileNotFoundError(f"--input {source!s}: no such folder, and not a hub id of the form 'owner/name'.")
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(repo_id=str(source), filename=CONFIG_NAME)
        hf_hub_download(repo_id=str(source), filename=WEIGHTS_NAME)
    except Exception as err:  # offline, unknown repo, missing file, gated: all end the same way for the user
        raise FileNotFoundError(
            f"--input {source!s}: not a local folder, and it could not be fetched from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Pass a local folder instead."
        ) from err
    return Path(config_file).parent


def read_original_config(folder: str | os.PathLike) -> dict:
    """config.json of an original checkpoint, with nanoVLM's defaults for optional fields; raises on missing ones."""
    file = Path(folder) / CONFIG_NAME
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}).") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object (nanoVLM's VLMConfig), got {type(raw).__name__}.")
    if raw.get("model_type") == NanoVLMConfig.model_type:
        raise ValueError(f"{folder} is already a nanovlm checkpoint; load it with AutoModel.from_pretrained.")
    missing = [field for field in REQUIRED_FIELDS if field not in raw]
    if missing:
        raise ValueError(
            f"{file} is not an original nanoVLM config: it lacks {missing}. Expected the flat VLMConfig of "
            "huggingface/nanoVLM (vit_*, lm_*, mp_* fields and vlm_extra_tokens)."
        )
    cfg = dict(raw)
    for field, default in DEFAULT_FIELDS.items():
        if field not in cfg:
            logger.info("config.json has no %s; using nanoVLM's default %r.", field, default)
            cfg[field] = default
    validate_original_config(cfg)
    return cfg


def validate_original_config(cfg: Mapping) -> None:
    """Refuse configurations the nanovlm modules cannot reproduce exactly, naming the field and the value."""
    errors = []
    if cfg["vit_cls_flag"]:
        errors.append("vit_cls_flag=true (a CLS-token ViT) has no SigLIP equivalent; only vit_cls_flag=false converts")
    if float(cfg["lm_attn_scaling"]) != 1.0:
        errors.append(f"lm_attn_scaling={cfg['lm_attn_scaling']} scales RoPE's cos/sin, which Llama cannot; only 1.0")
    for dim, heads in (("vit_hidden_dim", "vit_n_heads"), ("lm_hidden_dim", "lm_n_heads")):
        if cfg[dim] % cfg[heads] != 0:
            errors.append(f"{dim}={cfg[dim]} is not divisible by {heads}={cfg[heads]}")
    if cfg["lm_n_heads"] % cfg["lm_n_kv_heads"] != 0:
        errors.append(f"lm_n_heads={cfg['lm_n_heads']} is not divisible by lm_n_kv_heads={cfg['lm_n_kv_heads']}")
    grid = cfg["vit_img_size"] // cfg["vit_patch_size"]
    s = cfg["mp_pixel_shuffle_factor"]
    if cfg["vit_img_size"] % cfg["vit_patch_size"] or grid % s:
        errors.append(f"vit_img_size={cfg['vit_img_size']} / vit_patch_size={cfg['vit_patch_size']} must give a patch "
                      f"grid divisible by mp_pixel_shuffle_factor={s}")
    elif (grid // s) ** 2 != cfg["mp_image_token_length"]:
        errors.append(f"mp_image_token_length={cfg['mp_image_token_length']} but the pixel shuffle yields "
                      f"({grid}/{s})^2={(grid // s) ** 2} tokens per tile")
    if cfg["max_img_size"] % cfg["vit_img_size"]:
        errors.append(f"max_img_size={cfg['max_img_size']} is not a multiple of vit_img_size={cfg['vit_img_size']} "
                      "(nanoVLM's splitter would fail on such images too)")
    if errors:
        raise ValueError("Cannot convert this nanoVLM config: " + "; ".join(errors) + ".")


def load_original_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` (CPU)."""
    file = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); re-download or re-save it.") from err


# ----------------------------------------------------------------------------------------------------------------------
def convert_config(cfg: Mapping, tokenizer=None) -> NanoVLMConfig:
    """The NanoVLMConfig of an original VLMConfig dict; `tokenizer` (the converted one) supplies the token ids."""
    head_dim = cfg["lm_hidden_dim"] // cfg["lm_n_heads"]
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=cfg["vit_hidden_dim"],
        intermediate_size=cfg["vit_inter_dim"],
        num_hidden_layers=cfg["vit_n_blocks"],
        num_attention_heads=cfg["vit_n_heads"],
        image_size=cfg["vit_img_size"],
        patch_size=cfg["vit_patch_size"],
        num_channels=3,
        layer_norm_eps=cfg["vit_ln_eps"],
        hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0,
        vision_use_head=False,
    )
    text = dict(
        model_type="llama",
        hidden_size=cfg["lm_hidden_dim"],
        intermediate_size=cfg["lm_inter_dim"],
        num_hidden_layers=cfg["lm_n_blocks"],
        num_attention_heads=cfg["lm_n_heads"],
        num_key_value_heads=cfg["lm_n_kv_heads"],
        head_dim=head_dim,
        vocab_size=cfg["lm_vocab_size"],
        max_position_embeddings=cfg["lm_max_position_embeddings"],
        rms_norm_eps=cfg["lm_rms_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["lm_re_base"])},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=bool(cfg["lm_tie_weights"]),
    )
    image_token_id = None
    if tokenizer is not None:
        text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    return NanoVLMConfig(
        vision_config=vision,
        text_config=text,
        pixel_shuffle_factor=cfg["mp_pixel_shuffle_factor"],
        image_token_id=image_token_id,
        tie_word_embeddings=bool(cfg["lm_tie_weights"]),
    )


# ---- tokenizer and processor ----------------------------------------------------------------------------------------
def _extra_token_names(extra: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """nanoVLM's `vlm_extra_tokens` keys -> nanovlm's token strings, and the tile grid they cover."""
    if not isinstance(extra, Mapping):
        raise ValueError(f"vlm_extra_tokens must be an object of name -> token, got {type(extra).__name__}.")
    names, tiles, unknown = {}, [], []
    for key in extra:
        match = _TILE_KEY.match(key)
        if key == "image_token":
            names[key] = IMAGE_TOKEN
        elif key == "global_image_token":
            names[key] = GLOBAL_IMAGE_TOKEN
        elif match:
            row, col = int(match.group(1)), int(match.group(2))
            names[key] = tile_token(row, col)
            tiles.append((row, col))
        else:
            unknown.append(key)
    grid = max((max(t) for t in tiles), default=0)
    absent = [k for k in ("image_token", "global_image_token") if k not in extra]
    absent += [f"r{r}c{c}" for r in range(1, grid + 1) for c in range(1, grid + 1) if (r, c) not in tiles]
    if unknown or absent or grid == 0:
        raise ValueError(
            "vlm_extra_tokens must hold image_token, global_image_token and r{i}c{j} for a full square grid "
            f"(nanoVLM's image splitting); unknown keys: {unknown}, absent keys: {absent or ['r1c1']}. Checkpoints "
            "from before nanoVLM's image splitting are not supported."
        )
    return names, grid


def build_tokenizer(cfg: Mapping, tokenizer: str | os.PathLike | None = None):
    """The converted tokenizer: `tokenizer` (default: cfg["lm_tokenizer"]) extended with nanovlm's image and tile
    tokens; raises ValueError unless every nanoVLM extra token keeps the id nanoVLM's own tokenizer gives it."""
    source = str(tokenizer or cfg["lm_tokenizer"])
    names, grid = _extra_token_names(cfg["vlm_extra_tokens"])
    try:
        ours = extend_tokenizer(source, max_grid=grid)
        # nanoVLM's own construction (data/processors.py: get_tokenizer), to compare the ids.
        theirs = AutoTokenizer.from_pretrained(source, use_fast=True, extra_special_tokens=dict(cfg["vlm_extra_tokens"]))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Cannot load the tokenizer {source!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Pass a local copy with --tokenizer PATH."
        ) from err
    differ = []
    for key, value in cfg["vlm_extra_tokens"].items():
        a, b = ours.convert_tokens_to_ids(names[key]), theirs.convert_tokens_to_ids(value)
        if a != b:
            differ.append(f"{key}: nanovlm {names[key]}={a}, nanoVLM {value}={b}")
    if differ:
        raise ValueError(
            f"The converted tokenizer gives nanoVLM's extra tokens other ids ({len(differ)}): {preview(differ, 4)}. "
            "vlm_extra_tokens must list image_token, global_image_token, then r1c1..rGcG row by row (nanoVLM's order)."
        )
    if len(ours) > cfg["lm_vocab_size"]:
        raise ValueError(
            f"The tokenizer {source!r} has {len(ours)} tokens with the image tokens, more than lm_vocab_size="
            f"{cfg['lm_vocab_size']}; pass the tokenizer the checkpoint was trained with (--tokenizer)."
        )
    return ours


def chat_templates_agree(tokenizer, template: str) -> bool:
    """Whether nanovlm's ChatML template renders text conversations exactly as nanoVLM's `lm_chat_template`."""
    probes = [
        [{"role": "user", "content": "What is this?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again\n"}],
    ]
    for messages in probes:
        for gen in (True, False):
            ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            theirs = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen)
            if ours != theirs:
                return False
    return True


def supports_exact_global_view() -> bool:
    """Whether the image processor can build the global view the nanoVLM way (from the resized image)."""
    import inspect

    return "global_view_from" in inspect.signature(NanoVLMImageProcessor.__init__).parameters


def build_converted_processor(cfg: Mapping, tokenizer, config: NanoVLMConfig) -> NanoVLMProcessor:
    """A processor with nanoVLM's preprocessing: raw [0, 1] pixels, global view first, its resize rule and extra
    tokens; nanovlm's ChatML template when it renders text chats like `lm_chat_template`, else that template."""
    _, grid = _extra_token_names(cfg["vlm_extra_tokens"])
    if cfg["max_img_size"] // cfg["vit_img_size"] > grid:
        raise ValueError(
            f"max_img_size={cfg['max_img_size']} gives up to {cfg['max_img_size'] // cfg['vit_img_size']} tiles per "
            f"side but vlm_extra_tokens only has tile tokens up to r{grid}c{grid}."
        )
    image_kwargs = dict(
        tile_size=cfg["vit_img_size"],
        max_image_size=cfg["max_img_size"],
        max_grid=grid,
        upscale=bool(cfg["resize_to_max_side_len"]),
        do_normalize=False,
        global_image_position="first",
        resample=Image.Resampling.BICUBIC,
    )
    if supports_exact_global_view():
        image_kwargs["global_view_from"] = "resized"
    else:
        logger.warning(
            "This nanovlm's image processor resizes the source image for the global view; nanoVLM downsizes the "
            "resized image (bilinear, antialiased), so multi-tile global views differ slightly."
        )
    image_processor = NanoVLMImageProcessor(**image_kwargs)
    template = None
    if not chat_templates_agree(tokenizer, cfg["lm_chat_template"]):
        logger.warning(
            "nanoVLM's lm_chat_template renders chats differently from nanovlm's ChatML template; keeping nanoVLM's "
            "template: message contents must then be strings with one %s per image.", IMAGE_TOKEN
        )
        template = cfg["lm_chat_template"]
    if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        logger.warning(
            "The tokenizer adds special tokens when encoding; nanoVLM's tokenized chat template never does, so "
            "prompts not starting with the BOS token get one extra token here."
        )
    return NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            image_seq_len=config.image_seq_len, chat_template=template)


# ---- the whole conversion -------------------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> tuple[NanoVLMForConditionalGeneration, NanoVLMProcessor]:
    """Convert the original checkpoint `source` (folder or hub id) and save model and processor to `output`.

    `tokenizer` overrides the config's `lm_tokenizer` (a hub id or a local folder); `dtype` ("float32", "bfloat16",
    "float16") defaults to the checkpoint's floating dtype. A non-empty `output` is refused unless `overwrite`
    (which deletes its old files); an `output` that is, lies in or holds the input folder always is. Returns the
    converted model (eval mode) and processor.
    """
    folder = resolve_checkpoint(source)
    check_output_folder(output, {"--input": folder}, overwrite, name="--output", overwrite_flag="--overwrite")
    cfg = read_original_config(folder)
    state = load_original_state_dict(folder)
    converted = convert_state_dict(state, cfg)
    tok = build_tokenizer(cfg, tokenizer)
    config = convert_config(cfg, tok)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    target_dtype = DTYPES[dtype] if dtype else max(set(floating), key=floating.count, default=torch.float32)

    model = NanoVLMForConditionalGeneration(config)
    load_into_model(model, converted)
    model = model.to(target_dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    processor = build_converted_processor(cfg, tok, config)

    out = Path(output)
    if overwrite and out.is_dir():  # no stale files (an earlier model card, training state) beside the new ones
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Converted %d tensors (%s parameters, %s) from %s to %s.", len(state), f"{n_params:,}",
                str(target_dtype).removeprefix("torch."), source, out)
    return model, processor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanovlm-convert",
        description="Convert an original huggingface/nanoVLM checkpoint (config.json + model.safetensors) into a "
        "nanovlm checkpoint that loads with AutoModel/AutoProcessor(trust_remote_code=True).",
    )
    # `~` expanded here: the shell leaves `--input=~/x` alone (read as no such folder, or a folder named "~")
    parser.add_argument("--input", required=True, type=os.path.expanduser,
                        help="original checkpoint: a local folder or a hub id")
    parser.add_argument("--output", required=True, type=os.path.expanduser,
                        help="folder to write the nanovlm checkpoint to")
    parser.add_argument("--tokenizer", default=None, type=os.path.expanduser,
                        help="tokenizer path or hub id (default: the config's lm_tokenizer)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype of the output (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output folder (its old files are deleted)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `nanovlm-convert`; returns the exit status (2 for a bad input, with a one-line message)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        convert_checkpoint(args.input, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                           overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        print(f"nanovlm-convert: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"Saved the converted checkpoint to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "build_converted_processor",
    "build_tokenizer",
    "convert_checkpoint",
    "convert_config",
    "main",
    "read_original_config",
    "resolve_checkpoint",
]
