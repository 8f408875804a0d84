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
read back with `ocp.load` into any shardings, whole or in part.

Layers are stored one array per layer (`layers_0/...`, the checkpoint mapping's layout), whatever
the model's layout: a conversion or an export then streams a layer at a time, and the directory
does not depend on `scan_layers`. `save_params` unstacks a scanned model's tree on the host;
`load_params` stacks on the devices, one parameter at a time. Stacked trees on disk load too.

A training checkpoint (WORKDIR/checkpoints/STEP) is read as a model too (`open_model`): its state
holds the trained parameters under `params` (in the model's layout, stacked when scanned), and
its meta names the model directory the frozen ones come from (weights/model_dir.py), so
`load_params`, `load_pretrained` and `--to hf` accept it. Each part is read in its own layout.

DST may be local or `gs://...` (llava_jax/paths.py). Object storage cannot rename a directory:
there the files are written in place, the config still last, and removed again on failure.
"""

from __future__ import annotations

import dataclasses
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

from llava_jax import paths
from llava_jax.config import CONFIG_FILE, LlavaConfig
from llava_jax.data.image import PREPROCESSOR_CONFIG, ImageProcessorConfig
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.weights import mapping, model_dir
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
    layers are written one array per layer (see the module docstring). On object storage (gs://)
    Orbax cannot save partially (it snapshots the growing checkpoint, which its commit-file
    atomicity there does not offer): the batches are gathered and written as one tree.
    """
    total = 0
    with _saving_context():
        if paths.is_remote(directory):
            flat: dict = {}
            for batch in batches:
                flat.update(_flatten(mapping.unstack_layers(batch)))
            ocp.save(directory, _unflatten(flat))
            return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in flat.values())
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
    return paths.isfile(os.path.join(directory, ORBAX_METADATA))


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """A model on disk: its config, where its other files are, and the Orbax checkpoints holding its parameters.

    Attributes:
      path: the directory as given (for messages).
      cfg: the architecture, as stored.
      file_dirs: where tokenizer files, preprocessor_config.json and extra.safetensors are looked
        up, in order.
      parts: (Orbax checkpoint directory, path of the parameter tree inside it) pairs; a
        parameter comes from the first part that holds it. Each part has its own layer layout
        (stacked or one array per layer).
      image_processor: the image settings when recorded directly (training checkpoints).
    """

    path: str
    cfg: LlavaConfig
    file_dirs: tuple[str, ...]
    parts: tuple[tuple[str, tuple[str, ...]], ...]
    image_processor: ImageProcessorConfig | None = None

    @functools.cached_property
    def stored(self) -> tuple[dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]], ...]:
        """Each part's arrays, path -> (shape, dtype) in the part's own layout, from metadata only."""
        return tuple(stored_shapes(directory, prefix) for directory, prefix in self.parts)

    @property
    def stacked(self) -> bool:
        """Whether any part stores its layers stacked (then read a stacked parameter at a time)."""
        return any(stored_stacked(held) for held in self.stored)

    def shapes(self) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        """Every stored parameter, one array per layer: path -> (shape, dtype), whichever part holds it."""
        out: dict = {}
        for held in reversed(self.stored):
            for p, (shape, dtype) in held.items():
                if mapping.is_stacked_path(p):
                    out.update({mapping.layer_path(p, i): (shape[1:], dtype) for i in range(shape[0])})
                else:
                    out[p] = (shape, dtype)
        return out

    def load(self, targets: dict) -> dict:
        """Path -> array for `targets` (path in either layout -> ShapeDtypeStruct with its sharding).

        Each parameter is read from the first part holding it, in that part's layout, then stacked
        or split into rows on the devices, one parameter at a time.
        """
        remaining, out = dict(targets), {}
        for (directory, prefix), held in zip(self.parts, self.stored):
            mine = {p: t for p, t in remaining.items() if all(q in held for q in _stored_paths(p, t, held))}
            if mine:
                out.update(_read_part(directory, prefix, mine, held))
                remaining = {p: t for p, t in remaining.items() if p not in mine}
        if remaining:
            raise CheckpointError(f"{self.path}: {len(remaining)} parameters held nowhere, e.g. "
                                  f"{['/'.join(p) for p in list(remaining)[:4]]}")
        return out

    def find_file(self, name: str) -> str | None:
        """The first of `file_dirs` holding `name`, or None."""
        return next((d for d in self.file_dirs if paths.exists(os.path.join(d, name))), None)


def _stored_paths(p: tuple[str, ...], t, held: dict) -> list[tuple[str, ...]]:
    """The stored paths a target parameter is read from, in the layout of `held`."""
    on_disk = stored_stacked(held)
    if mapping.is_stacked_path(p) and not on_disk:
        return [mapping.layer_path(p, i) for i in range(t.shape[0])]
    if on_disk and mapping.layer_index(p) is not None:
        return [mapping.stack_path(p)]
    return [p]


def _read_part(directory: str, prefix: tuple[str, ...], targets: dict, held: dict) -> dict:
    """`targets` read from one Orbax checkpoint in its layout, then stacked / split into the targets' layout."""
    on_disk = stored_stacked(held)
    want: dict = {}
    for p, t in targets.items():
        if mapping.is_stacked_path(p) and not on_disk:
            row = jax.ShapeDtypeStruct(t.shape[1:], t.dtype, sharding=mapping.without_leading_axis(t.sharding))
            want.update({q: row for q in _stored_paths(p, t, held)})
        elif on_disk and mapping.layer_index(p) is not None:
            q = mapping.stack_path(p)
            want[q] = jax.ShapeDtypeStruct(held[q][0], t.dtype, sharding=mapping.with_leading_axis(t.sharding))
        else:
            want[p] = t
    tree = load_tree(directory, _unflatten({prefix + q: v for q, v in want.items()}))
    for k in prefix:
        tree = tree[k]
    loaded = _flatten(tree)
    out = {}
    for p, t in targets.items():
        if mapping.is_stacked_path(p) and not on_disk:
            rows = [loaded.pop(q) for q in _stored_paths(p, t, held)]
            out[p] = mapping.stack_rows(rows, t.sharding)
            del rows
        elif on_disk and (row := mapping.layer_index(p)) is not None:
            out[p] = _row_taker(t.sharding)(loaded[mapping.stack_path(p)], row)
        else:
            out[p] = loaded.pop(p)
    return out


@functools.lru_cache(maxsize=None)
def _row_taker(sharding) -> Callable:
    return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=sharding)


def open_model(path: str) -> StoredModel:
    """Our directory, a `params/` checkpoint with its config up to two levels up, or a training checkpoint."""
    path = paths.absolute(path)
    if model_dir.kind(path) == model_dir.CHECKPOINT:
        return _open_training_checkpoint(path)
    if _is_orbax(os.path.join(path, PARAMS_DIR)):
        params, base = os.path.join(path, PARAMS_DIR), path
    elif _is_orbax(path):
        params, base = path, os.path.dirname(path)
    else:
        raise CheckpointError(
            f"{path}: no Orbax parameter checkpoint (expected {os.path.join(path, PARAMS_DIR)}/ as written by "
            "llava_jax.convert or the training loop)"
        )
    search = (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base)))
    for d in search:
        if paths.isfile(os.path.join(d, CONFIG_FILE)):
            return StoredModel(path, LlavaConfig.load(d), search, ((params, ()),))
    raise CheckpointError(f"{path}: no {CONFIG_FILE} in {base} or the two directories above it")


def _open_training_checkpoint(path: str) -> StoredModel:
    record = model_dir.checkpoint_model(path)
    parts: tuple = ((path, ("params",)),)
    file_dirs: tuple = ()
    if record["frozen_from"]:
        frozen = open_model(record["frozen_from"])
        parts += frozen.parts
        file_dirs = frozen.file_dirs
    if record.get("tokenizer"):
        file_dirs += (os.path.dirname(record["tokenizer"]),)
    return StoredModel(path, record["config"], file_dirs, parts,
                       ImageProcessorConfig.from_dict(record["image_processor"]))


def find_checkpoint(path: str) -> tuple[str, str]:
    """(directory holding llava_jax_config.json, Orbax params directory) of a converted directory.

    `path` is a directory with `params/` (or the `params/` directory itself); the config is looked
    up in that directory and the two above it. (`open_model` also reads training checkpoints.)
    """
    model = open_model(path)
    if len(model.parts) != 1 or model.parts[0][1]:
        raise CheckpointError(f"{path}: a training checkpoint, not one parameter directory; use open_model")
    return model.find_file(CONFIG_FILE), model.parts[0][0]


def stored_shapes(params_dir: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of every array in an Orbax checkpoint (under `prefix` of its tree), from metadata only."""
    meta = ocp.metadata(params_dir).metadata
    for k in prefix:
        meta = meta[k]
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
    """Config and parameters of a converted directory, a stage output or a training checkpoint.

    Args:
      path: a directory with `params/` or a training checkpoint (see `open_model`).
      dtype: parameter dtype to load as; default: the stored one.
      shardings: a tree of `jax.sharding.Sharding`s, nested like the parameters (in the model's
        layout), to load each array straight into (no host copy of the whole model); a subtree
        loads only that part. Default: everything on the default device.
      scan_layers: the layout to return (stacked layers or one per layer); default: the config's.
        Stored layers are stacked or unstacked on the devices as needed, one parameter at a time.
    Returns:
      (config with `dtype`, `param_dtype` and `scan_layers` set as loaded, parameter tree).
    """
    model = open_model(path)
    cfg = model.cfg if scan_layers is None else model.cfg.replace(scan_layers=scan_layers)
    stored = model.shapes()
    check_stored(cfg, stored, model.path)
    dtype = dtype or stored[DTYPE_PROBE][1].name
    want = _flatten(abstract_params(cfg))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = _unflatten({p: device for p in want})
    targets = _flatten(shardings)
    for p in targets:
        if p not in want:
            raise CheckpointError(f"{model.path}: shardings name {'/'.join(p)}, which the checkpoint does not hold")
    target = {p: jax.ShapeDtypeStruct(want[p].shape, np.dtype(dtype), sharding=s) for p, s in targets.items()}
    return cfg.replace(dtype=dtype, param_dtype=dtype), _unflatten(model.load(target))


def load_converted(path: str, dtype: str | None = None, *, scan_layers: bool | None = None) -> LlavaModel:
    """A converted directory (or training checkpoint) as a `LlavaModel`; what `load_pretrained` calls."""
    cfg, params = load_params(path, dtype, scan_layers=scan_layers)
    return LlavaModel(cfg, params)


def copy_tokenizer(src_dir: str | None, dst_dir: str, shown_as: str) -> list[str]:
    """Copy the tokenizer files `src_dir` has; warn (stderr) when there is no tokenizer.model."""
    copied = []
    for name in TOKENIZER_FILES:
        if src_dir and paths.isfile(os.path.join(src_dir, name)):
            paths.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))
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
        paths.copy(preprocessor, os.path.join(directory, PREPROCESSOR_CONFIG))
    else:
        preprocessor.save(directory)


def atomic_directory(dst: str, write: Callable[[str], None]) -> str:
    """Run `write(tmp)` on a fresh `DST.tmp-XXXX` beside DST, then rename it to DST; on any failure remove it.

    The result gets the permissions of a directory the user creates (umask), not mkdtemp's 0700.
    On object storage (no directory rename) `write` runs on DST itself, which is removed on failure;
    writers put the file that marks a complete directory last.
    """
    dst = paths.absolute(dst)
    if paths.exists(dst):
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    if paths.is_remote(dst):
        try:
            write(dst)
        except BaseException:
            paths.rmtree(dst)
            raise
        return dst
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
