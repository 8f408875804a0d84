"""Token selection: greedy, temperature, top-k, top-p, with per-row seeds so that a row's draws
do not depend on which other prompts share its batch.

The warpers follow transformers' order and semantics (`TemperatureLogitsWarper` ->
`TopKLogitsWarper` -> `TopPLogitsWarper`, one token always kept). Reported log-probabilities are
those of the model's own distribution, `log_softmax(logits)` before any warping: the quantity
transformers' `compute_transition_scores(..., normalize_logits=True)` gives for greedy decoding,
and the one a scorer (perplexity, answer ranking) wants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop.

    Attributes:
      temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k: keep only the k most likely tokens (0: no limit). Sampling only.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: off).
      max_new_tokens: generated tokens per prompt at most (EOS included).
      seed: PRNG seed; row r of a batch draws with `seed + r` unless the prompt carries its own.
      stop_strings: generation also stops once the decoded text contains one of these; the text
        returned ends before it.
      ignore_eos: keep generating after EOS (benchmarks that need a fixed length).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))

    @property
    def greedy(self) -> bool:
        """Argmax decoding (a static choice: it compiles without the sort that sampling needs)."""
        return self.temperature == 0

    def warp_args(self, rows: int | None = None) -> dict[str, jax.Array]:
        """The traced knobs: changing them does not recompile. `rows`: one value per row ([rows]), as the
        decode state carries them (each slot of the slot engine has its own); None: scalars."""
        shape = () if rows is None else (rows,)
        return {
            "temperature": jnp.full(shape, self.temperature, jnp.float32),
            "top_k": jnp.full(shape, self.top_k, jnp.int32),
            "top_p": jnp.full(shape, self.top_p, jnp.float32),
        }


def warp_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k, then top-p, as transformers' warpers; removed tokens get -inf.  [B, V]

    The knobs are scalars or one per row [B]; a temperature of 0 (a greedy row) divides by 1 here and is
    decided by `select_tokens`.
    """
    temperature, top_k, top_p = (jnp.reshape(x, (-1, 1)) for x in (temperature, top_k, top_p))  # [1 or B, 1]
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # one sort serves both filters
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), axis=-1)
    # After top-k, the sorted list is the same with everything below the k-th value removed.
    sorted_desc = jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # A token survives top-p when the tokens ranked above it hold less than top_p; the first always does.
    # top_p = 1 is off (a float32 cumsum can reach 1 before the tail and would cut it).
    keep = ((mass_before < top_p) | (top_p >= 1)) & (sorted_desc > -jnp.inf)
    keep = keep.at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def row_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row [B] for generation step `step` ([] or [B]): a function of (row seed, row step) only."""
    step = jnp.broadcast_to(step, seeds.shape)
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, step)


def select_tokens(
    logits: jax.Array,  # [B, V] float32
    seeds: jax.Array,  # [B] uint32
    step: jax.Array,  # [] or [B] int32
    warp: dict[str, jax.Array],  # scalars or [B] each (`SamplingParams.warp_args`)
    *,
    greedy: bool,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] int32 and their log-probabilities [B] under the unwarped distribution.

    `greedy` (static) takes the argmax of every row and compiles without the sort; otherwise each row samples
    with its own knobs, and a row whose temperature is 0 takes its argmax.
    """
    argmax = jnp.argmax(logits, axis=-1)
    if greedy:
        tokens = argmax
    else:
        warped = warp_logits(logits, warp["temperature"], warp["top_k"], warp["top_p"])
        sampled = jax.vmap(jax.random.categorical)(row_keys(seeds, step), warped)
        tokens = jnp.where(jnp.broadcast_to(warp["temperature"], argmax.shape) > 0, sampled, argmax)
    tokens = tokens.astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
