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

    def warp_args(self) -> dict[str, jax.Array]:
        """The traced knobs: changing them does not recompile."""
        return {
            "temperature": jnp.asarray(max(self.temperature, 1e-6), jnp.float32),
            "top_k": jnp.asarray(self.top_k, jnp.int32),
            "top_p": jnp.asarray(self.top_p, jnp.float32),
        }


def warp_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k, then top-p, as transformers' warpers; removed tokens get -inf.  [B, V]"""
    logits = logits / temperature
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # one sort serves both filters
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
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
    """One PRNG key per row [B] for generation step `step`: a function of (row seed, step) only."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)


def select_tokens(
    logits: jax.Array,  # [B, V] float32
    seeds: jax.Array,  # [B] uint32
    step: jax.Array,  # [] int32
    warp: dict[str, jax.Array],
    *,
    greedy: bool,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] int32 and their log-probabilities [B] under the unwarped distribution."""
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        warped = warp_logits(logits, warp["temperature"], warp["top_k"], warp["top_p"])
        tokens = jax.vmap(jax.random.categorical)(row_keys(seeds, step), warped)
    tokens = tokens.astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
