"""Shardings of the train state and of input batches over the mesh, from the rules table."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig
from llava_jax.models.attention import target_platform
from llava_jax.models.llava import abstract_params
from llava_jax.parallel import rules as rules_lib

# image_index: anyres only; image_weight: weighted geometries only (OneVision); segment_ids, positions: packed rows only
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_index", "image_weight", "segment_ids",
              "positions")


def model_param_shardings(cfg: LlavaConfig, mesh: Mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> Any:
    """NamedShardings for every parameter of a config (nested like the parameters), nothing allocated."""
    return rules_lib.param_shardings(abstract_params(cfg, boxed=True), mesh, rules)


def sharded_shapes(shapes: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `shapes` carrying `shardings` (the same tree): arguments to lower
    and compile a program with, no arrays allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_sharded_params(cfg: LlavaConfig, mesh: Mesh, rules: rules_lib.Rules = rules_lib.DEFAULT_RULES) -> Any:
    """Every parameter of a config as a shape with its sharding on the mesh by the rules table."""
    return sharded_shapes(abstract_params(cfg), model_param_shardings(cfg, mesh, rules))


def subtree_like(full: Any, sub: Any) -> Any:
    """The part of `full` (a nested dict) with the keys of `sub`."""
    if not isinstance(sub, dict):
        return full
    return {k: subtree_like(full[k], v) for k, v in sub.items()}


def state_shardings(state_abstract: Any, cfg: LlavaConfig, mesh: Mesh, rules: rules_lib.Rules, tx) -> Any:
    """Shardings for every leaf of a TrainState: parameters and their Adam moments by the rules table."""
    by_path = model_param_shardings(cfg, mesh, rules)
    params_sh = subtree_like(by_path, state_abstract.params)
    frozen_sh = subtree_like(by_path, state_abstract.frozen)
    repl = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state_abstract.opt_state, params_sh,
                                   transform_non_params=lambda _: repl)
    return state_abstract.replace(step=repl, params=params_sh, frozen=frozen_sh, opt_state=opt_sh,
                                  nonfinite_streak=repl, nonfinite_total=repl)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Micro-batched arrays [A, B, ...]: rows over data x fsdp, everything else whole."""
    return {k: NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (np.ndim(v) - 2))))
            for k, v in batch.items()}


def device_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's micro-batched rows [A, b_local, ...] -> global device arrays [A, b_global, ...].

    Keys other than BATCH_KEYS (host-side bookkeeping such as `image_mask`) stay behind. Each
    process passes its own rows; `make_array_from_process_local_data` assembles the global batch
    without any host seeing all of it. (Splitting a batch into micro-batches is the trainer's
    business: `train.step.to_microbatches`.)
    """
    batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
    out = {}
    for (k, v), sh in zip(batch.items(), batch_shardings(batch, mesh).values()):
        global_shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
        out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
    return out


def mesh_platform(mesh) -> str:
    """The platform a mesh's devices are on; an AbstractMesh without devices: this host's backend."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = getattr(mesh, "abstract_device", None)
        return device.platform if device is not None else jax.default_backend()
    return mesh.devices.flat[0].platform


def jit_sharded(fn, mesh: Mesh, rules: rules_lib.Rules, in_shardings, out_shardings, donate_argnums=()):
    """`jax.jit` of `fn` with explicit shardings, traced under the mesh and the logical-axis rules.

    The rules must be active while tracing (when `nn.with_logical_constraint` reads them), so they
    wrap the traced function; the mesh wraps each call (`jax.set_mesh` is not allowed inside jit).
    The mesh's platform, not the host's, chooses the attention kernels (`target_platform`).
    The result has `.lower(*abstract_args)` for ahead-of-time compilation.
    """
    import flax.linen as nn

    platform = mesh_platform(mesh)  # "tpu" when compiling for a TPU topology from a CPU host

    def traced(*args):
        with nn.logical_axis_rules(rules), target_platform(platform):
            return fn(*args)

    jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    def call(*args):
        with jax.set_mesh(mesh):  # the mesh the constraints' logical names resolve against
            return jitted(*args)

    call.lower = lambda *args: _lower(jitted, mesh, *args)
    return call


def _lower(jitted, mesh, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)
