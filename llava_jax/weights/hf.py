"""Loading Hugging Face LLaVA checkpoints (safetensors, sharded or not, either key layout)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from llava_jax import paths
from llava_jax.config import LlavaConfig, llava_config_from_hf
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.weights import mapping, model_dir
from llava_jax.weights.converted import load_converted
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore


def read_json(path: str) -> dict:
    """A JSON file, with an error naming it when it is missing or malformed."""
    try:
        return json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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
    place: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, x: jax.device_put(x),
    stacked: bool | None = None,
) -> dict:
    """Read, transform, shape-check and cast each entry; returns our nested parameter tree.

    The tree has the model's layout (`cfg.scan_layers`) unless `stacked` says otherwise: a stacked
    array is filled layer by layer on the host and placed once complete, so the host holds at most
    one stacked parameter beyond what `place` keeps. `place(path, array)` puts each finished array
    where it goes (default: the default device).
    """
    stacked = cfg.scan_layers if stacked is None else stacked
    shapes = mapping.to_layout(abstract_params(cfg), stacked)
    groups: dict[tuple[str, ...], list[tuple[int | None, mapping.Entry]]] = {}
    for e in entries:
        path, row = e.location(stacked)
        groups.setdefault(path, []).append((row, e))
    params: dict = {}
    for path, members in groups.items():
        want = tuple(_get_path(shapes, path).shape)
        out = np.empty(want, dtype) if members[0][0] is not None else None
        for row, e in members:
            name = mapping.torch_name(e, layout, cfg.projector_type)
            x = mapping.to_ours(store.get(name), e.transform)
            want_one = want if row is None else want[1:]
            if tuple(x.shape) != want_one:
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {tuple(x.shape)}, expected {want_one} (ours: {'/'.join(e.path)})"
                )
            if row is None:
                out = np.ascontiguousarray(x.astype(dtype))
            else:
                out[row] = x
        if members[0][0] is not None and len(members) != want[0]:
            raise CheckpointError(f"{source}: {len(members)} of the {want[0]} layers of {'/'.join(path)} were given")
        _set_path(params, path, place(path, out))
    return params


def checkpoint_dtype(store: TensorStore, name: str) -> str:
    """The floating dtype a checkpoint stores its weights in (read off one tensor)."""
    return np.dtype(store.dtype(name)).name


def load_hf(path: str, dtype: str | None = None, *, scan_layers: bool | None = None) -> LlavaModel:
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
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype, scan_layers=cfg.scan_layers if scan_layers is None else scan_layers)
    params = load_entries(store, cfg, entries, layout, dtype=np.dtype(dtype), source=path)
    return LlavaModel(cfg, params)


def load_pretrained(path: str, dtype: str | None = None, lora: str | None = None, *,
                    scan_layers: bool | None = None) -> LlavaModel:
    """Load a LLaVA from a directory (local or gs://): ours, a stage output, a training checkpoint or HF.

    Args:
      path: our `llava_jax_config.json` + Orbax checkpoint (`python -m llava_jax.convert`, a
        training stage's WORKDIR/stageN_NAME), a training checkpoint WORKDIR/checkpoints/STEP, or
        HF's `config.json` + `*.safetensors` (see weights/model_dir.py). A directory that holds
        model directories (a workdir) gives an error listing them. An `adapter/` inside it (a LoRA
        stage's output, an export) is applied.
      dtype: parameter and compute dtype ("float32", "bfloat16", ...); default: the checkpoint's.
      lora: a PEFT LoRA adapter directory to apply instead (ours, peft's, or the original LLaVA's
        with its `non_lora_trainables.bin`); not merged into the weights.
      scan_layers: run each tower's layers as one scan over stacked parameters (the default: compile
        time independent of depth) or unrolled (False: decoding ran 2x faster unrolled on a CPU,
        BENCHMARKS.md, at a compile time that grows with depth).
    """
    from llava_jax.weights import peft

    if lora is not None and not paths.isdir(lora):
        raise CheckpointError(f"{lora}: not a directory (expected a PEFT adapter with {peft.ADAPTER_CONFIG})")
    if model_dir.require(path) in (model_dir.OURS, model_dir.CHECKPOINT):
        model = load_converted(path, dtype, scan_layers=scan_layers)
    else:
        model = load_hf(path, dtype, scan_layers=scan_layers)
    adapter = lora or peft.find_adapter(path)
    if adapter is None:
        return model
    return LlavaModel(*peft.apply_adapter(model.config, model.params, adapter))
