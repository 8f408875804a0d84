"""Loading Hugging Face LLaVA checkpoints (safetensors, sharded or not, either key layout)."""

from __future__ import annotations

import os

import numpy as np

from llava_jax.config import llava_config_from_hf
from llava_jax.models.llava import LlavaModel
from llava_jax.weights import mapping
from llava_jax.weights.entries import check_names, checkpoint_dtype, load_entries
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore
from llava_jax.weights.stores import read_json


def load_hf(path: str, dtype: str | None = None, *, scan_layers: bool | None = None) -> LlavaModel:
    """A HF LLaVA directory (`config.json` + `*.safetensors`) as a `LlavaModel`."""
    cfg = llava_config_from_hf(read_json(os.path.join(path, "config.json")), os.path.join(path, "config.json"))
    store = TensorStore.from_dir(path)
    layout = mapping.detect_layout(store.keys())
    if layout.name not in ("hf", "hf_legacy"):
        raise CheckpointError(f"{path}: tensor names look like a {layout!r} checkpoint, not HF LLaVA; "
                              "use llava_jax.convert")
    entries = mapping.entries(cfg)
    expected = {mapping.torch_name(e, layout, cfg.projector_type): e for e in entries}
    check_names(store.keys(), expected, cfg, layout, path)
    dtype = dtype or checkpoint_dtype(store, next(iter(expected)))
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype,
                      scan_layers=cfg.scan_layers if scan_layers is None else scan_layers)
    params = load_entries(store, cfg, entries, layout, dtype=np.dtype(dtype), source=path)
    return LlavaModel(cfg, params)
