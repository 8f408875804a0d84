"""Weight-only int8 for decoding: the language model's Linear kernels stored as int8 with one
float32 scale per output channel (symmetric, absmax / 127), dequantised inside the matmul.

    y = x @ (q * s) + b  computed as  (x @ q.astype(dtype)) * s + b

which is the same product (the scale is per output column), so the kernel crosses memory as int8
(half of bf16's bytes: decode at batch 1 reads every weight once per token). No model code
changes: `quantize_params` adds a `kernel_scale` beside each quantised kernel, and
`int8_matmuls()` intercepts `nn.Dense.__call__` of the modules that have one (Flax method
interception), at trace time. The vision tower, projector, embeddings and norms stay as they are.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCALE = "kernel_scale"
# The language model's Linear layers: attention and MLP projections, and the untied LM head.
QUANTISED = re.compile(r"language_model/(layers(_\d+)?/(self_attn|mlp)/\w+_proj|lm_head)$")


def quantize_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., in, out] float -> (int8 [..., in, out], float32 scale [..., out]), per output channel."""
    w = np.asarray(kernel, np.float32)
    scale = np.abs(w).max(axis=-2) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def _map_quantised(params: Any, fn) -> Any:
    """The tree with each QUANTISED node's kernel replaced by `fn(kernel)` = (kernel, scale)."""

    def walk(node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node
        if "kernel" in node and QUANTISED.search(path) and "lora_a" not in node:
            q, s = fn(node["kernel"])
            return {**node, "kernel": q, SCALE: s}
        return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}

    return walk(params, "")


def quantize_params(params: Any) -> Any:
    """The same tree with every QUANTISED kernel int8 and its `kernel_scale` beside it."""
    return _map_quantised(params, lambda k: tuple(map(jnp.asarray, quantize_kernel(jax.device_get(k)))))


def abstract_quantized(params: Any) -> Any:
    """`quantize_params` on shapes (`jax.ShapeDtypeStruct` leaves): what an int8 engine holds."""
    return _map_quantised(params, lambda k: (jax.ShapeDtypeStruct(k.shape, jnp.int8),
                                             jax.ShapeDtypeStruct(k.shape[:-2] + k.shape[-1:], jnp.float32)))


def _int8_dense(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) is not nn.Dense or not module.has_variable("params", SCALE):
        return next_fun(*args, **kwargs)
    (x,) = args
    dtype = module.dtype or x.dtype
    kernel = module.get_variable("params", "kernel")  # int8 [in, out]
    scale = module.get_variable("params", SCALE)  # float32 [out]
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    y = y * scale.astype(dtype)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


def int8_matmuls(enabled: bool = True):
    """While tracing, Dense layers with a `kernel_scale` multiply by their int8 kernel (see above)."""
    return nn.intercept_methods(_int8_dense) if enabled else contextlib.nullcontext()
