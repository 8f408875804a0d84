"""Loading Hugging Face LLaVA checkpoints (safetensors, sharded or not, either key layout)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from llava_jax import paths
from llava_jax.config import LlavaConfig, llava_config_from_hf
from llava_jax.models.llava import LlavaModel, init_params
from llava_jax.weights import mapping, model_dir
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore


def read_json(path: str) -> dict:
    """A JSON file, with an error naming it when it is missing or malformed."""
    try:
        return json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def abstract_params(cfg: LlavaConfig) -> dict:
    """Parameter shapes and dtypes of a config, without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def _get_path(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def check_names(store_keys, expected: dict[str, mapping.Entry], cfg: LlavaConfig, layout: mapping.Layout, source: str) -> None:
    """Raise if the checkpoint lacks tensors the config needs, or holds ones we cannot place."""
    keys = set(store_keys)
    missing = [n for n in expected if n not in keys]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:4]}")
    unexpected = [k for k in keys if k not in expected and not mapping.is_unused(k, cfg, layout)]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {sorted(unexpected)[:4]}")


def load_entries(
    store: TensorStore,
    cfg: LlavaConfig,
    entries: list[mapping.Entry],
    layout: mapping.Layout,
    *,
    dtype: np.dtype,
    source: str,
    place: Callable[[mapping.Entry, np.ndarray], Any] = lambda e, x: jax.device_put(x),
    shapes: dict | None = None,
) -> dict:
    """Read, transform, shape-check and cast each entry; returns our nested parameter tree.

    `shapes` (from `abstract_params(cfg)`) saves re-tracing the model when called once per tensor group.
    """
    shapes = shapes if shapes is not None else abstract_params(cfg)
    params: dict = {}
    for e in entries:
        name = mapping.torch_name(e, layout, cfg.projector_type)
        x = mapping.to_ours(store.get(name), e.transform)
        want = tuple(_get_path(shapes, e.path).shape)
        if tuple(x.shape) != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(x.shape)}, expected {want} (ours: {'/'.join(e.path)})")
        _set_path(params, e.path, place(e, np.ascontiguousarray(x.astype(dtype))))
    return params


def checkpoint_dtype(store: TensorStore, name: str) -> str:
    """The floating dtype a checkpoint stores its weights in (read off one tensor)."""
    return np.dtype(store.dtype(name)).name


def load_hf(path: str, dtype: str | None = None) -> LlavaModel:
    """A HF LLaVA directory (`config.json` + `*.safetensors`) as a `LlavaModel`."""
    cfg = llava_config_from_hf(read_json(os.path.join(path, "config.json")), os.path.join(path, "config.json"))
    store = TensorStore.from_dir(path)
    layout = mapping.detect_layout(store.keys())
    if layout.name not in ("hf", "hf_legacy"):
        raise CheckpointError(f"{path}: tensor names look like a {layout!r} checkpoint, not HF LLaVA; use llava_jax.convert")
    entries = mapping.entries(cfg)
    expected = {mapping.torch_name(e, layout, cfg.projector_type): e for e in entries}
    check_names(store.keys(), expected, cfg, layout, path)
    dtype = dtype or checkpoint_dtype(store, next(iter(expected)))
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = load_entries(store, cfg, entries, layout, dtype=np.dtype(dtype), source=path)
    return LlavaModel(cfg, params)


def load_pretrained(path: str, dtype: str | None = None) -> LlavaModel:
    """Load a LLaVA from a directory (local or gs://): ours, a stage output, a training checkpoint or HF.

    Args:
      path: our `llava_jax_config.json` + Orbax checkpoint (`python -m llava_jax.convert`, a
        training stage's WORKDIR/stageN_NAME), a training checkpoint WORKDIR/checkpoints/STEP, or
        HF's `config.json` + `*.safetensors` (see weights/model_dir.py). A directory that holds
        model directories (a workdir) gives an error listing them.
      dtype: parameter and compute dtype ("float32", "bfloat16", ...); default: the checkpoint's.
    """
    if model_dir.require(path) in (model_dir.OURS, model_dir.CHECKPOINT):
        from llava_jax.weights.converted import load_converted

        return load_converted(path, dtype)
    return load_hf(path, dtype)
