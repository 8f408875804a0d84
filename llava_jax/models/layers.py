"""Layers shared by the towers: dense layers with logical axis names, torch-exact norms, activations by name."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.lora import LoraDense

Dtype = jnp.dtype

INIT_STD = 0.02


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    lora=None,
) -> nn.Dense:
    """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names for sharding.

    With `lora` (a `models.lora.LoraSpec`) it also carries a LoRA adapter (`lora_a`, `lora_b`).
    """
    cls, extra = (nn.Dense, {}) if lora is None else (LoraDense, dict(lora=lora, kernel_axes=tuple(axes)))
    return cls(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
        **extra,
    )


def layer_norm(eps: float, axis_name: str, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with torch semantics (biased variance, eps inside the sqrt); statistics in float32."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: computed in float32, cast back, then scaled (the order HF uses)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * h.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    """erf GELU, as torch.nn.GELU(); flax's nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """SigLIP's activation (transformers' gelu_pytorch_tanh): GELU with torch's tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
    "silu": jax.nn.silu,
}
