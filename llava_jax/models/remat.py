"""Remat (activation checkpointing) policies by name: the config's `remat`, MaxText's names where it has them."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

# Names the layers give their activations (`checkpoint_name`), for the policies below: the
# projections of attention and MLP, and "context", the attention kernel's residuals.
QKV = ("query_proj", "key_proj", "value_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _policies() -> dict:
    cp = jax.checkpoint_policies
    saved = cp.save_only_these_names

    def offloaded(*names):  # to pinned host memory (GPU and TPU); the device keeps nothing
        return cp.save_and_offload_only_these_names(names_which_can_be_saved=[], names_which_can_be_offloaded=names,
                                                    offload_src="device", offload_dst="pinned_host")

    return {
        # From least memory (most recomputation) to most; MaxText's names where it has them.
        "full": cp.nothing_saveable,
        "save_out_proj": saved("out_proj"),
        "save_qkv_proj": saved(*QKV),
        "save_dot_except_mlp": saved(*QKV, "out_proj"),
        "save_dot_with_context_except_mlp": saved(*QKV, "out_proj", "context"),
        "save_dot_except_mlpwi": saved(*QKV, "out_proj", "down_proj"),
        "minimal": saved(*QKV, "out_proj", *MLP),  # every projection: only norms, RoPE, softmax recomputed
        "minimal_with_context": saved(*QKV, "out_proj", *MLP, "context"),
        "qkv_proj_offloaded": offloaded(*QKV),
        "minimal_offloaded": offloaded(*QKV, "out_proj", *MLP),
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "none": None,
    }


REMAT_POLICIES = tuple(_policies())


def remat_policy(name: str):
    """Checkpoint policy by name (the config's `remat`); `None` means no remat at all.

    Which one pays depends on memory: a policy saves what it names per layer and token
    (save_qkv_proj: 3 x D; minimal: 4 x D + 3 x I) and recomputes the rest in the backward pass.
    BENCHMARKS.md has per-device memory of each for the 7B step (TPU compiler, AOT).
    """
    policies = _policies()
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(policies)}")
    return policies[name]


def maybe_remat(
    module_cls: type[nn.Module], policy_name: str, static_argnums: Sequence[int] = (), *, prevent_cse: bool = True
) -> type[nn.Module]:
    """Wrap a layer class in `nn.remat` with the named policy (identity for 'none')."""
    if policy_name == "none":
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy_name), prevent_cse=prevent_cse,
                    static_argnums=tuple(static_argnums))
