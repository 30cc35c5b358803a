"""NanoVLM model: SigLIP vision tower -> pixel-shuffle projector -> causal LM, in transformers' standard VLM layout.

Layout (what GenerationMixin, PEFT and TRL expect of a VLM):
    NanoVLMForConditionalGeneration
      .model                  NanoVLMModel
        .vision_tower         SiglipVisionModel (no pooling head)
        .multi_modal_projector  pixel shuffle + bias-free linear
        .language_model       the text backbone (LlamaModel for SmolLM2)
      .lm_head

Non-standard parts:
- image features replace the embeddings of the image tokens; the count check names both counts;
- for packed rows (several samples per row, `position_ids` restarting at 0, no attention mask) the text model must
  run without a KV cache, otherwise the packed-sequence mask is silently dropped and samples attend to each other:
  `use_cache` is forced off when training or when labels are given;
- `config.vision_sincos_position_scale` starts the vision tower's learned position table from a 2-D sin-cos grid
  at init, so `from_config` rebuilds the demo model;
- the text embedding has no padding row (transformers would never train the pad token's input embedding, and
  the pad token is `<|im_end|>` with SmolLM2's tokenizer).
- the image token is an input placeholder only: `generate` never emits it (`suppress_tokens` of every generation
  config it runs with, see `suppress_image_token`).

This file is copied next to the weights by `save_pretrained`; it imports its siblings only as `from .x import Y`.
It knows nothing of model cards or training runs: `NanoVLMTrainer` writes those (nanovlm/training/model_card.py).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanovlm import NanoVLMConfig
from .image_processing_nanovlm import normalize_pixels

logger = logging.getLogger(__name__)

# transformers 5.25 renamed the KV cache from `past_key_values` to `cache` (forward keyword and output field; its
# `generate` passes `cache=` and leaves `past_key_values` unset) and warns on the old name. Speak whichever name the
# installed transformers declares, so the text model gets the cache under its own name and no call of ours warns.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, n*n, D) patch features -> (B, (n/s)^2, s^2*D): each s×s block of patches becomes one token.

    The channel order matches the original nanoVLM (row-major within the block), so its projector weights load as-is.
    """
    bsz, seq, dim = x.shape
    side = int(round(seq**0.5))
    if side * side != seq or side % factor != 0:
        raise ValueError(
            f"pixel_shuffle needs a square patch grid divisible by the factor: got {seq} patches "
            f"(side {seq**0.5:.2f}) and factor {factor}."
        )
    out = side // factor
    x = x.reshape(bsz, out, factor, out, factor, dim)  # (B, h/s, s, w/s, s, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, D)
    return x.reshape(bsz, out * out, factor * factor * dim)  # (B, (n/s)^2, s^2 D)


class NanoVLMMultiModalProjector(nn.Module):
    """Pixel shuffle followed by a bias-free linear map into the text model's hidden size."""

    def __init__(self, config: NanoVLMConfig):
        super().__init__()
        self.factor = config.pixel_shuffle_factor
        in_dim = config.vision_config.hidden_size * self.factor**2
        self.proj = nn.Linear(in_dim, config.text_config.hidden_size, bias=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(image_features, self.factor))  # (N_tiles, image_seq_len, H_text)


@dataclass
class NanoVLMModelOutputWithPast(BaseModelOutputWithPast):
    """Base model output plus the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class NanoVLMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Language-model output (the cache under CACHE_KEY) plus the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


def sincos_position_grid(side: int, dim: int, temperature: float = 100.0) -> torch.Tensor:
    """(side * side, dim) 2-D sin-cos position codes of a row-major patch grid, as MAE's: the first half of the
    channels encode the column, the second half the row, each as sin and cos of `dim / 4` frequencies from 1 down to
    1 / temperature. Every row has norm sqrt(dim / 2). Hand-written: transformers has no helper for a learned
    `nn.Embedding` table (SigLIP's) and timm is not a dependency."""
    if side < 1 or dim < 4 or dim % 4:
        raise ValueError(f"need side >= 1 and dim a positive multiple of 4, got side={side}, dim={dim}")
    quarter = dim // 4
    omega = temperature ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.flatten().to(torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (side * side, dim)


def init_vision_positions_sincos(vision_tower: nn.Module, scale: float) -> None:
    """Set the tower's learned position embeddings to `scale` x a 2-D sin-cos grid (they stay trainable), unless
    they were loaded from a checkpoint. Raises for a table that is not a square patch grid."""
    table = vision_tower.embeddings.position_embedding.weight  # (num_patches, hidden_size)
    count, dim = table.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"vision_sincos_position_scale needs a square patch grid, got {count} positions.")
    grid = sincos_position_grid(side, dim).to(device=table.device, dtype=table.dtype)
    init.copy_(table, scale * grid)  # skips a table already loaded from a checkpoint


def suppress_image_token(generation_config: GenerationConfig | None, image_token_id: int | None) -> None:
    """Add `image_token_id` to `generation_config.suppress_tokens` (in place), keeping the tokens already listed.

    The image token only marks where image features go. Generated, it would be a text token with the cache and an
    image slot without features when the whole sequence is re-run (`use_cache=False`), which raises: no output may
    contain it, so it is suppressed the transformers way (SuppressTokensLogitsProcessor, greedy and sampling alike).
    """
    if generation_config is None or image_token_id is None:
        return
    tokens = list(generation_config.suppress_tokens or [])
    if image_token_id not in tokens:
        generation_config.suppress_tokens = [*tokens, image_token_id]


class NanoVLMPreTrainedModel(PreTrainedModel):
    config: NanoVLMConfig
    config_class = NanoVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the image-token scatter has a data-dependent count check

    def _initialize_weights(self, module: nn.Module, *args, **kwargs) -> None:
        super()._initialize_weights(module, *args, **kwargs)
        # Here rather than in `_init_weights`: transformers skips `_init_weights` for a module of remote code that
        # has no parameters of its own (NanoVLMModel), and the vision tower's modules get SigLIP's `_init_weights`.
        # NanoVLMModel comes after its vision tower (children first), so this table is the one that stays; a table
        # loaded by `from_pretrained` is flagged as initialised and kept (`init.copy_`).
        scale = getattr(self.config, "vision_sincos_position_scale", None)
        if scale is not None and isinstance(module, NanoVLMModel):
            init_vision_positions_sincos(module.vision_tower, scale)


def _text_model_without_padding_row(text_config) -> PreTrainedModel:
    """The text backbone with no padding row in its embedding, as in the original nanoVLM.

    transformers builds the text embedding as `nn.Embedding(..., padding_idx=text_config.pad_token_id)`: that row
    gets no gradient from its lookups and is zeroed at random init. The pad token is `<|im_end|>` with SmolLM2's
    tokenizer (and the original's), the token that ends every turn, so its input embedding would never train.
    Padding needs no such row: padded positions are never in the loss and no real token attends to them. The pad
    id is hidden only while the backbone is built (which is when the embedding reads it; the same object stays
    `text_config`, so later settings such as the attention implementation still reach it), and it is hidden on
    every construction, so checkpoints whose config names a pad id load the same way. `resize_token_embeddings`
    copies `padding_idx`, so it stays None. Generation, the collator and the tokenizer still read the pad id.
    """
    pad_token_id = getattr(text_config, "pad_token_id", None)
    if pad_token_id is None:
        return AutoModel.from_config(text_config)
    text_config.pad_token_id = None
    try:
        return AutoModel.from_config(text_config)
    finally:
        text_config.pad_token_id = pad_token_id


class NanoVLMModel(NanoVLMPreTrainedModel):
    """Vision tower + projector + text backbone, without the LM head."""

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = NanoVLMMultiModalProjector(config)
        self.language_model = _text_model_without_padding_row(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_tiles, 3, S, S) pixels -> (N_tiles, image_seq_len, H_text) image embeddings. Float pixels are used as
        given (the processor normalised them); uint8 pixels (0-255) are normalised here with `config.image_mean/std`."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape (num_tiles, 3, {size}, {size}), got {tuple(pixel_values.shape)}. "
                "Use the NanoVLM image processor, which splits images into tiles of the vision tower's size."
            )
        if pixel_values.dtype == torch.uint8:
            # Training tiles stay uint8 until here (4x less host memory and transfer): normalise on the device with
            # the processor's mean/std recorded in the config, the same operations as the processor's float output.
            pixel_values = normalize_pixels(pixel_values, self.config.image_mean, self.config.image_std)
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        features = self.vision_tower(pixel_values=pixel_values).last_hidden_state  # (N, n_patches, D_vision)
        return self.multi_modal_projector(features)

    def merge_image_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write the image features into the positions of the image tokens, in order."""
        if input_ids is not None:
            mask = input_ids == self.config.image_token_id
        else:
            image_embed = self.get_input_embeddings().weight[self.config.image_token_id]
            mask = (inputs_embeds == image_embed).all(-1)
        n_tiles, per_tile, _ = image_features.shape
        # The count check reads a number back from the device: under torch.compile that breaks the graph at every
        # forward (seen on the H200), so it is left to eager runs; the training data's counts come from the sample
        # builder, which expands each tile into exactly one block of image tokens.
        if not torch.compiler.is_compiling() and (n_tokens := int(mask.sum())) != n_tiles * per_tile:
            raise ValueError(
                f"Image tokens and image features do not match: image tokens: {n_tokens}, image features: "
                f"{n_tiles * per_tile} ({n_tiles} tiles x {per_tile} tokens). Build inputs with the NanoVLM processor "
                "so each tile gets exactly one block of image tokens, and pass the pixel_values of every image."
            )
        flat = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)

    def add_zero_image_contribution(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` plus 0 x (the vision tower and projector run on one blank tile), when either has trainable
        parameters. Used in training for a batch without images: under DDP or FSDP every process must produce a
        gradient for every trainable parameter in every step, or the others wait forever in the gradient all-reduce
        (nanoVLM's train.py guards the same case). The values are unchanged (x + 0.0) and the gradients added are
        exactly 0, so the step equals the one without the blank tile; it costs one tile's forward and backward."""
        image_path = (*self.vision_tower.parameters(), *self.multi_modal_projector.parameters())
        if not any(param.requires_grad for param in image_path):
            return inputs_embeds
        size = self.config.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=inputs_embeds.device, dtype=self.vision_tower.dtype)
        features = self.get_image_features(blank)  # (1, image_seq_len, H_text)
        return inputs_embeds + 0.0 * features.sum().to(inputs_embeds.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: object | None = None,
        **kwargs,
    ) -> NanoVLMModelOutputWithPast:
        """`cache` and `past_key_values` are the same KV cache under its new and old name (see CACHE_KEY)."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if self.config.image_token_id is None and pixel_values is not None:
            raise ValueError("config.image_token_id is not set; build the model with the NanoVLM tokenizer's ids.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, H)

        image_features = None
        if pixel_values is not None and pixel_values.numel() > 0:
            image_features = self.get_image_features(pixel_values)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        else:
            if input_ids is not None and self.config.image_token_id is not None:
                n_tokens = int((input_ids == self.config.image_token_id).sum())
                if n_tokens and cache is None:  # with a cache this is a decode step: a generated image token is text
                    raise ValueError(
                        f"Image tokens and image features do not match: image tokens: {n_tokens}, image features: 0. "
                        "Pass the pixel_values the processor returned."
                    )
            if self.training and torch.is_grad_enabled():
                inputs_embeds = self.add_zero_image_contribution(inputs_embeds)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_KEY: cache},
            **kwargs,
        )
        return NanoVLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class NanoVLMForConditionalGeneration(NanoVLMPreTrainedModel, GenerationMixin):
    """NanoVLM with a language-modelling head; `generate` comes from transformers' GenerationMixin."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: NanoVLMConfig):
        super().__init__(config)
        self.model = NanoVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        suppress_image_token(self.generation_config, config.image_token_id)  # saved with the model

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """`from_pretrained`'s loading of generation_config.json; a checkpoint saved before the image token was
        suppressed gets it added here, so `model.generation_config` (and what is saved again) says so too."""
        super().adjust_generation_fn(*args, **kwargs)
        suppress_image_token(self.generation_config, self.config.image_token_id)

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        """The config one `generate` call runs with (GenerationMixin's), always suppressing the image token: also
        when the call passes its own `generation_config`, or `suppress_tokens` (then theirs plus the image token),
        or `model.generation_config` was replaced after loading."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        suppress_image_token(generation_config, self.config.image_token_id)
        return generation_config, model_kwargs

    # save_pretrained records one auto class per class (`register_for_auto_class`); these point at the same class.
    _extra_auto_classes = ("AutoModelForImageTextToText", "AutoModelForCausalLM")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, also mapping AutoModelForImageTextToText/CausalLM in `auto_map`."""
        if self._auto_class is not None:
            name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            extra = {auto_class: name for auto_class in self._extra_auto_classes}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **extra}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: object | None = None,
        **kwargs,
    ) -> NanoVLMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Next-token targets (unshifted, -100 ignored), as in every transformers causal LM.
        position_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            For packed rows, positions restarting at 0 at each sample (and no attention_mask): samples then cannot
            attend to each other.
        kwargs:
            `num_items_in_batch` (the global label-token count the loss is divided by) and attention kwargs
            (`cu_seq_lens_q`, ... for flash-attention varlen).
        cache (`Cache`, *optional*):
            The KV cache; `past_key_values` is its name before transformers 5.25 (either works, see CACHE_KEY).
        """
        if labels is not None or self.training:
            use_cache = False  # a cache disables the packed-sequence mask (see module docstring)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            **kwargs,
        )
        logits = self._head_logits(outputs.last_hidden_state, logits_to_keep)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        return NanoVLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def _head_logits(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """LM-head logits of the positions `logits_to_keep` selects (0: all; k > 0: the last k; a tensor: those)."""
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        return self.lm_head(hidden_states)

    @classmethod
    def from_backbones(
        cls,
        vision_model: str | os.PathLike = "google/siglip2-base-patch16-512",
        text_model: str | os.PathLike = "HuggingFaceTB/SmolLM2-360M-Instruct",
        tokenizer=None,
        pixel_shuffle_factor: int = 4,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        **from_pretrained_kwargs,
    ) -> NanoVLMForConditionalGeneration:
        """Build a NanoVLM from a pretrained SigLIP vision model and a pretrained causal LM.

        Each argument is a hub id or a local folder. The vision tower drops SigLIP's pooling head; `tokenizer` (the
        text model's tokenizer extended by `nanovlm.tokenizer.extend_tokenizer`) gives the image token id and the new
        vocabulary size: new embedding rows are drawn from N(0, 0.02) as in nanoVLM, and tied weights stay tied.
        """
        vision_cfg = AutoConfig.from_pretrained(vision_model, **from_pretrained_kwargs)
        vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)  # a full SigLIP checkpoint
        text_cfg = AutoConfig.from_pretrained(text_model, **from_pretrained_kwargs)
        # recorded in config.json as the backbones' names (the model card reports them)
        vision_cfg._name_or_path, text_cfg._name_or_path = os.fspath(vision_model), os.fspath(text_model)
        config = NanoVLMConfig(
            vision_config=vision_cfg.to_dict(),
            text_config=text_cfg.to_dict(),
            pixel_shuffle_factor=pixel_shuffle_factor,
        )
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls(config)

        vision_src = AutoModel.from_pretrained(vision_model, dtype=dtype, **from_pretrained_kwargs)
        vision_src = getattr(vision_src, "vision_model", vision_src)  # SiglipModel / SiglipVisionModel -> transformer
        vision_state = {k: v for k, v in vision_src.state_dict().items() if not k.startswith("head.")}
        model.model.vision_tower.load_state_dict(vision_state, strict=True)

        text_src = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype, **from_pretrained_kwargs)
        model.model.language_model.load_state_dict(text_src.get_decoder().state_dict(), strict=True)
        if not config.tie_word_embeddings:
            model.lm_head.load_state_dict(text_src.get_output_embeddings().state_dict())
        del vision_src, text_src

        if tokenizer is not None:
            model.resize_for_tokenizer(tokenizer)
        if dtype is not None:
            model = model.to(dtype)
        return model

    def resize_for_tokenizer(self, tokenizer, std: float = 0.02) -> None:
        """Grow the vocabulary to `len(tokenizer)` (new rows ~ N(0, std)) and record the image token id."""
        old = self.get_input_embeddings().weight.shape[0]
        new = len(tokenizer)
        if new > old:
            self.resize_token_embeddings(new, mean_resizing=False)
            with torch.no_grad():
                self.get_input_embeddings().weight[old:].normal_(0.0, std)
                if not self.config.tie_word_embeddings:
                    self.get_output_embeddings().weight[old:].normal_(0.0, std)
        image_token = getattr(tokenizer, "image_token", None)
        if image_token is None:
            raise ValueError(
                "The tokenizer has no `image_token`; extend it with nanovlm.tokenizer.extend_tokenizer first."
            )
        self.config.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        suppress_image_token(self.generation_config, self.config.image_token_id)
        for cfg in (self.config, self.config.text_config):
            cfg.pad_token_id = tokenizer.pad_token_id
        if self.generation_config is not None:
            self.generation_config.pad_token_id = tokenizer.pad_token_id
            self.generation_config.eos_token_id = tokenizer.eos_token_id


__all__ = [
    "sincos_position_grid",
    "suppress_image_token",
    "init_vision_positions_sincos",
    "NanoVLMForConditionalGeneration",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMMultiModalProjector",
    "pixel_shuffle",
]
