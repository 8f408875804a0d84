"""Our checkpoint directory: what `python -m llava_jax.convert` writes and every other command reads.

  DST/llava_jax_config.json    our `LlavaConfig` (written last: it marks a complete directory)
  DST/params/                  Orbax checkpoint of the parameter tree, nested as in the model:
                               {"vision_tower": ..., "projector": ..., "language_model": ...}
  DST/extra.safetensors        CLIP tensors LLaVA never computes with (post_layernorm, the layers
                               past `vision_feature_layer`), under llava-hf names; only export reads it
  DST/tokenizer.model          (+ tokenizer_config.json etc. when the source has them)
  DST/preprocessor_config.json HF image processor settings (`ImageProcessorConfig`)

Everything is written into `DST.tmp-XXXX` and renamed to DST at the end, so a failed or
interrupted conversion never leaves a DST that looks complete.

`params/` uses Orbax's partial saving (`orbax.checkpoint.experimental.v1.partial`): the tree is
written a few layers at a time, so a 7B model never has to be in host memory at once, and it is
read back with `ocp.load` into any shardings, whole or in part. Training checkpoints store their
parameters with the same `save_params`, so `load_params` and `--to hf` accept them too.

Layers are stored one array per layer (`layers_0/...`, the checkpoint mapping's layout), whatever
the model's layout: a conversion or an export then streams a layer at a time, and the directory
does not depend on `scan_layers`. `save_params` unstacks a scanned model's tree on the host;
`load_params` stacks on the devices, one parameter at a time. Stacked trees on disk load too.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from llava_jax.config import CONFIG_FILE, LlavaConfig
from llava_jax.data.image import PREPROCESSOR_CONFIG, ImageProcessorConfig
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.weights import mapping
from llava_jax.weights.safetensors_io import CheckpointError, save_file

PARAMS_DIR = "params"
EXTRA_FILE = "extra.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
# Where the parameters' dtype is read when the caller does not choose one.
DTYPE_PROBE = ("language_model", "embed_tokens", "embedding")
ORBAX_METADATA = "_CHECKPOINT_METADATA"  # written by every finalized Orbax checkpoint


def save_param_batches(batches: Iterable[dict], directory: str) -> int:
    """Write a parameter tree given as disjoint subtrees, one Orbax partial save each; returns bytes written.

    The checkpoint appears at `directory` only after the last batch (Orbax finalize). Stacked
    layers are written one array per layer (see the module docstring).
    """
    total = 0
    with _saving_context():
        for batch in batches:
            batch = mapping.unstack_layers(batch)
            ocp.partial.save(directory, batch)
            total += sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(batch))
        ocp.partial.finalize(directory)
    return total


def _saving_context():
    # zstd (Orbax's default) saves ~10% on bf16 weights, whose mantissas are noise, and costs a
    # 10x slower write on a small host (35 vs 450 MB/s on 2 cores): weights are stored raw.
    ctx = ocp.Context()
    try:
        ctx.array.saving.use_compression = False
    except AttributeError:  # Orbax releases before the dot-notation options
        ctx = ocp.Context(array_options=ocp.options.ArrayOptions(saving=ocp.options.ArrayOptions.Saving(use_compression=False)))
    return ctx


def save_params(params: dict, directory: str) -> None:
    """Write a parameter tree (numpy or jax arrays, sharded or not) as the Orbax checkpoint at `directory`.

    The format `load_params` reads: training writes `CKPT/params` with it (other items such as
    `CKPT/opt_state` may sit beside it) and keeps `llava_jax_config.json` in CKPT or up to two levels up.
    """
    save_param_batches([params], directory)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _is_orbax(directory: str) -> bool:
    # Orbax also "recognises" a plain safetensors directory (its safetensors layout): ask for its own metadata file.
    return os.path.isfile(os.path.join(directory, ORBAX_METADATA))


def find_checkpoint(path: str) -> tuple[str, str]:
    """(directory holding llava_jax_config.json, Orbax params directory) of a converted or training checkpoint.

    `path` is a directory with `params/` (or the `params/` directory itself); the config is looked
    up in that directory and the two above it, where a training run keeps it.
    """
    path = os.path.abspath(path)
    if _is_orbax(os.path.join(path, PARAMS_DIR)):
        params, base = os.path.join(path, PARAMS_DIR), path
    elif _is_orbax(path):
        params, base = path, os.path.dirname(path)
    else:
        raise CheckpointError(
            f"{path}: no Orbax parameter checkpoint (expected {os.path.join(path, PARAMS_DIR)}/ as written by "
            "llava_jax.convert or the training loop)"
        )
    for d in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
        if os.path.isfile(os.path.join(d, CONFIG_FILE)):
            return d, params
    raise CheckpointError(f"{path}: no {CONFIG_FILE} in {base} or the two directories above it")


def stored_shapes(params_dir: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of every array in an Orbax params checkpoint, from its metadata only."""
    meta = ocp.metadata(params_dir).metadata
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flatten(meta).items()}


def stored_stacked(stored: dict) -> bool:
    """Whether a stored tree (path -> anything) keeps its layers stacked (`layers/...`) or one per layer."""
    return any(mapping.is_stacked_path(p) for p in stored)


def check_stored(cfg: LlavaConfig, stored: dict, source: str) -> None:
    """Raise unless a stored tree holds exactly the parameters, with the shapes, of this config (either layout)."""
    shapes = mapping.to_layout(abstract_params(cfg), stored_stacked(stored))
    want = {p: tuple(x.shape) for p, x in _flatten(shapes).items()}
    missing = ["/".join(p) for p in want if p not in stored]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} parameters missing, e.g. {missing[:4]}")
    unexpected = ["/".join(p) for p in stored if p not in want]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected parameters, e.g. {unexpected[:4]}")
    for p, shape in want.items():
        if stored[p][0] != shape:
            raise CheckpointError(f"{source}: parameter {'/'.join(p)} has shape {stored[p][0]}, the config expects {shape}")


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
        return ocp.load(params_dir, abstract)


def load_params(
    path: str, dtype: str | None = None, shardings: dict | None = None, *, scan_layers: bool | None = None
) -> tuple[LlavaConfig, dict]:
    """Config and parameters of a converted directory or a training checkpoint.

    Args:
      path: a directory with `params/` (see `find_checkpoint`).
      dtype: parameter dtype to load as; default: the stored one.
      shardings: a tree of `jax.sharding.Sharding`s, nested like the parameters (in the model's
        layout), to load each array straight into (no host copy of the whole model); a subtree
        loads only that part. Default: everything on the default device.
      scan_layers: the layout to return (stacked layers or one per layer); default: the config's.
        Stored layers are stacked or unstacked on the devices as needed, one parameter at a time.
    Returns:
      (config with `dtype`, `param_dtype` and `scan_layers` set as loaded, parameter tree).
    """
    cfg_dir, params_dir = find_checkpoint(path)
    cfg = LlavaConfig.load(cfg_dir)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    stored = stored_shapes(params_dir)
    check_stored(cfg, stored, params_dir)
    dtype = dtype or stored[DTYPE_PROBE][1].name
    want = _flatten(abstract_params(cfg))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = _unflatten({p: device for p in want})
    targets = _flatten(shardings)
    for p in targets:
        if p not in want:
            raise CheckpointError(f"{params_dir}: shardings name {'/'.join(p)}, which the checkpoint does not hold")
    # Read in the stored layout, then restack one parameter at a time (peak: one parameter extra).
    target = {p: jax.ShapeDtypeStruct(want[p].shape, np.dtype(dtype), sharding=s) for p, s in targets.items()}
    on_disk = stored_stacked(stored)
    loaded = _flatten(load_tree(params_dir, mapping.to_layout(_unflatten(target), on_disk)))
    if on_disk == cfg.scan_layers:
        return cfg.replace(dtype=dtype, param_dtype=dtype), _unflatten(loaded)
    params = {}
    for p, s in targets.items():
        row = mapping.layer_index(p)
        if on_disk and row is not None:  # one row of a stored stack
            params[p] = _row_taker(s)(loaded[mapping.stack_path(p)], row)
        elif mapping.is_stacked_path(p):
            rows = [loaded.pop(mapping.layer_path(p, i)) for i in range(want[p].shape[0])]
            params[p] = mapping.stack_rows(rows, s)
            del rows
        else:
            params[p] = loaded.pop(p)
    return cfg.replace(dtype=dtype, param_dtype=dtype), _unflatten(params)


@functools.lru_cache(maxsize=None)
def _row_taker(sharding) -> Callable:
    return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=sharding)


def load_converted(path: str, dtype: str | None = None) -> LlavaModel:
    """A converted directory (or training checkpoint) as a `LlavaModel`; what `load_pretrained` calls."""
    cfg, params = load_params(path, dtype)
    return LlavaModel(cfg, params)


def copy_tokenizer(src_dir: str | None, dst_dir: str, shown_as: str) -> list[str]:
    """Copy the tokenizer files `src_dir` has; warn (stderr) when there is no tokenizer.model."""
    copied = []
    for name in TOKENIZER_FILES:
        if src_dir and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    if "tokenizer.model" not in copied:
        print(
            f"warning: {src_dir or 'the source'} has no tokenizer.model; copy the model's sentencepiece "
            f"tokenizer.model into {shown_as} before training or inference",
            file=sys.stderr,
        )
    return copied


def write_preprocessor(preprocessor: ImageProcessorConfig | str, directory: str) -> None:
    """Copy a preprocessor_config.json (a path) or write one from an `ImageProcessorConfig`."""
    if isinstance(preprocessor, str):
        shutil.copy2(preprocessor, os.path.join(directory, PREPROCESSOR_CONFIG))
    else:
        preprocessor.save(directory)


def atomic_directory(dst: str, write: Callable[[str], None]) -> str:
    """Run `write(tmp)` on a fresh `DST.tmp-XXXX` beside DST, then rename it to DST; on any failure remove it."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        write(tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_converted(
    dst: str,
    cfg: LlavaConfig,
    batches: Iterable[dict],
    *,
    extras: Callable[[], list[tuple[str, np.ndarray]]] | None = None,
    tokenizer_dir: str | None = None,
    preprocessor: ImageProcessorConfig | str | None = None,
    write_more: Callable[[str], None] | None = None,
) -> str:
    """Write our directory at `dst` (which must not exist) from parameter batches; returns its path.

    Args:
      cfg: the model config (its `dtype`/`param_dtype` should name the stored dtype).
      batches: disjoint subtrees of the parameter tree, each held in memory only while written.
      extras: returns (llava-hf name, torch-layout array) pairs kept for export in extra.safetensors.
      tokenizer_dir: directory whose tokenizer files are copied.
      preprocessor: preprocessor_config.json to copy, or settings to write (default: from `cfg`).
      write_more: writes further files into the (temporary) directory, e.g. a LoRA adapter.
    """
    if preprocessor is None:
        size = cfg.vision.image_size
        preprocessor = ImageProcessorConfig(size=size, crop_size=size, pad_to_square=False)

    def write(tmp: str) -> None:
        save_param_batches(batches, os.path.join(tmp, PARAMS_DIR))
        kept = extras() if extras else []
        if kept:
            save_file(kept, os.path.join(tmp, EXTRA_FILE), metadata={"format": "pt"})
        copy_tokenizer(tokenizer_dir, tmp, dst)
        write_preprocessor(preprocessor, tmp)
        if write_more is not None:
            write_more(tmp)
        cfg.save(tmp)  # last, so that a directory with a config is a complete one

    return atomic_directory(dst, write)
