"""Orbax checkpoints of a parameter tree: written in batches, read by metadata and in part.

`params/` of our model directories and of training checkpoints. Orbax's partial saving
(`orbax.checkpoint.experimental.v1.partial`) writes the tree a few layers at a time, so a 7B model
never has to be in host memory at once; `load_tree` reads any subtree back into any shardings.
Layers are stored one array per layer (`layers_0/...`) whatever the model's layout (converted.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Iterable

import flax.traverse_util as tu
import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from llava_jax import paths
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import abstract_params
from llava_jax.weights import mapping
from llava_jax.weights.safetensors_io import CheckpointError

ORBAX_METADATA = "_CHECKPOINT_METADATA"  # written by every finalized Orbax checkpoint


def save_param_batches(batches: Iterable[dict], directory: str) -> int:
    """Write a parameter tree given as disjoint subtrees, one Orbax partial save each; returns bytes written.

    The checkpoint appears at `directory` only after the last batch (Orbax finalize). Stacked
    layers are written one array per layer (see the module docstring). On object storage (gs://)
    Orbax cannot save partially (it snapshots the growing checkpoint, which its commit-file
    atomicity there does not offer): the batches are gathered and written as one tree.
    """
    total = 0
    with _saving_context():
        if paths.is_remote(directory):
            flat: dict = {}
            for batch in batches:
                flat.update(tu.flatten_dict(mapping.unstack_layers(batch)))
            ocp.save(directory, tu.unflatten_dict(flat))
            return _nbytes(flat.values())
        for batch in batches:
            batch = mapping.unstack_layers(batch)
            ocp.partial.save(directory, batch)
            total += _nbytes(jax.tree.leaves(batch))
        ocp.partial.finalize(directory)
    return total


def _nbytes(arrays: Iterable) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in arrays)


def _saving_context():
    # zstd (Orbax's default) saves ~10% on bf16 weights, whose mantissas are noise, and costs a
    # 10x slower write on a small host (35 vs 450 MB/s on 2 cores): weights are stored raw.
    ctx = ocp.Context()
    try:
        ctx.array.saving.use_compression = False
    except AttributeError:  # Orbax releases before the dot-notation options
        opts = ocp.options.ArrayOptions
        ctx = ocp.Context(array_options=opts(saving=opts.Saving(use_compression=False)))
    return ctx


def save_params(params: dict, directory: str) -> None:
    """Write a parameter tree (numpy or jax arrays, sharded or not) as the Orbax checkpoint at `directory`.

    The format `load_params` reads: training writes `CKPT/params` with it (other items such as
    `CKPT/opt_state` may sit beside it) and keeps `llava_jax_config.json` in CKPT or up to two levels up.
    """
    save_param_batches([params], directory)


def is_orbax(directory: str) -> bool:
    """Whether `directory` is a finalized Orbax checkpoint."""
    # Orbax also "recognises" a plain safetensors directory (its safetensors layout): ask for its own metadata file.
    return paths.isfile(os.path.join(directory, ORBAX_METADATA))


def stored_shapes(params_dir: str,
                  prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of every array in an Orbax checkpoint (under `prefix` of its tree), from metadata only."""
    try:
        with _quiet_absl():
            meta = ocp.metadata(params_dir).metadata
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for damaged files
        raise damaged(params_dir, e) from None
    if meta is None:  # what Orbax returns when the tree metadata's files are cut short
        raise CheckpointError(f"{params_dir}: damaged Orbax checkpoint: its tree metadata cannot be read "
                              "(files cut short or missing); write it again")
    for i, k in enumerate(prefix):
        if not isinstance(meta, Mapping) or k not in meta:
            raise CheckpointError(f"{params_dir}: damaged Orbax checkpoint: no {'/'.join(prefix[:i + 1])} in its tree")
        meta = meta[k]
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in tu.flatten_dict(dict(meta)).items()}


@contextlib.contextmanager
def _quiet_absl():
    # Orbax logs a multi-line WARNING ("Failed to get metadata ... Error details: ...") before it returns
    # no metadata for a damaged tree; the CheckpointError raised then says it in one line.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def damaged(params_dir: str, error: BaseException) -> CheckpointError:
    """One line naming a damaged checkpoint and the root cause TensorStore gives (the first line of the
    innermost error: a 185-line TensorStore spec is no help to a user)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return CheckpointError(f"{params_dir}: damaged Orbax checkpoint ({first[:300]}); write it again")


def stored_stacked(stored: dict) -> bool:
    """Whether a stored tree (path -> anything) keeps its layers stacked (`layers/...`) or one per layer."""
    return any(mapping.is_stacked_path(p) for p in stored)


def check_stored(cfg: LlavaConfig, stored: dict, source: str) -> None:
    """Raise unless a stored tree holds exactly the parameters, with the shapes, of this config (either layout)."""
    shapes = mapping.to_layout(abstract_params(cfg), stored_stacked(stored))
    want = {p: tuple(x.shape) for p, x in tu.flatten_dict(shapes).items()}
    missing = ["/".join(p) for p in want if p not in stored]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} parameters missing, e.g. {missing[:4]}")
    unexpected = ["/".join(p) for p in stored if p not in want]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected parameters, e.g. {unexpected[:4]}")
    for p, shape in want.items():
        if stored[p][0] != shape:
            raise CheckpointError(f"{source}: parameter {'/'.join(p)} has shape {stored[p][0]}, "
                                  f"the config expects {shape}")


def _partial_load_context():
    ctx = ocp.Context()
    try:
        ctx.pytree.loading.partial_load = True
    except AttributeError:  # Orbax releases before the dot-notation options
        opts = ocp.options.PyTreeOptions
        ctx = ocp.Context(pytree_options=opts(loading=opts.Loading(partial_load=True)))
    return ctx


def load_tree(params_dir: str, abstract: dict) -> dict:
    """The leaves named by `abstract` (a subtree of `jax.ShapeDtypeStruct`s with shardings), cast and placed."""
    with _partial_load_context():
        try:
            return ocp.load(params_dir, abstract)
        except Exception as e:  # TensorStore reports a short or missing file as a bare Exception
            raise damaged(params_dir, e) from None
