"""Which parameters train (stages are data), and the optimizer that trains them."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.traverse_util as tu
import jax
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


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 then cosine to 0 (transformers' get_cosine_schedule_with_warmup)."""
    total_steps = max(total_steps, 1)
    warmup = int(math.ceil(warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(
    *, learning_rate: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 1.0,
    other_learning_rate: float | None = None, other: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (torch defaults) with global-norm clipping and warmup + cosine.

    With `other_learning_rate`, parameters whose path fully matches a pattern of `other` follow
    their own warmup + cosine to that peak (the original LLaVA's `mm_projector_lr` parameter group);
    clipping still sees every gradient together, as torch's clip_grad_norm_ over the model does.
    """
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_ratio)
    if other_learning_rate is None:
        adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    else:  # optax.adamw is this chain; only the last link differs between the groups
        pats = [re.compile(p) for p in other]
        label = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "other" if any(p.fullmatch(path_str(tuple(k.key for k in path))) for p in pats) else "main",
            params)
        by_group = {"main": optax.scale_by_learning_rate(schedule),
                    "other": optax.scale_by_learning_rate(learning_rate_schedule(other_learning_rate, total_steps, warmup_ratio))}
        adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                            optax.add_decayed_weights(weight_decay, decay_mask),
                            optax.multi_transform(by_group, label))
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw), schedule



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
