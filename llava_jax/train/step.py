"""The train step: a pure function of (state, batch), jit-compiled with shardings by the loop."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llava_jax.config import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.train.loss import LOSS_CHUNK, chunked_cross_entropy_sum, supervised_count
from llava_jax.train.optimizer import Params, merge_params

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, plus the frozen parameters it reads.

    `params` are the trained parameters (float32 master copies); `frozen` the rest, kept in the
    compute dtype and never differentiated, with no optimizer state.
    """

    step: jax.Array  # [] int32: updates applied (or skipped as non-finite) in this stage
    params: Params
    frozen: Params
    opt_state: Any
    nonfinite_streak: jax.Array  # [] int32: consecutive skipped steps
    nonfinite_total: jax.Array  # [] int32


def create_state(params: Params, frozen: Params, tx: optax.GradientTransformation) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, frozen, tx.init(params), zero, zero)


def model_inputs(batch: Batch) -> dict:
    """The model's inputs in a batch dict: input_ids, pixel_values [B, S, H, W, C] or None, attention_mask,
    for anyres (LLaVA-NeXT) batches image_index [B, T] (`Llava.embed`), for weighted ones (OneVision) the pair
    (image_index, image_weight) [B, T, 4] each, and for packed batches segment_ids and positions [B, T]
    (`Llava.__call__`)."""
    index = batch.get("image_index")
    if "image_weight" in batch:
        index = (index, batch["image_weight"])
    return dict(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                attention_mask=batch["attention_mask"], image_index=index,
                segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))


def loss_sum_fn(cfg: LlavaConfig, chunk: int = LOSS_CHUNK) -> Callable[..., jax.Array]:
    """Summed next-token NLL of one micro-batch under trainable + frozen parameters (`rng`: dropout).

    The LM head runs inside the loss, `chunk` positions at a time (`chunked_cross_entropy_sum`):
    the float32 logits of the whole micro-batch never exist at once.
    """
    module = Llava(cfg)

    def loss_sum(params: Params, frozen: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        rngs = None if rng is None else {"dropout": rng}
        variables = {"params": merge_params(params, frozen)}
        hidden, _ = module.apply(variables, **model_inputs(batch), hidden_only=True, rngs=rngs)
        head = lambda h: module.apply(variables, h, method=Llava.lm_logits)  # noqa: E731
        return chunked_cross_entropy_sum(hidden, batch["labels"], head, chunk, batch.get("segment_ids"))

    return loss_sum


def make_train_step(
    cfg: LlavaConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, *, seed: int = 0
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A step over a global batch whose leaves are [A, b, ...]: A micro-batches accumulated.

    The loss is the mean over every supervised token of the global batch (not a mean of
    micro-batch means), as transformers computes it for the same batch; packed batches
    (`segment_ids`, `positions`) count and weigh each sample's tokens as unpacked rows do, so
    packing the same samples changes neither the loss nor the gradients. A non-finite loss or
    gradient norm leaves parameters and optimizer state untouched and is counted: the update runs
    under `lax.cond`, so a finite step pays no per-leaf select between new and old state. LoRA
    dropout (the only dropout) draws from `seed`, the step and the micro-batch: a resumed run
    redraws the same masks.
    """
    loss_sum = loss_sum_fn(cfg)
    grad_fn = jax.value_and_grad(loss_sum)
    dropout = cfg.lora is not None and cfg.lora.dropout > 0

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        tokens = supervised_count(batch["labels"], batch.get("segment_ids"))
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)

        def micro(carry, xs):
            grads, total = carry
            mb, i = xs
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step), i) if dropout else None
            loss, g = grad_fn(state.params, state.frozen, mb, rng)
            return (jax.tree.map(jnp.add, grads, g), total + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(num_micro)))
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(grads, params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def skip(grads, params, opt_state):
            return params, opt_state

        params, opt_state = jax.lax.cond(ok, update, skip, grads, state.params, state.opt_state)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "supervised_tokens": tokens,
            "tokens": jnp.sum(batch["attention_mask"]),
            "nonfinite": (~ok).astype(jnp.int32),
            "nonfinite_streak": new_state.nonfinite_streak,
            "nonfinite_total": new_state.nonfinite_total,
        }
        return new_state, metrics

    return step


def to_microbatches(batch: dict, num_micro: int) -> dict:
    """[B, ...] host arrays -> [A, B/A, ...] for gradient accumulation."""
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_micro} micro-batches")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}
