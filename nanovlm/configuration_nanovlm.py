"""NanoVLM configuration: a SigLIP vision tower, a pixel-shuffle projector and a causal language model.

This file is copied next to the weights by `save_pretrained`, so it imports only from transformers.
The defaults mirror the original nanoVLM (SigLIP2-B/16-512 + SmolLM2-360M-Instruct, pixel shuffle 4).
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.23 (the GPU machines' image has 5.17): only the older `sub_configs` map exists
    SubConfigSpec = None

# google/siglip2-base-patch16-512 (vision part).
SIGLIP2_B16_512 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": False,
}

# HuggingFaceTB/SmolLM2-360M-Instruct.
SMOLLM2_360M = {
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SUPPORTED_VISION_MODEL_TYPES = ("siglip_vision_model",)


def check_sub_config_sizes(name: str, config: dict | PreTrainedConfig) -> None:
    """Raise a one-line ValueError when a vision/text sub-config (a dict or a config) has a size that is not a positive
    int, or heads that do not divide its width: caught here, not as a shape error in the first forward."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    keys += ["image_size", "patch_size"] if name == "vision_config" else ["num_key_value_heads", "vocab_size"]
    for key in keys:
        value = get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}.{key} must be a positive int, got {value!r}.")
    hidden, heads, kv_heads = get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads")
    if hidden and heads and get("head_dim") is None and hidden % heads:  # a set head_dim frees the width (Llama)
        raise ValueError(
            f"{name}.hidden_size ({hidden}) must be divisible by {name}.num_attention_heads ({heads}); choose a head "
            f"count that divides {hidden}."
        )
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(
            f"{name}.num_attention_heads ({heads}) must be a multiple of {name}.num_key_value_heads ({kv_heads}) (each "
            f"key/value head serves a whole group of query heads); choose a key/value head count that divides {heads}."
        )


class NanoVLMConfig(PreTrainedConfig):
    r"""Configuration of a [`NanoVLMForConditionalGeneration`].

    Args:
        vision_config (`dict` or `SiglipVisionConfig`, *optional*):
            The vision tower. Only fixed-resolution SigLIP/SigLIP2 towers (`siglip_vision_model`) are supported; its
            `image_size` is the tile size. Defaults to SigLIP2-B/16-512 without the pooling head.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any decoder-only causal LM config (`model_type` picks the class). Defaults to SmolLM2-360M.
        pixel_shuffle_factor (`int`, defaults to 4):
            An n×n patch grid becomes (n/s)² image tokens of s²·D channels.
        max_grid (`int`, defaults to 8):
            Largest number of tile rows or columns of an image: the tokenizer holds `<row_i_col_j>` tokens up to it,
            and `NanoVLMProcessor.from_config` tiles up to it.
        image_token_id (`int`, *optional*):
            Id of the image-feature token in the text vocabulary (set by the tokenizer builder).
        tie_word_embeddings (`bool`, *optional*):
            Tie `lm_head` to the input embeddings; defaults to the text config's value.
        image_mean, image_std (`list[float]`, *optional*):
            The image processor's normalisation (R, G, B), applied by the model to uint8 `pixel_values` (training
            tiles stay uint8 until the device); float `pixel_values` are used as given. Default SigLIP's 0.5/0.5;
            mean 0 and std 1 when the processor does not normalise. Training sets them from its processor.
        vision_sincos_position_scale (`float`, *optional*):
            At initialisation, the vision tower's learned position embeddings start as this scale x a 2-D sin-cos
            grid (MAE's) instead of SigLIP's random normal; they stay trainable. None (default): SigLIP's init.
            Weights loaded by `from_pretrained` are kept. The demo recipe uses 2.0.

    Example:
    ```python
    >>> from nanovlm import NanoVLMConfig, NanoVLMForConditionalGeneration
    >>> model = NanoVLMForConditionalGeneration(NanoVLMConfig())  # random init, 460M parameters
    ```
    """

    model_type = "nanovlm"
    _SUB_DEFAULTS = {"vision_config": ("siglip_vision_model", SIGLIP2_B16_512), "text_config": ("llama", SMOLLM2_360M)}
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            key: SubConfigSpec(config_class=AutoConfig, model_type=model_type_, init_kwargs=kwargs_)
            for key, (model_type_, kwargs_) in _SUB_DEFAULTS.items()
        }
    else:
        sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    pixel_shuffle_factor: int = 4
    max_grid: int = 8
    image_token_id: int | None = None
    tie_word_embeddings: bool | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    vision_sincos_position_scale: float | None = None

    def __post_init__(self, **kwargs):
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (dict, PreTrainedConfig)):
                raise TypeError(f"`{key}` must be None, a dict or a PreTrainedConfig, got {type(value).__name__}.")
            if isinstance(value, dict):  # before transformers builds it: its own checks raise a two-line error
                check_sub_config_sizes(key, value)
            if SubConfigSpec is None and not isinstance(value, PreTrainedConfig):
                # what transformers >= 5.23 does from `sub_configs_defaults` inside its own __post_init__
                from transformers.models.auto.configuration_auto import CONFIG_MAPPING

                default_type, default_kwargs = self._SUB_DEFAULTS[key]
                value = dict(default_kwargs) if value is None else dict(value)
                setattr(self, key, CONFIG_MAPPING[value.get("model_type", default_type)](**value))
        super().__post_init__(**kwargs)
        if self.vision_config.model_type not in SUPPORTED_VISION_MODEL_TYPES:
            raise TypeError(
                f"`vision_config` must be a SigLIP vision config (model_type in {SUPPORTED_VISION_MODEL_TYPES}), got "
                f"{type(self.vision_config).__name__} (model_type={self.vision_config.model_type!r}). For a full "
                "SigLIP/SigLIP2 checkpoint pass its `.vision_config`."
            )
        # The pooling head is unused; keeping it breaks DDP (unused parameters) and wastes memory.
        self.vision_config.vision_use_head = False
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is None:
                setattr(self, key, [0.5, 0.5, 0.5])  # SigLIP's, as the image processor's default
            elif not (isinstance(value, (list, tuple)) and len(value) == 3):
                raise ValueError(f"`{key}` must be three numbers (R, G, B), got {value!r}.")
            else:
                setattr(self, key, [float(v) for v in value])
        if min(self.image_std) <= 0:
            raise ValueError(f"`image_std` must be positive, got {self.image_std}.")
        self.validate_sizes()

    def validate_sizes(self) -> None:
        """Cross-field checks; raises ValueError naming the fields, their values and the fix."""
        check_sub_config_sizes("vision_config", self.vision_config)
        check_sub_config_sizes("text_config", self.text_config)
        vc = self.vision_config
        s = self.pixel_shuffle_factor
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"`pixel_shuffle_factor` must be a positive int, got {s!r}.")
        if not isinstance(self.max_grid, int) or isinstance(self.max_grid, bool) or self.max_grid < 1:
            raise ValueError(f"`max_grid` must be a positive int, got {self.max_grid!r}.")
        if vc.image_size % vc.patch_size != 0:
            raise ValueError(
                f"vision_config.image_size ({vc.image_size}) must be a multiple of vision_config.patch_size "
                f"({vc.patch_size}); choose an image size of k*{vc.patch_size}."
            )
        grid = vc.image_size // vc.patch_size
        if grid % s != 0:
            raise ValueError(
                f"The patch grid ({grid}x{grid} = image_size {vc.image_size} / patch_size {vc.patch_size}) must be "
                f"divisible by pixel_shuffle_factor ({s}); use a factor that divides {grid}."
            )
        scale = self.vision_sincos_position_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"`vision_sincos_position_scale` must be a number > 0 or None, got {scale!r}.")
        if scale is not None and vc.hidden_size % 4:
            raise ValueError(
                f"`vision_sincos_position_scale` needs vision_config.hidden_size divisible by 4 (sin and cos of rows "
                f"and columns), got {vc.hidden_size}; set vision_sincos_position_scale None or change hidden_size."
            )
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id ({self.image_token_id}) is outside the text vocabulary (vocab_size "
                f"{self.text_config.vocab_size}); build the tokenizer first and resize the embeddings."
            )

    @property
    def tile_size(self) -> int:
        """Side of one square image tile in pixels (the vision tower's input resolution)."""
        return self.vision_config.image_size

    @property
    def image_seq_len(self) -> int:
        """Number of image tokens one tile becomes after the pixel shuffle."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return (grid // self.pixel_shuffle_factor) ** 2


__all__ = ["NanoVLMConfig"]
