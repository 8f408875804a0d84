"""llava_jax: LLaVA (CLIP ViT + projector + LLaMA) in JAX/Flax, numerically identical to transformers."""

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import Llava, LlavaModel, LlavaOutput
from llava_jax.weights.hf import load_pretrained

__all__ = ["LlavaConfig", "TextConfig", "VisionConfig", "Llava", "LlavaModel", "LlavaOutput", "load_pretrained"]
