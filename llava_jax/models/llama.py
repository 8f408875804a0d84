"""LLaMA-family decoder (Llama 1/2/3, Vicuna, Yi, Mistral, Qwen2) with an explicit KV cache.

One decoder for every family: the differences are `TextConfig` fields it reads (q/k/v and o
biases, the MLP activation, a sliding attention window, tied embeddings), never a per-family copy.

The cache is an argument and a result, never hidden state, so that the decode step stays a pure
function at the jit boundary: `cache` is {"k", "v"}, each one stacked array [L, B, K, S, H] over
the L layers (kv heads before slots, so that the attention matmuls read it in place), and
`cache_index` the slot where the first of this call's T tokens is written. Each
layer writes its slice in place (scanned, the cache rides in the loop carry: no copy per layer).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llava_jax.config import TextConfig
from llava_jax.models.attention import (AttentionMask, attention, merge_heads, resolve_attention, same_segment,
                                        split_heads)
from llava_jax.models.layers import ACTIVATIONS, INIT_STD, RMSNorm, dense
from llava_jax.models.lora import LoraSpec, for_module
from llava_jax.models.stack import layer_stack, run_layers

Cache = dict[str, jax.Array]  # {"k", "v"}: [L, B, K, S, H] each


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies [H/2] for RoPE, with `linear` and `llama3` scaling as HF computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if cfg.rope_scaling is None:
        return inv
    s = dict(cfg.rope_scaling)
    kind = s["rope_type"]
    if kind == "linear":
        return (inv / s["factor"]).astype(np.float32)
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope type {kind!r} is not supported")


def rope_cos_sin(cfg: TextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for integer positions [B, T], computed in float32 then cast (as HF does)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on [B, T, N, H] (HF weight layout, so no q/k permutation is needed)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def write_cache(cache: jax.Array, kv: jax.Array, layer, cache_index) -> jax.Array:
    """`kv` [B, T, K, H] written into layer `layer` of a stacked cache [L, B, K, S, H]: a prefill
    (`cache_index` None) at slots 0 .. T-1, a decode step at slots `cache_index` .. + T-1, where
    `cache_index` is one slot for every row ([]) or a slot per row ([B]).

    A decode step writes one H-wide row per (row, kv head, slot): a scatter whose indices name L, B, K
    and S and whose window is H alone. On TPU a dynamic_update_slice of a [1, B, K, T, H] block (or a
    scatter with a [K, H] window) makes the compiler give the loop-carried cache a layout with B (or K)
    second-minor, to suit the small update, so the decode loop copies the whole donated cache into that
    layout on entry and back on exit: a second cache in temporaries (`tests/test_decode_tpu.py`). An
    H window fits the cache's row-major tiling (S, H), and the cache stays where it was donated. A slot
    past the cache's end is dropped (a dynamic_update_slice would clamp it onto the last slots).
    """
    kv = jnp.swapaxes(kv, 1, 2).astype(cache.dtype)  # [B, K, T, H]
    if cache_index is None:  # a prefill into a fresh cache: one block at slot 0
        return jax.lax.dynamic_update_slice(cache, kv[None], (layer, 0, 0, 0, 0))
    b, k, t, _ = kv.shape
    slots = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))[:, None, None] + jnp.arange(t)  # [B, 1, T]
    return cache.at[layer, jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], slots, :].set(kv, mode="drop")


class LlamaAttention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache, cache_index, layer):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dict(use_bias=c.qkv_has_bias, **kw)
        lora = lambda name: for_module(self.lora, f"self_attn/{name}")  # noqa: E731
        q = dense(c.num_heads * c.head_dim, ("embed", "heads"), name="q_proj", lora=lora("q_proj"), **qkv)(x)
        k = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), name="k_proj", lora=lora("k_proj"), **qkv)(x)
        v = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), name="v_proj", lora=lora("v_proj"), **qkv)(x)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        q = apply_rope(split_heads(q, c.num_heads), cos, sin)  # [B, T, N, H]
        k = apply_rope(split_heads(k, c.num_kv_heads), cos, sin)  # [B, T, K, H]
        v = split_heads(v, c.num_kv_heads)
        new_cache = None
        if cache is not None:  # this layer's slice of the stacked cache [L, B, K, S, H], written in place
            new_cache = {n: write_cache(cache[n], t, layer, cache_index) for n, t in (("k", k), ("v", v))}
        if cache is not None and cache_index is not None:  # a decode step: attend over the cache window
            # Read back as [B, S, K, H]: the transpose folds into the attention matmuls, whose batch
            # axes (B, K) lead in the cache layout, so no step copies the cache into another layout.
            k, v = (jnp.swapaxes(jax.lax.dynamic_index_in_dim(new_cache[n], layer, keepdims=False), 1, 2)
                    .astype(self.dtype) for n in "kv")
        out = merge_heads(checkpoint_name(attention(q, k, v, mask), "context"))
        out = dense(c.hidden_size, ("heads", "embed"), name="o_proj", lora=lora("o_proj"), use_bias=c.o_has_bias,
                    **kw)(out)
        return checkpoint_name(out, "out_proj"), new_cache


class LlamaMLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        lora = lambda name: for_module(self.lora, f"mlp/{name}")  # noqa: E731
        gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", lora=lora("gate_proj"), **kw)(x)
        up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", lora=lora("up_proj"), **kw)(x)
        gate, up = checkpoint_name(gate, "gate_proj"), checkpoint_name(up, "up_proj")
        act = ACTIVATIONS[c.hidden_act]
        down = dense(c.hidden_size, ("mlp", "embed"), name="down_proj", lora=lora("down_proj"), **kw)(act(gate) * up)
        return checkpoint_name(down, "down_proj")


class LlamaDecoderLayer(nn.Module):
    """One decoder layer; `carry` is (x [B, T, D], the stacked cache or None, this layer's index)."""

    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_index):
        x, cache, layer = carry
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, cache = LlamaAttention(c, name="self_attn", lora=self.lora, **kw)(h, cos, sin, mask, cache, cache_index, layer)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + LlamaMLP(c, name="mlp", lora=self.lora, **kw)(h)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return (x, cache, layer + 1), None


def attention_mask(kv_mask: jax.Array, num_queries: int, cache_index, window: int | None = None,
                   q_positions: jax.Array | None = None, k_positions: jax.Array | None = None) -> jax.Array:
    """Causal + padding mask [B, 1, T, S]: query t sits in slot cache_index + t and sees slots <= its own
    (`cache_index` a scalar, or [B]: a slot per row).

    With a sliding `window`, query position i also sees only key positions j > i - window
    (transformers' `sliding_window_overlay`), positions [B, T] and [B, S] as RoPE counts them.
    """
    q_slot = jnp.reshape(cache_index, (-1, 1)) + jnp.arange(num_queries)  # [1 or B, T]
    k_slot = jnp.arange(kv_mask.shape[1])
    causal = k_slot[None, None, :] <= q_slot[:, :, None]  # [1 or B, T, S]
    mask = causal[:, None] & kv_mask.astype(bool)[:, None, None, :]
    if window is not None:
        mask = mask & (k_positions[:, None, None, :] > q_positions[:, None, :, None] - window)
    return mask


def cache_positions(kv_mask: jax.Array) -> jax.Array:
    """Positions [B, S] of the tokens in a cache's slots: real tokens are counted in slot order (the
    engine's positions skip padding the same way); a padding slot's value is never read."""
    return jnp.cumsum(kv_mask.astype(jnp.int32), axis=1) - 1


class LlamaModel(nn.Module):
    """Embeddings, decoder stack, final norm and LM head. Logits come back in float32."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"  # auto | xla | cudnn | splash (models/attention.py: choose_attention)
    lora: LoraSpec | None = None  # adapters in the decoder layers' Linear layers (models/lora.py)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
            name="embed_tokens",
            **kw,
        )
        self.layers = layer_stack(LlamaDecoderLayer, c.num_layers, scan=self.scan_layers, remat=self.remat, cfg=c,
                                  lora=self.lora, **kw)
        self.norm = RMSNorm(c.rms_norm_eps, name="norm", **kw)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        # The lookup reads whole rows: gather the FSDP-split width first (as FSDP does for every
        # weight), so that the partitioner can keep the output split by rows.
        table = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None)).astype(self.dtype)
        x = jnp.take(table, input_ids, axis=0)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def __call__(
        self,
        inputs_embeds: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int
        kv_mask: jax.Array,  # [B, S] 1 = a real token in that slot (S = T without cache)
        cache: Cache | None = None,
        cache_index: jax.Array | int | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        segment_ids: jax.Array | None = None,  # [B, T] int: packed rows (0 = padding, 1, 2, ... each sample)
    ) -> tuple[jax.Array, Cache | None]:  # logits [B, T, V] float32 ([B, 1, V] with last_only)
        """Logits and the updated cache.

        With a cache and `cache_index` None, this is a prefill into an empty cache: the T prompt
        slots are written at slot 0 and the prompt attends over its own keys, so the fused kernels
        apply (prompts are left-padded there: cuDNN rotates each row, splash takes any padding).
        With `cache_index` (a traced scalar), the T queries are decode steps written at that slot,
        attending over every slot of the cache window (the XLA path, `kv_mask` [B, S]); a [B] `cache_index`
        (T = 1) writes each row at its own slot (rows of a batch at different lengths: the slot engine).

        `last_only` runs the head on the last position alone: a
        prefill needs no more, and the full float32 [B, T, V] logits of a long prompt would cost more
        memory than the rest of it (left-padded prompts all end in the last column). `hidden_only`
        returns the final-norm hidden states [B, T, D] instead, for a loss that runs the head on a
        few positions at a time (`logits`).

        `segment_ids` (no cache): rows packed with several samples, each a contiguous run of slots whose
        `positions` restart at 0; a token attends only to its own sample's tokens, so each sample gets
        the logits it gets alone. `kv_mask` must be `segment_ids != 0`. XLA ANDs the dense mask with
        "same segment", splash takes the ids as `SegmentIds`, and on a GPU packed rows take XLA (the
        cuDNN kernel of `jax.nn.dot_product_attention` takes no segments; logged once)."""
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training and scoring without a KV cache")
        x = inputs_embeds.astype(self.dtype)
        cos, sin = rope_cos_sin(self.cfg, positions, self.dtype)
        t = x.shape[1]
        decoding = cache is not None and cache_index is not None
        impl = resolve_attention(self.attention, "language model", dtype=self.dtype, head_dim=self.cfg.head_dim,
                                 decoding=decoding, packed=segment_ids is not None)
        window = self.cfg.sliding_window
        if decoding:  # the cached keys' positions are not at hand: count them from the slots that hold tokens
            dense_mask = attention_mask(kv_mask, t, cache_index, window, positions, cache_positions(kv_mask))
            mask = AttentionMask(impl, causal=True, dense=dense_mask)
        elif impl == "xla":  # queries and keys are the same T slots (a prefill's first T of the cache)
            dense_mask = attention_mask(kv_mask[:, :t], t, 0, window, positions, positions)
            if segment_ids is not None:  # the window in positions holds within a segment, whose positions restart
                dense_mask = dense_mask & same_segment(segment_ids)
            mask = AttentionMask(impl, causal=True, dense=dense_mask)
        else:  # training and evaluation rows are right-padded (LlavaModel checks); prefill rows left-padded
            # The kernels' window counts slots: a row's tokens are one contiguous run (right- or
            # left-padded), so slot distances are position distances.
            mask = AttentionMask(impl, causal=True, tokens=kv_mask[:, :t], right_padded=cache is None, window=window,
                                 segments=segment_ids)
        x, new_cache, _ = run_layers(self.layers, (x, cache, jnp.int32(0)), cos, sin, mask, cache_index)
        x = self.norm(x[:, -1:] if last_only else x)
        return (x if hidden_only else self.logits(x)), new_cache

    def logits(self, x: jax.Array) -> jax.Array:  # [..., D] final-norm hidden -> [..., V] float32
        """The LM head."""
        logits = self.embed_tokens.attend(x) if self.cfg.tie_word_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache: k, v [L, B, K, S, H], one stacked array each."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
