"""Vision-to-language projectors, registered by name: the one place that knows them.

A new projector is one factory decorated with `register_projector(pattern)`, building a module whose
parameters are Dense layers (`kernel` [in, out], `bias` [out]) directly under it, named as it likes.
The checkpoint mapping (`<name>.weight` / `<name>.bias` under the projector's prefix), the FLOP count
and config validation read those names off the module the factory builds (`projector_linears`), so
nothing else needs to change. The built-in MLPs name theirs `linear_1 ... linear_N`, as transformers
does; in the original LLaVA's checkpoints (which hold only its own types, `linear` and `mlpNx_gelu`)
Linear N sits at index 2(N-1) of an nn.Sequential.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.layers import dense, gelu_exact


class MLPProjector(nn.Module):
    """`depth` Linear layers with exact GELU between them (depth 1 is LLaVA v1's `linear`)."""

    out_features: int
    depth: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., Dv] -> [..., D]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = gelu_exact(x)
            in_axis = "vision_embed" if i == 1 else "proj_mlp"
            out_axis = "embed" if i == self.depth else "proj_mlp"
            x = dense(self.out_features, (in_axis, out_axis), name=f"linear_{i}", **kw)(x)
        return x


class IdentityProjector(nn.Module):
    """No projection: the vision width must equal the language width."""

    out_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.out_features:
            raise ValueError(f"identity projector needs equal widths, got vision {x.shape[-1]} vs text {self.out_features}")
        return x


_REGISTRY: list[tuple[re.Pattern, Callable[..., nn.Module]]] = []


def register_projector(pattern: str):
    """Register a factory `(match, out_features, **kw) -> nn.Module` for names matching `pattern`."""

    def wrap(factory):
        _REGISTRY.append((re.compile(pattern), factory))
        return factory

    return wrap


@register_projector(r"^identity$")
def _identity(m, out_features, **kw):
    return IdentityProjector(out_features, name=kw["name"])


@register_projector(r"^linear$")
def _linear(m, out_features, **kw):
    return MLPProjector(out_features, 1, **kw)


@register_projector(r"^mlp(\d+)x_gelu$")
def _mlp_gelu(m, out_features, **kw):
    return MLPProjector(out_features, int(m.group(1)), **kw)


def build_projector(
    projector_type: str, out_features: int, *, use_bias: bool, dtype, param_dtype, name: str = "projector"
) -> nn.Module:
    """The projector module registered for `projector_type` (`linear`, `identity`, `mlpNx_gelu`, ...)."""
    for pattern, factory in _REGISTRY:
        m = pattern.match(projector_type)
        if m:
            return factory(m, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown projector type {projector_type!r}; registered: {[p.pattern for p, _ in _REGISTRY]}")


@functools.lru_cache(maxsize=None)
def projector_linears(projector_type: str) -> tuple[str, ...]:
    """Names of the Dense layers of the registered projector, in the order the module creates them.

    Read off the module the factory builds (an abstract init: nothing is computed), so a new
    projector needs no other table. Raises ValueError for an unregistered type, or for a projector
    with a parameter outside a Dense layer directly under it (the mapping has names for those only).
    """
    width = 8  # any width: only the names matter (the identity projector needs equal widths)
    module = build_projector(projector_type, width, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32)
    created: list[str] = []

    def init():
        params = module.init(jax.random.key(0), jnp.zeros((1, width))).get("params", {})
        created.extend(params)  # creation order; eval_shape's output dict comes back sorted by name
        return params

    params = jax.eval_shape(init)
    bad = [n for n in created if not (isinstance(params[n], dict) and "kernel" in params[n]
                                      and set(params[n]) <= {"kernel", "bias"})]
    if bad:
        raise ValueError(f"projector {projector_type!r}: parameters {bad} are not Dense layers (kernel, bias) directly "
                         "under the projector, which is all the checkpoint mapping and the FLOP count know")
    return tuple(created)
