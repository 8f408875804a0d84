"""KV-cache generation: a jit-compiled prefill and a jit-compiled decode loop, pure functions of
arrays, with the cache carried in a `DecodeState` that each call takes and returns (donated).

Layout of one `generate` call (B rows, prompts left-padded to a shared length T, N new tokens at most):

    cache slots   [0 ............ T) [T ........... T+W)
                   prompts, left-pad   generated tokens

The cache holds a window of W <= N slots for generated tokens, not the whole budget: decode attends
over T + W slots, so a short answer never pays for a long `max_new_tokens`. W starts at
`Engine(first_window=...)` (16) and doubles (capped at N) whenever it fills; growing copies the
cache once (`grow_cache`), so the copies cost no more than one full-size cache, and each W is one
compiled decode program.

The decode state is per row: each row has its own step, the slot its answer starts at (`base`),
its sampling knobs and end ids, and a decode step writes each row's k/v at its own slot (one
scatter) and samples each row with its own knobs. A `generate` batch starts its rows together; the
slot engine (`slots.py`) inserts a prefilled row into a running batch (`insert`, its prompt moved
to the front of the row) and frees a row when it finishes. Both run this module's `prefill_step`
and `decode_loop`: there is one decode loop. The `kv_mask` [B, S] marks which slots hold real
tokens and positions count real tokens only, so a padded row computes exactly what it would alone.
T, N, B and the images per row are rounded up to buckets (`bucket`), so a chat whose prompt grows
by a few tokens per turn reuses compiled code.

LLaVA-NeXT (anyres) prompts carry each image's tiles and size: an image takes
`cfg.image_layout(size).num_tokens` tokens and `num_patches` tile slots. A row's images fill S tile
slots in order (`models.llava.place_images`), and the host builds `image_index` [B, T] (which
feature row each image token takes). S is a bucketed number of images' most tiles (`tile_slots`), so
a stream of single images of any sizes compiles one prefill per prompt-length bucket.

The prefill attends over the prompt's own keys (the cache starts empty), so it runs the fused
attention kernel of the backend (cuDNN on GPU, each left-padded row rotated to the front; Pallas
splash on TPU, padding as a segment); decode steps read the cache window through XLA.

Host round trips: `prefill` (vision tower, prompt, first token) and `decode` (a
`lax.while_loop` over steps that ends when every row is done, paused at `stop_at`, or a row's
window is full) are one dispatch each, plus one per window growth. Stop strings need the text, which
only the host has: with stop strings the loop runs in chunks of `STOP_CHECK_EVERY` steps and the
host checks between them (the next call's `finish` ends the rows it stopped). `stream` runs one step per dispatch
and yields each token as it comes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax import anyres
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.inference.quant import SCALE, int8_matmuls, quantize_params
from llava_jax.inference.sampling import SamplingParams, select_tokens
from llava_jax.models.llama import Cache, init_cache
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import Llava, LlavaModel, default_positions, place_images
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import model_param_shardings

MAX_END_IDS = 4  # EOS plus stop strings that are single special tokens, padded with -1 (one decode program)
STOP_CHECK_EVERY = 32  # decode steps between host checks for stop strings
MIN_PROMPT_BUCKET = 32
MIN_NEW_TOKENS_BUCKET = 16
FIRST_WINDOW = 16  # cache slots for generated tokens before the first growth
# Logical axes of the cache [L, B, K, S, H]: on a mesh the kv heads split like k_proj's output.
CACHE_AXES = ("layers", "activation_batch", "kv_heads", "activation_length", None)


class InputError(ValueError):
    """A request the model cannot serve (too long, image count mismatch); the message says why."""


@dataclasses.dataclass
class Prompt:
    """One request.

    Attributes:
      ids: [T] prompt ids, each image already expanded to its image ids (LLaVA-1.5: `num_image_tokens`;
        anyres: `cfg.image_layout(size).num_tokens`).
      images: the prompt's n images in placeholder order, CLIP-normalised and channels last. LLaVA-1.5:
        [n, H, W, 3]. Anyres: each image's patches, base first: [n, P, H, W, 3] (zero patches after
        an image's own, as `data.image.preprocess_images` pads them) or a list of [P_i, H, W, 3].
      seed: PRNG seed of this row; None: `SamplingParams.seed` + the row's index in the call.
      image_sizes: [n, 2] (height, width) of each original image; anyres only (they decide its tokens).
        OneVision takes the images of a prompt holding several untiled (`anyres.tiled_images`).
      videos: the prompt's videos in video-placeholder order, each its preprocessed frames [F, H, W, 3]
        (OneVision, NeXT-Video: a geometry with video pooling).
    """

    ids: np.ndarray
    images: np.ndarray | Sequence[np.ndarray] | None = None
    seed: int | None = None
    image_sizes: np.ndarray | Sequence[tuple[int, int]] | None = None
    videos: Sequence[np.ndarray] | None = None


@dataclasses.dataclass
class Completion:
    """What one prompt produced.

    Attributes:
      prompt_ids: the ids fed to the model (image placeholders expanded).
      token_ids: generated ids, EOS included when produced, up to the token that completed a stop string.
      logprobs: log-probability of each generated token under the model (before any warping).
      text: the decoded answer, ending before the stop string if one stopped it.
      finish_reason: "eos", "stop" (a stop string) or "length" (max_new_tokens or the context end).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


class DecodeState(NamedTuple):
    """Everything the decode loop carries, one row per prompt (a slot of the slot engine); a pytree that crosses
    the jit boundary (donated). Rows are independent: each has its own length, position, step, sampling knobs and
    end ids, so a row can be inserted into a running batch (`insert`) or freed while the others decode."""

    cache: Cache  # {"k", "v"}: [L, B, K, S, H] each (all layers stacked)
    kv_mask: jax.Array  # [B, S] int32, 1 = slot holds a real token
    tokens: jax.Array  # [B, N] int32 generated tokens (pad after a row is done)
    logprobs: jax.Array  # [B, N] float32
    positions: jax.Array  # [B] int32 position of the last generated token (the next one to feed)
    done: jax.Array  # [B] bool
    step: jax.Array  # [B] int32 tokens this row has generated
    seeds: jax.Array  # [B] uint32
    limits: jax.Array  # [B] int32 tokens this row may generate
    base: jax.Array  # [B] int32 the slot of the row's first generated token (its prompt's slots end there)
    warp: dict[str, jax.Array]  # temperature, top_k, top_p: [B] each (temperature 0: greedy)
    end_ids: jax.Array  # [B, MAX_END_IDS] int32 ids that end the row's answer (-1: none)


@dataclasses.dataclass
class Batch:
    """Prompts padded to bucketed shapes, ready for `Engine.prefill`."""

    prompts: list[Prompt]  # the real rows, in order; rows beyond them are padding
    ids: np.ndarray  # [B, T] int32, left-padded
    mask: np.ndarray  # [B, T] int32
    pixels: np.ndarray | None  # [B, S, H, W, 3] in the model dtype (S image or tile slots), or None without images
    seeds: np.ndarray  # [B] uint32
    limits: np.ndarray  # [B] int32
    num_new: int  # N, the bucketed token budget
    # [B, T] int32 (anyres): each image token's feature row; (rows, weights) [B, T, 4] where tokens mix rows
    image_index: Any = None

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """(B, T, S, N): the bucketed shapes that pick the compiled prefill (S = 0 without images)."""
        slots = 0 if self.pixels is None else self.pixels.shape[1]
        return self.ids.shape[0], self.ids.shape[1], slots, self.num_new


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 1.5 * 2^k) that is >= max(n, minimum).

    At most a third of a bucket is padding, and a length that grows slowly recompiles rarely.
    """
    n = max(n, minimum, 1)
    p = 1 << (n - 1).bit_length()  # next power of two
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def batch_bucket(n: int) -> int:
    """Batch sizes are powers of two: the last partial batch of a run compiles at most log2 times."""
    return 1 << (max(n, 1) - 1).bit_length()


def _constrain(cache: Cache, kv_mask: jax.Array) -> tuple[Cache, jax.Array]:
    """Pin the cache's sharding by its logical axes (a no-op without rules, i.e. off a mesh)."""
    cache = {n: nn.with_logical_constraint(c, CACHE_AXES) for n, c in cache.items()}
    return cache, nn.with_logical_constraint(kv_mask, ("activation_batch", "activation_length"))


def _rules(rules: rules_lib.Rules | None):
    """The logical-axis rules in force while tracing (none: single device)."""
    return nn.logical_axis_rules(rules) if rules else contextlib.nullcontext()


# --- model functions applied through the Llava module (Linen `method=`) ------------------------


def _prefill_last_logits(m: Llava, ids, pixels, kv_mask, positions, cache, image_index):
    """Prompt forward into the cache; logits [B, V] of the last position only (left padding)."""
    logits, new_cache = m(ids, pixels, kv_mask, positions, cache, None, last_only=True, image_index=image_index)
    return logits[:, 0], new_cache


def _decode_logits(m: Llava, ids, positions, kv_mask, cache, cache_index):
    """One step of the language model on generated tokens [B, 1] -> logits [B, 1, V].

    Generated ids are text: they are embedded as they are, never replaced by image features, as
    transformers does after the prompt (an image id the model emits is an ordinary embedding row).
    """
    lm = m.language_model
    return lm(lm.embed(ids), positions, kv_mask, cache, cache_index)


# --- pure functions at the jit boundary ----------------------------------------------------------


def _is_stop(token: jax.Array, end_ids: jax.Array) -> jax.Array:  # [B], [B, K] -> [B] bool
    return jnp.any(token[:, None] == end_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("module", "num_new", "window", "greedy", "rules", "int8"))
def prefill_step(
    module: Llava,
    params: Any,
    ids: jax.Array,  # [B, T] int32, left-padded
    pixels: jax.Array | None,  # [B, S, H, W, 3]
    mask: jax.Array,  # [B, T] int32
    seeds: jax.Array,  # [B] uint32
    limits: jax.Array,  # [B] int32
    warp: dict[str, jax.Array],  # [B] each
    end_ids: jax.Array,  # [B, K] int32: ids that end each row's answer (-1: none)
    image_index: jax.Array | None = None,  # [B, T] int32, anyres only
    *,
    num_new: int,
    window: int,
    greedy: bool,
    rules: rules_lib.Rules | None = None,
    int8: bool = False,
) -> DecodeState:
    """Prompts (and images) into a fresh cache of T + window slots; the first token of each row.

    Token buffers hold the whole budget (`num_new`); the cache only the first window (0: the prompt alone, as
    the slot engine takes it to `insert`). `rules`: the logical-axis rules of the mesh the call runs on
    (`Engine(mesh=...)`), None on one device. `int8`: `params` hold int8 kernels (`inference/quant.py`).
    `image_index`: see `Llava.embed`.
    """
    with _rules(rules), int8_matmuls(int8):
        cfg = module.cfg
        b, t = ids.shape
        cache = init_cache(cfg.text, b, t + window, jnp.dtype(cfg.dtype))
        kv_mask = jnp.zeros((b, t + window), jnp.int32).at[:, :t].set(mask)
        cache, kv_mask = _constrain(cache, kv_mask)
        positions = default_positions(mask)  # [B, T]
        logits, cache = module.apply(
            {"params": params}, ids, pixels, kv_mask, positions, cache, image_index, method=_prefill_last_logits
        )
        cache, _ = _constrain(cache, kv_mask)
    first, logprob = select_tokens(logits, seeds, jnp.int32(0), warp, greedy=greedy)
    return DecodeState(
        cache=cache,
        kv_mask=kv_mask,
        tokens=jnp.full((b, num_new), cfg.text.pad_token_id, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((b, num_new), jnp.float32).at[:, 0].set(logprob),
        positions=positions[:, -1] + 1,
        done=_is_stop(first, end_ids) | (limits <= 1),
        step=jnp.ones((b,), jnp.int32),
        seeds=seeds,
        limits=limits,
        base=jnp.full((b,), t, jnp.int32),
        warp=warp,
        end_ids=end_ids,
    )


@functools.partial(jax.jit, static_argnames=("module", "greedy", "rules", "int8"), donate_argnames=("state",))
def decode_loop(
    module: Llava,
    params: Any,
    state: DecodeState,
    stop_at: jax.Array,  # [] int32: a row pauses once it has this many tokens
    max_steps: jax.Array,  # [] int32: decode steps this call takes at most
    finish: jax.Array,  # [B] bool: rows to end before stepping (a stop string the host found, a cancelled request)
    *,
    greedy: bool,
    rules: rules_lib.Rules | None = None,
    int8: bool = False,
) -> DecodeState:
    """Decode steps in a `lax.while_loop`. A row decodes while it is not done and has fewer than `stop_at`
    tokens; the loop ends when no row decodes, after `max_steps` steps, or when a decoding row's next token
    would not fit the cache (`grow_cache`, then call again).

    Each row writes its previous token's k/v at its own slot (`base + step - 1`) and samples with its own knobs,
    so rows of different lengths share the step: what `Engine.generate` runs for a batch of prompts and the
    slot engine for requests that came at different times.
    """
    b, n = state.tokens.shape
    slots = state.kv_mask.shape[1]
    rows = jnp.arange(b)

    def decoding(st: DecodeState) -> jax.Array:  # [B] bool
        return ~st.done & (st.step < stop_at)

    def cond(carry):
        st, taken = carry
        live = decoding(st)
        fits = ~live | (st.base + st.step - 1 < slots)
        return (taken < max_steps) & jnp.any(live) & jnp.all(fits)

    def body(carry):
        st, taken = carry
        live = decoding(st)
        # The previous token's k/v go to the row's next slot; a row not decoding writes nothing (index past the end).
        slot = jnp.where(live, st.base + st.step - 1, slots)
        prev = jnp.take_along_axis(st.tokens, (st.step - 1)[:, None], axis=1)  # [B, 1]
        kv_mask = st.kv_mask.at[rows, slot].set(1, mode="drop")
        logits, cache = module.apply(
            {"params": params}, prev, st.positions[:, None], kv_mask, st.cache, slot, method=_decode_logits
        )
        cache, kv_mask = _constrain(cache, kv_mask)
        token, logprob = select_tokens(logits[:, 0], st.seeds, st.step, st.warp, greedy=greedy)
        at = jnp.where(live, st.step, n)  # past the end: dropped
        state = st._replace(
            cache=cache,
            kv_mask=kv_mask,
            tokens=st.tokens.at[rows, at].set(token, mode="drop"),
            logprobs=st.logprobs.at[rows, at].set(logprob, mode="drop"),
            positions=st.positions + live,
            done=st.done | (live & (_is_stop(token, st.end_ids) | (st.step + 1 >= st.limits))),
            step=st.step + live,
        )
        return state, taken + 1

    state = state._replace(done=state.done | finish)
    with _rules(rules), int8_matmuls(int8):
        state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
        return state


@functools.partial(jax.jit, static_argnames=("slots", "rules"))
def grow_cache(state: DecodeState, *, slots: int, rules: rules_lib.Rules | None = None) -> DecodeState:
    """The same state with its cache and kv_mask padded to `slots` slots (empty, masked out).

    Not donated: a larger result cannot reuse the old buffers, which are freed with the old state.
    """
    extra = slots - state.kv_mask.shape[1]
    cache = {n: jnp.pad(c, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))) for n, c in state.cache.items()}
    with _rules(rules):
        cache, kv_mask = _constrain(cache, jnp.pad(state.kv_mask, ((0, 0), (0, extra))))
    return state._replace(cache=cache, kv_mask=kv_mask)


@functools.partial(jax.jit, static_argnames=("rules",), donate_argnames=("state",))
def insert(
    state: DecodeState,
    prefix: DecodeState,
    slot: jax.Array,  # [] int32: the state row it goes into
    pad: jax.Array,  # [] int32: left padding of the prefix's prompt (its bucket minus its length)
    *,
    rules: rules_lib.Rules | None = None,
) -> DecodeState:
    """A one-row prefill (`prefill_step` of one prompt, window 0) put into row `slot` of a running state
    (JetStream's `insert`), in place; the other rows are untouched.

    The prompt's k/v are moved to the front of the slot (its padding dropped), so the row's answer starts at
    slot `length` and a prompt of any bucket fits a cache as long as the context. Token buffers of the two
    states have the same length (prefill with the state's `num_new`).
    """
    t, s = prefix.kv_mask.shape[1], state.kv_mask.shape[1]
    keep = min(t, s)  # the real tokens of a prompt shorter than the context always fit
    # [L, 1, K, T, H] -> its first `keep` slots after rolling the left padding off
    cache = {n: jax.lax.dynamic_update_slice(
                 c, jnp.roll(prefix.cache[n], -pad, axis=3)[:, :, :, :keep].astype(c.dtype), (0, slot, 0, 0, 0))
             for n, c in state.cache.items()}
    mask_row = jnp.roll(prefix.kv_mask[0], -pad)[:keep]
    kv_mask = state.kv_mask.at[slot].set(jnp.zeros((s,), jnp.int32).at[:keep].set(mask_row))
    with _rules(rules):
        cache, kv_mask = _constrain(cache, kv_mask)
    put = lambda x, y: x.at[slot].set(y[0])  # noqa: E731
    return DecodeState(
        cache=cache,
        kv_mask=kv_mask,
        tokens=put(state.tokens, prefix.tokens),
        logprobs=put(state.logprobs, prefix.logprobs),
        positions=put(state.positions, prefix.positions),
        done=put(state.done, prefix.done),
        step=put(state.step, prefix.step),
        seeds=put(state.seeds, prefix.seeds),
        limits=put(state.limits, prefix.limits),
        base=state.base.at[slot].set(t - pad),
        warp={k: put(v, prefix.warp[k]) for k, v in state.warp.items()},
        end_ids=put(state.end_ids, prefix.end_ids),
    )


def next_window(window: int, num_new: int) -> int:
    """The window after `window`: twice as many slots, at most the budget."""
    return min(2 * window, num_new)


def tensor_parallel_mesh(n: int) -> Mesh:
    """A mesh of the first `n` devices, all on the `tensor` axis (heads, MLP and vocab split n ways)."""
    if not 1 <= n <= jax.device_count():
        raise InputError(f"tensor parallelism over {n} devices: {jax.device_count()} device(s) are present")
    return make_mesh(data=1, fsdp=1, tensor=n, devices=jax.devices()[:n])


def param_shardings(params: Any, cfg: LlavaConfig, mesh: Mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> Any:
    """Shardings for `params` (arrays or shapes) on the mesh by the logical-axis rules (the training
    layout's table), nothing placed.

    int8 parameters (`quantize_params`) too: a kernel is split as its float kernel is, and its
    per-output-channel scale [..., out] as the kernel's output axis (so each device scales the
    output columns it computes, with no communication).
    """

    def like(full: Any, sub: Any) -> Any:
        if not isinstance(sub, dict):
            return full
        out = {k: like(full[k], v) for k, v in sub.items() if k != SCALE}
        if SCALE in sub:
            kernel = full["kernel"]
            spec = tuple(kernel.spec) + (None,) * (len(sub["kernel"].shape) - len(kernel.spec))
            out[SCALE] = NamedSharding(mesh, PartitionSpec(*spec[:-2], spec[-1]))
        return out

    return like(model_param_shardings(cfg, mesh, rules), params)


def shard_params(params: Any, cfg: LlavaConfig, mesh: Mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> Any:
    """The parameters (float or int8) placed on the mesh by `param_shardings`."""
    return jax.device_put(params, param_shardings(params, cfg, mesh, rules))


# --- the engine ----------------------------------------------------------------------------------


class Engine:
    """Batched KV-cache generation for a `LlavaModel`.

    Args:
      model: the model and its parameters (`load_pretrained`).
      tokenizer: needed for text, stop strings and streaming; without one `text` is "".
      max_context: longest sequence (prompt + answer) to run; default the model's
        `max_position_embeddings`.
      eos_token_id: the id that ends an answer; default the model config's.
      first_window: cache slots for generated tokens at the start of decoding; the window doubles
        when full, up to the budget. None: the whole budget from the start (one window).
      mesh: run on this device mesh (`tensor_parallel_mesh(n)`, or any `parallel.mesh.make_mesh`):
        parameters placed by `rules` (heads, MLP and vocab over `tensor`), the KV cache split on
        kv heads, the batch over `data`. None: the default device.
      rules: the logical-axis rules table for the mesh (default `parallel.rules.DEFAULT_RULES`).
      int8: weight-only int8 for the language model's Linear layers (`inference/quant.py`): half
        the weight bytes of bf16 per decoded token; greedy ids close to, not equal to, float's
        (tests/test_inference_engine.py::test_int8_weights_stay_close_to_float); on a `mesh` too.

    Compiled code is shared by every engine over the same model config (the module is a static
    argument of `prefill_step` and `decode_loop`).
    """

    def __init__(
        self,
        model: LlavaModel,
        tokenizer: Tokenizer | None = None,
        *,
        max_context: int | None = None,
        eos_token_id: int | None = None,
        first_window: int | None = FIRST_WINDOW,
        mesh: Mesh | None = None,
        rules: rules_lib.Rules = rules_lib.DEFAULT_RULES,
        int8: bool = False,
    ):
        self.model = model
        self.first_window = first_window
        self.mesh = mesh
        self.rules = None if mesh is None else tuple(rules)
        self.int8 = int8
        self.params = quantize_params(model.params) if int8 else model.params
        if mesh is not None:
            self.params = shard_params(self.params, model.config, mesh, rules)
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_context = int(max_context or self.config.text.max_position_embeddings)
        self.eos_id = self.config.text.eos_token_id if eos_token_id is None else int(eos_token_id)
        self.dtype = jnp.dtype(self.config.dtype)

    # -- host side --

    def check(self, prompt: Prompt, max_context: int | None = None) -> None:
        """Raise InputError if the prompt cannot be run: empty, too long (for `max_context`, default the
        engine's), or images not matching its runs."""
        cfg = self.config
        ids = np.asarray(prompt.ids)
        context = self.max_context if max_context is None else max_context
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"prompt ids must be a non-empty 1-D sequence; got shape {ids.shape}")
        if ids.size >= context:
            raise InputError(
                f"prompt is {ids.size} tokens (images expanded), the model's context is {context}: "
                "no room to generate; shorten the prompt or use fewer images"
            )
        if cfg.is_anyres:
            self._check_anyres(prompt, int((ids == cfg.image_token_index).sum()))
            self._check_videos(prompt)
            return
        if prompt.videos:
            raise InputError("this model takes no video (LLaVA-1.5)")
        runs = int((ids == cfg.image_token_index).sum())
        if runs % cfg.num_image_tokens:
            raise InputError(
                f"prompt holds {runs} image tokens ({cfg.image_token_index}), not a multiple of the "
                f"{cfg.num_image_tokens} one image takes"
            )
        runs //= cfg.num_image_tokens
        given = 0 if prompt.images is None else len(prompt.images)
        if runs != given:
            raise InputError(f"prompt has {runs} image placeholders but {given} images were given")
        if given:
            want = (cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels)
            if tuple(prompt.images.shape[1:]) != want:
                got = tuple(prompt.images.shape)
                raise InputError(f"images must be [n, {want[0]}, {want[1]}, {want[2]}]; got {got}")

    def _check_anyres(self, prompt: Prompt, tokens: int) -> None:
        """An anyres prompt: one size per image, the image tokens its sizes take, the tiles their layouts need."""
        cfg = self.config
        given = 0 if prompt.images is None else len(prompt.images)
        sizes = [] if prompt.image_sizes is None else [tuple(int(x) for x in s) for s in prompt.image_sizes]
        if given and prompt.image_sizes is None:
            raise InputError("an anyres (LLaVA-NeXT) model needs each image's (height, width): Prompt.image_sizes")
        if len(sizes) != given:
            raise InputError(f"{given} images were given with {len(sizes)} image sizes")
        try:
            tiled = anyres.tiled_images(cfg.geometry, given)
            layouts = [anyres.layout(cfg.geometry, s, tiled) for s in sizes]
        except ValueError as e:
            raise InputError(str(e)) from None
        want = sum(lay.num_tokens for lay in layouts)
        if tokens != want:
            raise InputError(f"prompt holds {tokens} image tokens ({cfg.image_token_index}) but its {given} "
                             f"image{'s' * (given != 1)} of sizes {sizes} take {want}")
        # Each run of image tokens holds whole images in order (adjacent `<image>`s make one run).
        is_image = np.concatenate([[0], np.asarray(prompt.ids) == cfg.image_token_index, [0]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(is_image))
        j = 0
        for k, (start, end) in enumerate(zip(edges[::2], edges[1::2])):
            first, taken = j, 0
            while taken < end - start and j < given:
                taken, j = taken + layouts[j].num_tokens, j + 1
            if taken != end - start:
                raise InputError(f"image run {k} of the prompt (tokens {start}..{end - 1}) holds {end - start} "
                                 f"image tokens, not whole images: images {first}.. of sizes {sizes[first:j]} "
                                 f"take {taken}")
        v = cfg.vision
        tile = (v.image_size, v.image_size, v.num_channels)
        for j, lay in enumerate(layouts):
            shape = np.shape(prompt.images[j])
            if len(shape) != 4 or tuple(shape[1:]) != tile or shape[0] < lay.num_patches:
                raise InputError(f"image {j} (size {sizes[j]}) must be [P, {tile[0]}, {tile[1]}, {tile[2]}] with "
                                 f"P >= its {lay.num_patches} patches (base + tiles); got {tuple(shape)}")

    def _check_videos(self, prompt: Prompt) -> None:
        """The video tokens are the videos' (in order, each its frames at the tile size), and the model takes video."""
        cfg, g = self.config, self.config.geometry
        videos = list(prompt.videos or [])
        tokens = 0 if cfg.video_token_index is None else int((np.asarray(prompt.ids) == cfg.video_token_index).sum())
        if not videos and not tokens:
            return
        if not g.video:
            raise InputError("this model takes no video (its config has no video pooling)")
        v = cfg.vision
        tile = (v.image_size, v.image_size, v.num_channels)
        for j, video in enumerate(videos):
            shape = np.shape(video)
            if len(shape) != 4 or tuple(shape[1:]) != tile or shape[0] < 1:
                raise InputError(f"video {j} must be [frames, {tile[0]}, {tile[1]}, {tile[2]}]; got {tuple(shape)}")
        want = sum(g.video_tokens(len(video)) for video in videos)
        if tokens != want:
            raise InputError(f"prompt holds {tokens} video tokens ({cfg.video_token_index}) but its {len(videos)} "
                             f"video{'s' * (len(videos) != 1)} of {[len(x) for x in videos]} frames take {want}")

    def tile_slots(self, tiles: int) -> int:
        """Tile slots S of a batch whose fullest row needs `tiles` (anyres): a bucketed number of images' most
        tiles each, so that single images of any size share one S (as the images per row bucket for 1.5)."""
        most = self.config.geometry.max_patches
        return most * bucket(-(-tiles // most))

    def prepare(self, prompts: Sequence[Prompt], params: SamplingParams, *, batch_size: int | None = None) -> Batch:
        """Validate and pad prompts to bucketed shapes (left padding; padding rows are done at once)."""
        if not prompts:
            raise ValueError("no prompts to generate from")
        for p in prompts:
            self.check(p)
        cfg = self.config
        lengths = [len(p.ids) for p in prompts]
        b = batch_size if batch_size is not None and batch_size >= len(prompts) else batch_bucket(len(prompts))
        t = bucket(max(lengths), MIN_PROMPT_BUCKET)
        room = self.max_context - min(lengths)
        num_new = bucket(min(params.max_new_tokens, room), MIN_NEW_TOKENS_BUCKET)
        ids = np.full((b, t), cfg.text.pad_token_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        limits = np.ones((b,), np.int32)  # padding rows stop after their first token
        seeds = np.zeros((b,), np.uint32)
        # A padding row holds one BOS so that no attention row is empty.
        ids[:, -1], mask[:, -1] = cfg.text.bos_token_id, 1
        for r, p in enumerate(prompts):
            ids[r, t - lengths[r] :] = p.ids
            mask[r, t - lengths[r] :] = 1
            limits[r] = min(params.max_new_tokens, self.max_context - lengths[r])
            seeds[r] = ((params.seed + r) if p.seed is None else p.seed) % 2**32
        if cfg.is_anyres:
            pixels, index = self._place_anyres(prompts, ids)
            return Batch(list(prompts), ids, mask, pixels, seeds, limits, num_new, index)
        counts = [0 if p.images is None else len(p.images) for p in prompts]
        pixels = None
        if max(counts):
            v = cfg.vision
            pixels = np.zeros((b, bucket(max(counts)), v.image_size, v.image_size, v.num_channels), self.dtype)
            for r, p in enumerate(prompts):
                if counts[r]:
                    pixels[r, : counts[r]] = p.images
        return Batch(list(prompts), ids, mask, pixels, seeds, limits, num_new)

    def _place_anyres(self, prompts: Sequence[Prompt], ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(pixels [B, S, H, W, 3], image_index [B, T]) of checked anyres prompts in padded rows `ids`."""
        cfg = self.config
        images, sizes, videos, per_row, tiles = [], [], [], [], [0]
        for p in prompts:
            n = 0 if p.images is None else len(p.images)
            per_row.append(n)
            row = 0
            for image, size in zip(p.images if n else [], p.image_sizes if n else []):
                images.append(np.asarray(image))
                sizes.append((int(size[0]), int(size[1])))
                row += anyres.layout(cfg.geometry, sizes[-1], anyres.tiled_images(cfg.geometry, n)).num_patches
            for video in p.videos or []:
                videos.append(np.asarray(video))
                row += len(video)
            tiles.append(row)
        if not images and not videos:
            return None, None
        per_row += [0] * (len(ids) - len(per_row))  # the padding rows of the batch bucket
        pixels, index = place_images(ids, images, cfg, sizes, self.tile_slots(max(tiles)), videos=videos,
                                     images_per_row=per_row)
        return pixels.astype(self.dtype), index

    def _end_ids(self, params: SamplingParams) -> list[int]:
        """The ids that end an answer on the device: EOS (unless ignored) and each stop string that is one special
        token (`<|im_end|>`, `<|eot_id|>`): decoding drops special tokens, so no text could ever show them."""
        ids = [] if params.ignore_eos else [self.eos_id]
        for stop in params.stop_strings:
            i = self.tokenizer.piece_to_id(stop) if self.tokenizer is not None else None
            if i is not None and not self.tokenizer.decode([i]) and i not in ids:
                ids.append(i)
        return ids[:MAX_END_IDS]

    def end_id_row(self, params: SamplingParams) -> np.ndarray:
        """`_end_ids` as a fixed [MAX_END_IDS] row padded with -1 (one compiled program for any of them)."""
        ids = self._end_ids(params)
        return np.asarray(ids + [-1] * (MAX_END_IDS - len(ids)), np.int32)

    def _on_mesh(self):
        """Calls that trace or run on the engine's mesh (the logical constraints resolve against it)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def prefill(self, batch: Batch, params: SamplingParams, *, num_new: int | None = None,
                window: int | None = None, greedy: bool | None = None) -> DecodeState:
        """Run the prompts (and images) through the model into a fresh cache; picks the first token.

        `num_new` (default the batch's budget) sizes the token buffers; `window` (default `self.window`) the
        cache slots after the prompt (0: the prompt alone, for `insert`); `greedy` (default `params.greedy`):
        False compiles the program that samples, where a row of temperature 0 still takes its argmax.
        """
        b = batch.ids.shape[0]
        num_new = batch.num_new if num_new is None else num_new
        with self._on_mesh():
            return prefill_step(
                self.model.module,
                self.params,
                batch.ids,
                batch.pixels,
                batch.mask,
                batch.seeds,
                batch.limits,
                params.warp_args(b),
                jnp.asarray(np.tile(self.end_id_row(params), (b, 1))),
                batch.image_index,
                num_new=num_new,
                window=self.window(num_new) if window is None else window,
                greedy=params.greedy if greedy is None else greedy,
                rules=self.rules,
                int8=self.int8,
            )

    def window(self, num_new: int) -> int:
        """The first cache window for a budget of `num_new` tokens."""
        return num_new if self.first_window is None else max(1, min(self.first_window, num_new))

    def decode_steps(self, state: DecodeState, *, greedy: bool, stop_at: int, max_steps: int,
                     finish: np.ndarray | None = None) -> DecodeState:
        """One `decode_loop` call on the engine's mesh (donates `state`); `finish` [B]: rows to end first."""
        finish = np.zeros(state.done.shape, bool) if finish is None else finish
        with self._on_mesh():
            return decode_loop(self.model.module, self.params, state, jnp.int32(stop_at), jnp.int32(max_steps),
                               jnp.asarray(finish), greedy=greedy, rules=self.rules, int8=self.int8)

    def decode(self, state: DecodeState, params: SamplingParams, stop_at: int | None = None,
               finish: np.ndarray | None = None) -> DecodeState:
        """Decode steps until every row is done or has `stop_at` tokens (default: the budget), growing the
        cache window as it fills; `finish` [B] marks rows done first (stop strings found by the host).
        Donates `state`."""
        n = state.tokens.shape[1]
        stop_at = n if stop_at is None else min(stop_at, n)
        while True:
            state = self.decode_steps(state, greedy=params.greedy, stop_at=stop_at, max_steps=n, finish=finish)
            finish = None
            step, done, base = jax.device_get((state.step, state.done, state.base))
            live = ~done & (step < stop_at)
            slots = state.kv_mask.shape[1]
            if not live.any() or np.all(base[live] + step[live] - 1 < slots):
                return state
            window = slots - int(base.max())  # rows of a generate batch share their prompt bucket
            with self._on_mesh():
                state = grow_cache(state, slots=slots - window + next_window(window, n), rules=self.rules)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, *, batch_size: int | None = None
    ) -> list[Completion]:
        """Generate for a batch of prompts (any lengths, any image counts). One Completion per prompt."""
        batch = self.prepare(prompts, params, batch_size=batch_size)
        state = self.prefill(batch, params)
        if not params.stop_strings:
            state = self.decode(state, params)
        else:
            self._require_tokenizer("stop strings")
            while True:
                steps, done, tokens = jax.device_get((state.step, state.done, state.tokens))  # one round trip
                if np.all(done | (steps >= batch.num_new)):
                    break
                stopped = np.zeros_like(done)
                for r in range(len(prompts)):
                    text = self.tokenizer.decode(tokens[r, : steps[r]])
                    stopped[r] = not done[r] and _find_stop(text, params.stop_strings) >= 0
                state = self.decode(state, params, stop_at=int(steps.max()) + STOP_CHECK_EVERY, finish=stopped)
        return self.finish(batch, state, params)

    def finish(self, batch: Batch, state: DecodeState, params: SamplingParams) -> list[Completion]:
        """Cut each row at EOS, a stop string or its budget, and decode the text."""
        tokens, logprobs, steps = (np.asarray(x) for x in jax.device_get((state.tokens, state.logprobs, state.step)))
        return [self.complete(p.ids, tokens[r, : min(int(steps[r]), int(batch.limits[r]))], logprobs[r], params)
                for r, p in enumerate(batch.prompts)]

    def complete(self, prompt_ids: Sequence[int], tokens: Sequence[int], logprobs: Sequence[float],
                 params: SamplingParams, reason: str = "length") -> Completion:
        """A row's Completion from its generated tokens: cut at an end id or a stop string, text decoded.
        `reason` is the finish reason when neither cut it ("length", or "cancelled" by the slot engine)."""
        toks = [int(t) for t in tokens]
        n = len(toks)
        ends = set(self._end_ids(params))
        hit = next((i for i, t in enumerate(toks) if t in ends), None)
        if hit is not None:
            n, reason = hit + 1, "eos" if toks[hit] == self.eos_id and not params.ignore_eos else "stop"
        text = self.tokenizer.decode(toks[:n]) if self.tokenizer else ""
        cut = _find_stop(text, params.stop_strings)
        if cut >= 0:
            n, reason = self._tokens_to_stop(toks[:n], params.stop_strings), "stop"
            text = text[:cut]
        return Completion([int(i) for i in prompt_ids], toks[:n], [float(x) for x in logprobs[:n]], text, reason)

    def _tokens_to_stop(self, toks: list[int], stops: Sequence[str]) -> int:
        """Fewest leading tokens whose text contains a stop string (binary search: containment only grows)."""
        lo, hi = 1, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            if _find_stop(self.tokenizer.decode(toks[:mid]), stops) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def stream(self, prompt: Prompt, params: SamplingParams) -> Generator["Delta", None, Completion]:
        """Generate for one prompt, yielding each token as soon as it exists; returns the Completion.

        Each `Delta` carries the token, its log-probability and the text it made printable (held
        back while it may be an incomplete UTF-8 character or the start of a stop string).
        """
        self._require_tokenizer("streaming")
        batch = self.prepare([prompt], params)
        state = self.prefill(batch, params)
        deltas = DeltaMaker(self, params)
        step = 0
        while True:
            tokens, logprobs, new_step, done = (np.asarray(x)[0] for x in jax.device_get(
                (state.tokens, state.logprobs, state.step, state.done)))
            stopped = False
            for i in range(step, int(new_step)):
                delta = deltas.push(int(tokens[i]), float(logprobs[i]), last=bool(done) and i == new_step - 1)
                yield delta
                if deltas.stopped:
                    stopped = True
                    break
            step = int(new_step)
            if stopped or done or step >= batch.num_new:
                break
            state = self.decode(state, params, stop_at=step + 1)
        # `complete` cuts at EOS, the stop string or the budget exactly as `generate` does.
        return self.complete(prompt.ids, tokens[:step], logprobs, params)

    def _require_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: Engine(model, tokenizer)")


class DeltaMaker:
    """A row's generated tokens as `Delta`s: an end id adds no text, the text is held back while it may be an
    incomplete character or the start of a stop string, and the last delta flushes the rest (`Engine.stream` and
    the slot engine's streams)."""

    def __init__(self, engine: "Engine", params: SamplingParams):
        # Without a tokenizer (ids only), deltas carry no text.
        self.detok = None if engine.tokenizer is None else _IncrementalText(engine.tokenizer, params.stop_strings)
        self.ends = set(engine._end_ids(params))
        self.stopped = False  # a stop string appeared: nothing more is to be emitted

    def push(self, token: int, logprob: float, *, last: bool) -> "Delta":
        """The delta of the next token; `last`: the row ends with it (its held-back text is flushed)."""
        text, self.stopped = ("", False) if token in self.ends or self.detok is None else self.detok.push(token)
        if last and not self.stopped and self.detok is not None:
            text += self.detok.flush()
        return Delta(token, logprob, text)


@dataclasses.dataclass
class Delta:
    """One streamed token: its id, log-probability, and the text it made printable (may be "")."""

    token_id: int
    logprob: float
    text: str


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in text, -1 if none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


class _IncrementalText:
    """Turns a growing token list into printable text deltas.

    Decoding the whole list each time keeps sentencepiece's spacing right; the tail is held back
    while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or could be the beginning of
    a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new printable text, whether a stop string has now appeared)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = _find_stop(text, self.stops)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut]), True
        safe = len(text.rstrip("\ufffd"))
        for s in self.stops:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(text[:safe]), False

    def flush(self) -> str:
        """All remaining text (at the end of generation)."""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        delta = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return delta


def completion_dict(c: Completion) -> dict[str, Any]:
    """The JSON form of a Completion (`--json` output)."""
    return dataclasses.asdict(c)
