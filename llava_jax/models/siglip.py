"""SigLIP vision transformer (SigLIP-SO400M/14-384 and any other size), as LLaVA-OneVision uses it.

The encoder layer is CLIP's (models/clip.py); the embeddings differ: the patch projection has a bias,
there is no class token and no layer norm before the layers. Only the layers up to
`vision_feature_layer` are built and run: `post_layernorm` and the attention-pooling `head` come
after the hidden states LLaVA reads, so they are never built (weights/mapping.py skips them on load).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import VisionConfig
from llava_jax.models.clip import CLIPVisionTower, patch_embedding
from llava_jax.models.layers import INIT_STD


class SiglipEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [N, H, W, C] -> [N, P, D]
        c = self.cfg
        patches = patch_embedding(c, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)(
            pixel_values.astype(self.dtype)
        )
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # row-major over (h, w), as torch's flatten(2)
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "vision_embed")),
            (c.num_positions, c.hidden_size),
            self.param_dtype,
        )
        return patches + pos.astype(self.dtype)[None]


class SiglipVisionTower(CLIPVisionTower):
    """Returns HF's `hidden_states[num_layers_run]`: index 0 is the embeddings (patches + positions).

    CLIP's tower (its fields, encoder layers and attention) over SigLIP's embeddings, with no pre-layernorm.

    Attributes:
      num_layers_run: how many encoder layers to run (OneVision: all 26 of the tower transformers keeps).
      scan_layers: one scanned module over stacked parameters (`layers`), else `layers_0 ...`.
    """

    EMBEDDINGS = SiglipEmbeddings
    PRE_NORM = False
