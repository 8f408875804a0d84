"""Reading the mapping's entries from a tensor store into our parameter tree.

Shared by the HF loader (hf.py) and conversion (parts.py): check a store's names against the
entries a config needs, then read, transform, shape-check and cast each entry.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.traverse_util as tu
import jax
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.models.llava import abstract_params
from llava_jax.weights import mapping
from llava_jax.weights.safetensors_io import CheckpointError
from llava_jax.weights.stores import Store


def check_names(store_keys, expected: dict[str, mapping.Entry], cfg: LlavaConfig, layout: mapping.Layout,
                source: str) -> None:
    """Raise if the checkpoint lacks tensors the config needs, or holds ones we cannot place."""
    keys = set(store_keys)
    missing = [n for n in expected if n not in keys]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:4]}")
    unexpected = [k for k in keys if k not in expected and not mapping.is_unused(k, cfg, layout)]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {sorted(unexpected)[:4]}")


def load_entries(
    store: Store,
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
    shapes = tu.flatten_dict(mapping.to_layout(abstract_params(cfg), stacked))
    groups: dict[tuple[str, ...], list[tuple[int | None, mapping.Entry]]] = {}
    for e in entries:
        path, row = e.location(stacked)
        groups.setdefault(path, []).append((row, e))
    params: dict = {}
    for path, members in groups.items():
        want = tuple(shapes[path].shape)
        out = np.empty(want, dtype) if members[0][0] is not None else None
        for row, e in members:
            name = mapping.torch_name(e, layout, cfg.projector_type)
            x = mapping.to_ours(store.get(name), e.transform)
            want_one = want if row is None else want[1:]
            if tuple(x.shape) != want_one:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(x.shape)}, expected {want_one} "
                                      f"(ours: {'/'.join(e.path)})")
            if row is None:
                out = np.ascontiguousarray(x.astype(dtype))
            else:
                out[row] = x
        if members[0][0] is not None and len(members) != want[0]:
            raise CheckpointError(f"{source}: {len(members)} of the {want[0]} layers of {'/'.join(path)} were given")
        params[path] = place(path, out)
    return tu.unflatten_dict(params)


def checkpoint_dtype(store: Store, name: str) -> str:
    """The floating dtype a checkpoint stores its weights in (read off one tensor)."""
    return np.dtype(store.dtype(name)).name
