"""llava_jax: LLaVA (CLIP ViT + projector + LLaMA) in JAX/Flax, numerically identical to transformers.

The names below are imported on first use, so that `import llava_jax.data...` (what Grain's
worker processes do) does not import jax, flax or the models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LlavaConfig": "llava_jax.config",
    "TextConfig": "llava_jax.config",
    "VisionConfig": "llava_jax.config",
    "Llava": "llava_jax.models.llava",
    "LlavaModel": "llava_jax.models.llava",
    "LlavaOutput": "llava_jax.models.llava",
    "load_pretrained": "llava_jax.weights.load",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.models.llava import Llava, LlavaModel, LlavaOutput
    from llava_jax.weights.load import load_pretrained


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llava_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
