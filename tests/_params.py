"""Random float32 parameters of a config, drawn on the host (nothing compiled, unlike a jax.random
draw per shape): norm scales near 1, biases near 0 but not 0, matrices fan-in scaled, so that
logits sit far from ties (unlike init_params' small normal draws)."""

from __future__ import annotations

import jax
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.models.llava import abstract_params


def host_random_params(cfg: LlavaConfig, seed: int) -> dict:
    """Every parameter of `cfg` in its layout (stacked when `cfg.scan_layers`), as numpy float32."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        fan_in = x.shape[-2] if len(x.shape) >= 2 else 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))
