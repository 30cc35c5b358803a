"""nanovlm: the nanoVLM recipe as a Hugging Face-native package.

Importing it registers the "nanovlm" model type with transformers' auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoModelForCausalLM, AutoImageProcessor, AutoProcessor) and marks the classes for
`trust_remote_code` export, so a saved checkpoint loads in a process that never imports nanovlm.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_nanovlm import NanoVLMConfig
from .image_processing_nanovlm import NanoVLMImageProcessor
from .modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMPreTrainedModel
from .processing_nanovlm import NanoVLMProcessor
from .tokenizer import extend_tokenizer, train_tokenizer

__version__ = "0.1.0"

AutoConfig.register(NanoVLMConfig.model_type, NanoVLMConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto.register(NanoVLMConfig, NanoVLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(NanoVLMConfig, image_processor_classes={"pil": NanoVLMImageProcessor}, exist_ok=True)
AutoProcessor.register(NanoVLMConfig, NanoVLMProcessor, exist_ok=True)

NanoVLMConfig.register_for_auto_class()
NanoVLMForConditionalGeneration.register_for_auto_class("AutoModel")
NanoVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
NanoVLMProcessor.register_for_auto_class("AutoProcessor")


def build_processor(tokenizer, config: NanoVLMConfig, **image_processor_kwargs) -> NanoVLMProcessor:
    """A processor whose tile size and image-token count match `config`; kwargs go to NanoVLMImageProcessor
    (`max_image_size`, `max_grid`, `upscale`, `do_normalize`, `global_image_position`, ...)."""
    image_processor_kwargs.setdefault("tile_size", config.tile_size)
    max_grid = image_processor_kwargs.setdefault("max_grid", 8)
    image_processor_kwargs.setdefault("max_image_size", config.tile_size * min(max_grid, max(1, 2048 // config.tile_size)))
    image_processor = NanoVLMImageProcessor(**image_processor_kwargs)
    return NanoVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=config.image_seq_len)


__all__ = [
    "NanoVLMConfig",
    "NanoVLMForConditionalGeneration",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMImageProcessor",
    "NanoVLMProcessor",
    "build_processor",
    "extend_tokenizer",
    "train_tokenizer",
]
