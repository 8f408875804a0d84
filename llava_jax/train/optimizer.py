"""Which parameters train (stages are data), and the optimizer that trains them."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llava_jax.models.stack import STACK_AXIS

Params = dict[str, Any]


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def split_params(params: Params, trainable: Sequence[str]) -> tuple[Params, Params]:
    """(trainable, frozen) nested trees; a parameter trains when its path fully matches a pattern.

    Patterns are regular expressions over "/"-joined paths, e.g. "projector/.*" (stage 1) or
    "(projector|language_model)/.*" (stage 2).
    """
    pats = [re.compile(p) for p in trainable]
    flat = tu.flatten_dict(params)
    train = {k: v for k, v in flat.items() if any(p.fullmatch(path_str(k)) for p in pats)}
    if not train:
        raise ValueError(f"no parameter matches the trainable patterns {list(trainable)}")
    frozen = {k: v for k, v in flat.items() if k not in train}
    return tu.unflatten_dict(train), tu.unflatten_dict(frozen) if frozen else {}


def merge_params(a: Params, b: Params) -> Params:
    """The union of two disjoint nested trees."""
    return tu.unflatten_dict({**tu.flatten_dict(a), **tu.flatten_dict(b)})


def decay_mask(params: Params) -> Params:
    """Weight decay on matrices only: never on biases, norm scales or embeddings' 1-D params.

    A stacked parameter (under `layers`, see models/stack.py) is a matrix when each layer's is.
    """

    def is_matrix(path, x) -> bool:
        stacked = any(getattr(k, "key", None) == STACK_AXIS for k in path)
        return x.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


# The schedule's numbers (learning rates, warmup and decay lengths, weight decay) as arrays. The train
# step takes them as an input instead of baking them into its program as constants, so that runs of
# one model that differ only in their length or learning rate (a test's `--config.max_steps=2`, a
# second stage with the same shapes) compile one program, which the persistent cache then shares.
Hyper = dict[str, Any]


def schedule_hyper(learning_rate: float, total_steps: int, warmup_ratio: float, *, weight_decay: float = 0.0,
                   other_learning_rate: float | None = None) -> Hyper:
    """The numbers of `make_optimizer`'s schedules, as the step's input (float32 / int32 scalars)."""
    total_steps = max(total_steps, 1)
    warmup = int(math.ceil(warmup_ratio * total_steps))
    hyper = {"learning_rate": np.float32(learning_rate), "warmup_steps": np.int32(warmup),
             "decay_steps": np.int32(max(total_steps, warmup + 1)), "weight_decay": np.float32(weight_decay)}
    if other_learning_rate is not None:
        hyper["other_learning_rate"] = np.float32(other_learning_rate)
    return hyper


def warmup_cosine(peak: Any, warmup_steps: Any, decay_steps: Any) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine to 0 at `decay_steps`
    (transformers' get_cosine_schedule_with_warmup; optax's warmup_cosine_decay_schedule with end 0).

    Unlike optax's, it takes its numbers as traced arrays too (no Python branch on them).
    """

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warmup = jnp.asarray(warmup_steps, jnp.float32)
        decay = jnp.asarray(decay_steps, jnp.float32) - warmup  # > 0: schedule_hyper makes decay_steps > warmup
        rising = peak * jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)
        falling = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay) / decay))
        return jnp.where(count < warmup, rising, falling)

    return schedule


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 then cosine to 0 (transformers' get_cosine_schedule_with_warmup)."""
    h = schedule_hyper(peak, total_steps, warmup_ratio)
    return warmup_cosine(h["learning_rate"], h["warmup_steps"], h["decay_steps"])


def optimizer_from_hyper(
    hyper: Hyper, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 1.0,
    other: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` with its schedules' numbers from `hyper` (`schedule_hyper`; arrays or traced).

    The optimizer state's structure does not depend on `hyper`: a state made by one hyper works with another.
    """
    schedule = warmup_cosine(hyper["learning_rate"], hyper["warmup_steps"], hyper["decay_steps"])
    weight_decay = hyper["weight_decay"]
    if "other_learning_rate" not in hyper:
        adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    else:  # optax.adamw is this chain; only the last link differs between the groups
        pats = [re.compile(p) for p in other]
        label = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "other" if any(p.fullmatch(path_str(tuple(k.key for k in path))) for p in pats) else "main",
            params)
        other_schedule = warmup_cosine(hyper["other_learning_rate"], hyper["warmup_steps"], hyper["decay_steps"])
        by_group = {"main": optax.scale_by_learning_rate(schedule),
                    "other": optax.scale_by_learning_rate(other_schedule)}
        adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                            optax.add_decayed_weights(weight_decay, decay_mask),
                            optax.multi_transform(by_group, label))
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw), schedule


def make_optimizer(
    *, learning_rate: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 1.0,
    other_learning_rate: float | None = None, other: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (torch defaults) with global-norm clipping and warmup + cosine.

    With `other_learning_rate`, parameters whose path fully matches a pattern of `other` follow
    their own warmup + cosine to that peak (the original LLaVA's `mm_projector_lr` parameter group);
    clipping still sees every gradient together, as torch's clip_grad_norm_ over the model does.
    The schedule's numbers are constants here; the training loop passes them to its step as arrays
    (`schedule_hyper`, `optimizer_from_hyper`).
    """
    hyper = schedule_hyper(learning_rate, total_steps, warmup_ratio, weight_decay=weight_decay,
                           other_learning_rate=other_learning_rate)
    return optimizer_from_hyper(hyper, b1=b1, b2=b2, eps=eps, clip_norm=clip_norm, other=other)


# The vision tower's parameters: the group a stage's `vision_learning_rate` trains (LLaVA-NeXT's
# `mm_vision_tower_lr`, 2e-6 in its stage 2 while the LLM and projector train at 1e-5).
VISION_TOWER = ("vision_tower/.*",)


def learning_rate_groups(stage: Any, lora_non_lora_learning_rate: float | None = None
                         ) -> tuple[float | None, list[str]]:
    """(other_learning_rate, other patterns) for `make_optimizer` from a stage's config.

    A LoRA stage trains its non-adapter trainables (`stage.trainable`) at the LoRA config's rate; otherwise
    a stage with `vision_learning_rate` > 0 trains the vision tower at that rate (validate.py refuses the
    two together). Neither: one group.
    """
    if lora_non_lora_learning_rate is not None:
        return lora_non_lora_learning_rate, list(stage.trainable)
    if stage.vision_learning_rate > 0:
        return float(stage.vision_learning_rate), list(VISION_TOWER)
    return None, []
