"""CLIP vision transformer (ViT-L/14 and any other size), as LLaVA uses it; its layers also serve SigLIP.

Only the layers up to `vision_feature_layer` are built and run: LLaVA never uses the last layer
or `post_layernorm`, so they cost neither memory nor time here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import VisionConfig
from llava_jax.models.attention import AttentionMask, attention, merge_heads, resolve_attention, split_heads
from llava_jax.models.layers import ACTIVATIONS, INIT_STD, dense, layer_norm
from llava_jax.models.stack import layer_stack, run_layers


class CLIPAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:  # [B, P, D]
        c = self.cfg
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(c.hidden_size, ("vision_embed", "vision_heads"), name="q_proj", **kw)(x)
        k = dense(c.hidden_size, ("vision_embed", "vision_heads"), name="k_proj", **kw)(x)
        v = dense(c.hidden_size, ("vision_embed", "vision_heads"), name="v_proj", **kw)(x)
        q, k, v = (split_heads(t, c.num_heads) for t in (q, k, v))
        out = merge_heads(attention(q, k, v, mask))
        return dense(c.hidden_size, ("vision_heads", "vision_embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(c.intermediate_size, ("vision_embed", "vision_mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[c.hidden_act](h)
        return dense(c.hidden_size, ("vision_mlp", "vision_embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """A pre-norm ViT layer; SigLIP's is the same (models/siglip.py uses this one)."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> tuple[jax.Array, None]:  # [N, 1+P, D], the carry
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(c.layer_norm_eps, "vision_embed", name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(c, name="self_attn", **kw)(h, mask)
        h = layer_norm(c.layer_norm_eps, "vision_embed", name="layer_norm2", **kw)(x)
        return x + CLIPMLP(c, name="mlp", **kw)(h), None


def patch_embedding(c: VisionConfig, *, use_bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.Conv:
    """The patch projection (torch's Conv2d with stride = kernel = patch), kernel HWIO and bias with logical names."""
    return nn.Conv(
        c.hidden_size,
        kernel_size=(c.patch_size, c.patch_size),
        strides=(c.patch_size, c.patch_size),
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, None, None, "vision_embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vision_embed",)),
        name="patch_embedding",
    )


class CLIPEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [N, H, W, C] -> [N, 1+P, D]
        c = self.cfg
        patches = patch_embedding(c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(
            pixel_values.astype(self.dtype)
        )
        n = patches.shape[0]
        patches = patches.reshape(n, -1, c.hidden_size)  # row-major over (h, w), as torch's flatten(2)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vision_embed",)),
            (c.hidden_size,),
            self.param_dtype,
        )
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "vision_embed")),
            (c.num_patches + 1, c.hidden_size),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)[None]


class CLIPVisionTower(nn.Module):
    """Returns HF's `hidden_states[num_layers_run]`: index 0 is the embeddings after `pre_layrnorm`.

    Attributes:
      num_layers_run: how many encoder layers to run (LLaVA's -2 on a 24-layer tower is 23).
      scan_layers: one scanned module over stacked parameters (`layers`), else `layers_0 ...`.
    """

    cfg: VisionConfig
    num_layers_run: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"  # auto | xla | cudnn | splash (models/attention.py: choose_attention)
    # What a subclass changes (class attributes, not fields): SigLIP's embeddings, without the pre-layernorm.
    EMBEDDINGS = CLIPEmbeddings
    PRE_NORM = True

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [N, H, W, C] -> [N, 1+P, D] (SigLIP: [N, P, D])
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self.EMBEDDINGS(c, name="embeddings", **kw)(pixel_values)
        if self.PRE_NORM:
            x = layer_norm(c.layer_norm_eps, "vision_embed", name="pre_layrnorm", **kw)(x)
        # Every patch sees every patch: no mask, no padding (577 tokens at 336 px, SigLIP's 729 at 384).
        mask = AttentionMask(resolve_attention(self.attention, "vision tower", dtype=self.dtype, head_dim=c.head_dim,
                                               decoding=False), causal=False)
        layers = layer_stack(CLIPEncoderLayer, self.num_layers_run, scan=self.scan_layers, remat=self.remat, cfg=c, **kw)
        return run_layers(layers, x, mask)
