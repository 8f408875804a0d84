"""Next-token cross-entropy with HF's conventions: labels unshifted, -100 ignored, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def supervised_count(labels: jax.Array) -> jax.Array:
    """Tokens the loss sees: positions 1.. of `labels` [..., T] that are not IGNORE_INDEX."""
    return jnp.sum(labels[..., 1:] != IGNORE_INDEX)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Summed NLL of labels[:, t+1] under logits[:, t] over supervised positions.

    Args:
      logits: [B, T, V] (cast to float32 here).
      labels: [B, T] int, IGNORE_INDEX where not supervised.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, log_z - picked, 0.0))
