"""nanovlm: the nanoVLM recipe as a Hugging Face-native package.

Importing it registers the "nanovlm" model type with transformers' auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoModelForCausalLM, AutoImageProcessor, AutoProcessor) and marks the classes for
`trust_remote_code` export, so a saved checkpoint loads in a process that never imports nanovlm. It also registers
the attention implementation "torch_varlen" (nanovlm/attention.py: packed samples through PyTorch's varlen kernel).
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

from . import attention  # noqa: F401  (registers attn_implementation="torch_varlen" with transformers)
from .configuration_nanovlm import NanoVLMConfig
from .image_processing_nanovlm import NanoVLMImageProcessor
from .modeling_nanovlm import NanoVLMForConditionalGeneration, NanoVLMModel, NanoVLMPreTrainedModel
from .processing_nanovlm import NanoVLMProcessor
from .tokenizer import extend_tokenizer, train_tokenizer

__version__ = "0.1.0"

AutoConfig.register(NanoVLMConfig.model_type, NanoVLMConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto.register(NanoVLMConfig, NanoVLMForConditionalGeneration, exist_ok=True)
# One class for both backend keys: it needs no torchvision, and transformers asks for the "torchvision" backend
# whenever torchvision is installed, so with only "pil" registered every load warned "Requested torchvision backend
# is not available. Falling back to pil backend." (misleading: nothing was requested and torchvision is there).
AutoImageProcessor.register(
    NanoVLMConfig, image_processor_classes={"pil": NanoVLMImageProcessor, "torchvision": NanoVLMImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(NanoVLMConfig, NanoVLMProcessor, exist_ok=True)

NanoVLMConfig.register_for_auto_class()
NanoVLMForConditionalGeneration.register_for_auto_class("AutoModel")
NanoVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
NanoVLMProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "NanoVLMConfig",
    "NanoVLMForConditionalGeneration",
    "NanoVLMModel",
    "NanoVLMPreTrainedModel",
    "NanoVLMImageProcessor",
    "NanoVLMProcessor",
    "extend_tokenizer",
    "train_tokenizer",
]
