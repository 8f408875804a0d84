"""LoRA (low-rank adapters) inside the language model's Linear layers, as peft computes them.

A targeted Dense keeps its `kernel` (and `bias`) and gains `lora_a` [in, r] and `lora_b` [r, out]
beside it: `y = x W + b + ((dropout(x) A) B) * scale`, `scale = alpha / r` (`alpha / sqrt(r)` with
rsLoRA), in peft's order. A starts like peft's (Kaiming uniform), B at zero, so a fresh adapter
changes nothing. A and B carry the logical axes of their base kernel's input and output (and
`lora_rank`), so they shard like it over the mesh (parallel/rules.py). Dropout runs only when the
caller passes a `dropout` rng (training); inference never does.

The merged weight is `W + scale * A B`; `merge` folds an adapter into the kernels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp

# The spec is configuration (config.py, the bottom layer); re-exported here for the model code.
from llava_jax.config import DECODER_LINEARS, LoraSpec  # noqa: F401

LORA_A, LORA_B = "lora_a", "lora_b"


def for_module(spec: LoraSpec | None, module: str) -> LoraSpec | None:
    """The spec for one of a decoder layer's Linear layers (`self_attn/q_proj` ...), None if untargeted."""
    return spec if spec is not None and module in spec.targets else None


def lora_a_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """peft's init of lora_A (torch's kaiming_uniform_ with a=sqrt(5)): U(+-1/sqrt(in)) on our [.., in, r]."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Dense):
    """`nn.Dense` (same `kernel`/`bias`, same computation) plus a LoRA branch."""

    lora: LoraSpec | None = None
    kernel_axes: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        s = self.lora
        a = self.param(LORA_A, nn.with_logical_partitioning(lora_a_init, (self.kernel_axes[0], "lora_rank")),
                       (inputs.shape[-1], s.rank), self.param_dtype)
        b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", self.kernel_axes[1])),
                       (s.rank, self.features), self.param_dtype)
        x = inputs.astype(self.dtype)
        if s.dropout > 0.0 and self.has_rng("dropout"):  # training only: inference passes no dropout rng
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - s.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - s.dropout, x.dtype), jnp.zeros_like(x))
        delta = jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype))
        return y + delta * jnp.asarray(s.scale, self.dtype)


def is_lora_path(path: tuple[str, ...]) -> bool:
    return path[-1] in (LORA_A, LORA_B)


def split(params: Any) -> tuple[dict, dict]:
    """(adapter leaves, everything else) of a nested parameter tree."""
    flat = tu.flatten_dict(params)
    lora = {k: v for k, v in flat.items() if is_lora_path(k)}
    rest = {k: v for k, v in flat.items() if not is_lora_path(k)}
    return tu.unflatten_dict(lora) if lora else {}, tu.unflatten_dict(rest)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * A B` in float32, for [.., in, r] x [.., r, out] (layers stacked or not)."""
    return scale * jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def merge(params: Any, spec: LoraSpec) -> dict:
    """The parameters with every adapter folded into its kernel (`W + scale A B`, summed in float32,
    stored in the kernel's dtype) and the adapter leaves removed: the base model's tree and dtypes."""
    flat = tu.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_lora_path(k)}
    for k, a in flat.items():
        if k[-1] != LORA_A:
            continue
        kernel_path = k[:-1] + ("kernel",)
        w = out[kernel_path]
        out[kernel_path] = (jnp.asarray(w, jnp.float32) + delta(a, flat[k[:-1] + (LORA_B,)], spec.scale)).astype(w.dtype)
    return tu.unflatten_dict(out)
