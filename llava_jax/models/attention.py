"""Attention: one entry point (`attention`), three implementations chosen by backend and shape.

`choose_attention` picks one per call site (pure, unit-tested); `AttentionMask` carries the choice
and the mask in the form that implementation takes. Also the head reshapes the towers share.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# `jax.nn.dot_product_attention` without `implementation` is always the XLA path in jax 0.10-0.12
# (its docstring: "defaults to None, which currently falls back to xla"): it materialises the
# [B, N, T, S] scores in float32. The fused kernels never do:
#   cudnn   cuDNN flash attention (GPU), `jax.nn.dot_product_attention(implementation="cudnn")`;
#           causal through `is_causal`, padding through per-row lengths: right padding as it is,
#           any other contiguous run (the engine's left-padded prompts) rotated to the front first.
#           It takes no segment ids: packed rows take the XLA path on a GPU (see `choose_attention`).
#   splash  Pallas splash attention (TPU); causal or full block-sparse mask, padding and packed
#           rows through segment ids (`SegmentIds(q, kv)`: padding is segment 0); run in Pallas
#           interpret mode when asked for on a CPU (tests).
#   xla     the dense reference: any mask, any dtype, a KV cache. Parity tests run it on CPU.
#
# Packed rows (several samples a row, `segment_ids` [B, T]: 0 = padding, 1, 2, ... the samples in
# order, each one contiguous run) attend within their own segment: a query sees the keys of its
# segment up to itself and nothing of the segments before it.

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
_KERNEL_BY_PLATFORM = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("llava_jax_target_platform", default=None)
_logged: set[str] = set()
log = logging.getLogger("llava_jax.attention")


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Trace for `platform` ("cpu", "gpu", "tpu") instead of the default backend.

    Ahead-of-time compilation for a TPU topology traces on a CPU host: the attention choice must
    follow the devices the program is compiled for (`parallel.partition.jit_sharded` sets this
    from its mesh), not the host's backend.
    """
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform being traced for: `target_platform`'s, else JAX's default backend."""
    platform = _PLATFORM.get() or jax.default_backend()
    return "gpu" if platform == "cuda" else platform


def choose_attention(
    requested: str,
    *,
    platform: str,
    dtype,
    head_dim: int,
    decoding: bool,
    packed: bool = False,
) -> tuple[str, str]:
    """(implementation, why) for one attention call site; pure, so that the table is unit-tested.

    Args:
      requested: the config's `attention`: auto | xla | cudnn | splash. An explicit kernel is used
        wherever it applies and XLA elsewhere (a config covers training and decoding alike); asking
        for a kernel the platform cannot run is an error.
      platform: "cpu", "gpu" or "tpu" (see `current_platform`).
      dtype: the compute dtype of q, k, v.
      head_dim: H.
      decoding: whether the queries are decode steps that attend over a KV cache window (a
        prefill into an empty cache attends over its own keys, so the kernels apply to it).
      packed: whether rows hold several samples told apart by segment ids (training on packed rows).
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention={requested!r}; expected one of {ATTENTION_IMPLS}")
    if requested == "xla":
        return "xla", "requested in the config"
    if requested == "cudnn" and platform != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU; this program is traced for {platform!r} "
                         "(use attention='auto' or 'xla')")
    if requested == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"attention='splash' is a TPU kernel; this program is traced for {platform!r}")
    kernel = _KERNEL_BY_PLATFORM.get(platform) if requested == "auto" else requested
    if kernel is None:
        return "xla", f"no fused attention kernel on {platform}"
    if decoding:
        return "xla", f"{kernel} takes no KV-cache offset (decode steps attend over the cache window)"
    if kernel == "cudnn":
        if packed:
            # jax.nn.dot_product_attention (jax 0.10-0.12) takes per-row lengths only. jax's private
            # cuDNN wrapper (jax._src.cudnn.fused_attention_stablehlo) takes per-segment lengths and
            # offsets [B, M+1], but it is not public API: not relied on here.
            return "xla", ("packed rows: jax.nn.dot_product_attention's cuDNN kernel takes per-row lengths, "
                           "not segment ids")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "xla", f"cuDNN flash attention takes bfloat16/float16, the compute dtype is {jnp.dtype(dtype).name}"
        if head_dim % 8 or head_dim > 128:
            return "xla", f"cuDNN flash attention takes head dims <= 128 in multiples of 8, not {head_dim}"
        return "cudnn", "GPU"
    if platform == "cpu":
        return "splash", "requested; Pallas interpret mode on CPU (slow: for tests)"
    return "splash", "TPU"


def resolve_attention(requested: str, where: str, **kw) -> str:
    """`choose_attention` for the platform being traced, logged once per distinct decision."""
    impl, why = choose_attention(requested, platform=current_platform(), **kw)
    message = f"attention in the {where}: {impl} ({why})"
    if message not in _logged:
        _logged.add(message)
        log.info(message)
    return impl


@flax.struct.dataclass
class AttentionMask:
    """What each query may attend to, in the form the chosen implementation takes.

    `impl` and `causal` are static (part of the tree structure), so the object passes through
    jit, remat and scan like an array argument.
    """

    impl: str = flax.struct.field(pytree_node=False)  # xla | cudnn | splash (resolved)
    causal: bool = flax.struct.field(pytree_node=False)
    dense: jax.Array | None = None  # [B, 1, T, S] bool, True = attend (xla)
    tokens: jax.Array | None = None  # [B, S] int, 1 = a real token (fused kernels; queries are the same slots)
    # cudnn: whether every row is its tokens then padding (training and evaluation batches). If not,
    # each row's tokens must be one contiguous run (left-padded prompts): it is rotated to the front.
    right_padded: bool = flax.struct.field(pytree_node=False, default=True)
    # Sliding window of the fused kernels (with `causal`): query slot i sees key slots j > i - window,
    # transformers' definition. The dense mask of the XLA path carries its window itself.
    window: int | None = flax.struct.field(pytree_node=False, default=None)
    # Packed rows (splash and the XLA fallback of a fused mask): [B, S] int, 0 = padding, 1, 2, ... a
    # row's samples, each a contiguous run; a query sees keys of its own segment only. The fused
    # kernels' causal mask and window count slots, which within a contiguous segment are positions.
    segments: jax.Array | None = None


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    mask: AttentionMask | jax.Array | None,  # or a dense [B, 1, T, S] bool (True = attend)
) -> jax.Array:  # [B, T, N, H]
    """Scaled dot-product attention with grouped KV heads, by the implementation `mask.impl` names.

    A bare array or None is the XLA path with that dense mask. The XLA path does the softmax in
    float32; the fused kernels accumulate in float32 too.
    """
    if not isinstance(mask, AttentionMask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if mask.impl == "cudnn":
        if mask.segments is not None:
            raise ValueError("the cuDNN attention path takes no segment ids "
                             "(choose_attention picks xla for packed rows)")
        kernel = functools.partial(_cudnn, causal=mask.causal, window=mask.window)
        if mask.tokens is None:
            return kernel(q, k, v, None)
        if mask.right_padded:  # a row's tokens are its first `length` slots
            return kernel(q, k, v, jnp.sum(mask.tokens, axis=-1, dtype=jnp.int32))
        return via_right_padding(kernel, q, k, v, mask.tokens)
    if mask.impl == "splash":
        out = _splash_sharded(q, k, v, mask)
        if out is not None:
            return out
    dense = mask.dense
    if dense is None and (mask.causal or mask.tokens is not None):  # a fused mask, on the XLA path
        t, s = q.shape[1], k.shape[1]
        dense = jnp.ones((1, 1, t, s), bool)
        if mask.causal:
            dense = jnp.tril(dense)
        if mask.window is not None:
            dense = jnp.triu(dense, 1 - mask.window)  # key j > query i - window
        if mask.tokens is not None:
            dense = dense & mask.tokens.astype(bool)[:, None, None, :]
        if mask.segments is not None:
            dense = dense & same_segment(mask.segments)
    return jax.nn.dot_product_attention(q, k, v, mask=dense)


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: query slot i and key slot j hold the same segment (packed rows; padding,
    segment 0, sees only padding). AND it with the causal and padding mask."""
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def _cudnn(q, k, v, lengths, *, causal: bool, window: int | None = None, implementation: str | None = "cudnn"):
    """cuDNN flash attention; `lengths` [B]: each row's tokens are its first `length` slots.

    `window` is jax's `local_window_size` (window - 1, 0): keys [i - window + 1, i], cuDNN's
    sliding window. `implementation=None` runs the same call on XLA (the CPU test of this mapping).
    """
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, is_causal=causal,
                                        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        local_window_size=local)


def via_right_padding(kernel: Callable, q, k, v, tokens: jax.Array) -> jax.Array:
    """`kernel(q, k, v, lengths)` (right padding only) for rows whose tokens are one contiguous run
    anywhere in the row, e.g. left-padded prompts that all end in the last slot.

    Each row is rotated so that its run starts at slot 0, the kernel runs with per-row lengths, and
    the output is rotated back. Attention depends on the order of the keys only through the causal
    mask, which the rotation keeps within the run; positions are already in q and k (RoPE), so a row
    computes what it computes alone. The rotations are gathers of q, k, v and the output: memory
    traffic of the size of the activations, never of the [T, S] scores.
    """
    t = q.shape[1]
    real = tokens != 0
    first = jnp.argmax(real, axis=1).astype(jnp.int32)  # [B]: the run's first slot (0 for an empty row)
    slots = jnp.arange(t, dtype=jnp.int32)[None]
    take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)  # noqa: E731
    front = (slots + first[:, None]) % t  # row slot j <- slot first + j
    out = kernel(take(q, front), take(k, front), take(v, front), jnp.sum(real, axis=1, dtype=jnp.int32))
    return take(out, (slots - first[:, None]) % t)


SPLASH_BLOCKS = (512, 256, 128)  # tried in order; the sequence is padded to a multiple of 128


def _splash_sharded(q, k, v, mask: AttentionMask) -> jax.Array | None:
    """Splash attention, under `shard_map` over the batch and head axes of the current mesh.

    A Pallas kernel has no partitioning rule: under jit with sharded operands it would gather
    them whole onto every device, so it runs per shard (as MaxText does). Returns None (the
    caller takes the XLA path, logged) where the batch or heads do not split over the mesh.
    """
    interpret = current_platform() != "tpu"
    # Padding is a segment of its own (0): a real token attends only to its own segment's tokens.
    if mask.segments is not None:
        segments = mask.segments.astype(jnp.int32)
        if mask.tokens is not None:
            segments = jnp.where(mask.tokens != 0, segments, 0)
    elif mask.tokens is not None:
        segments = (mask.tokens != 0).astype(jnp.int32)
    else:
        segments = jnp.ones(q.shape[:2], jnp.int32)
    fn = functools.partial(_splash, causal=mask.causal, interpret=interpret, window=mask.window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segments)
    from jax.sharding import PartitionSpec as P

    batch_axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
    head_axes = nn.logical_to_mesh_axes(("heads",))[0]

    def size(axes):
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        return math.prod(mesh.shape[a] for a in axes)

    if q.shape[0] % size(batch_axes) or q.shape[2] % size(head_axes) or k.shape[2] % size(head_axes):
        message = (f"attention: splash falls back to xla: batch {q.shape[0]} / heads {q.shape[2]} / kv heads "
                   f"{k.shape[2]} do not split over mesh axes {batch_axes} x {head_axes}")
        if message not in _logged:
            _logged.add(message)
            log.info(message)
        return None
    qkv = P(batch_axes, None, head_axes, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segments)


def _splash_kernel(num_heads: int, length: int, causal: bool, interpret: bool, window: int | None = None):
    """The kernel for one shard's shapes. Its block-mask tables are built by splash's own cached
    `process_mask` (numpy) and staged into the current trace, so a kernel is never reused across
    traces (its arrays would be tracers of the first)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    if window is not None:  # causal and at most window - 1 slots back: keys j > i - window
        head_mask = sa.LocalMask((length, length), window_size=(window - 1, 0 if causal else None), offset=0)
    else:
        head_mask = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    # "context" names the kernel's residuals (output, logsumexp) for the *_with_context remat policies.
    return sa.make_splash_mha(sa.MultiHeadMask([head_mask] * num_heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, residual_checkpoint_name="context", interpret=interpret)


def _splash(q, k, v, segments, *, causal: bool, interpret: bool, window: int | None = None) -> jax.Array:
    """Splash attention on one shard: q [B, T, N, H], k/v [B, T, K, H], segments [B, T] int
    (0 = padding; one segment of real tokens, or a packed row's samples 1, 2, ...).

    A query attends only to keys of its own segment, so padding (segment 0) is invisible to real
    tokens whatever side it is on. The sequence is padded to a multiple of 128 the same way (CLIP's 577).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t = q.shape[1]
    length = -(-t // 128) * 128
    if length != t:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segments = pad(q), pad(k), pad(v), pad(segments)
    # The kernel takes [N, T, H] per example and does not scale the logits.
    q = jnp.swapaxes(q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype), 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    kernel = _splash_kernel(q.shape[1], length, causal, interpret, window)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(q, k, v, segments)
    return jnp.swapaxes(out, 1, 2)[:, :t]


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    return x.reshape(*x.shape[:-2], -1)
