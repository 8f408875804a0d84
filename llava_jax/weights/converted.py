"""Our checkpoint directory: what `python -m llava_jax.convert` writes and every other command reads.

  DST/llava_jax_config.json    our `LlavaConfig` (written last: it marks a complete directory)
  DST/params/                  Orbax checkpoint of the parameter tree, nested as in the model:
                               {"vision_tower": ..., "projector": ..., "language_model": ...}
  DST/extra.safetensors        CLIP tensors LLaVA never computes with (post_layernorm, the layers
                               past `vision_feature_layer`), under llava-hf names; only export reads it
  DST/tokenizer.model          (+ tokenizer_config.json etc. when the source has them)
  DST/preprocessor_config.json HF image processor settings (`ImageProcessorConfig`)

Everything is written into `DST.tmp-XXXXXXXX` and renamed to DST at the end
(`paths.atomic_directory`), so a failed or interrupted conversion never leaves a DST that looks complete.

`params/` is an Orbax checkpoint written a few layers at a time and read back into any shardings,
whole or in part (orbax_io.py).

Layers are stored one array per layer (`layers_0/...`, the checkpoint mapping's layout), whatever
the model's layout: a conversion or an export then streams a layer at a time, and the directory
does not depend on `scan_layers`. `save_params` unstacks a scanned model's tree on the host;
`load_params` stacks on the devices, one parameter at a time. Stacked trees on disk load too.

A training checkpoint (WORKDIR/checkpoints/STEP) is read as a model too (`open_model`): its state
holds the trained parameters under `params` (in the model's layout, stacked when scanned), and
its meta names the model directory the frozen ones come from (weights/model_dir.py), so
`load_params`, `load_pretrained` and `--to hf` accept it. Each part is read in its own layout. A
LoRA stage's checkpoint also holds the adapters (`lora_a`/`lora_b`) and records their spec: its
config carries `lora`, and the parameters load with the adapters in place.

DST may be local or `gs://...` (llava_jax/paths.py). Object storage cannot rename a directory:
there the files are written in place, the config still last, and removed again on failure.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Callable, Iterable

import flax.traverse_util as tu
import jax
import numpy as np

from llava_jax import paths
from llava_jax.config import (CONFIG_FILE, DECODER_LINEARS, ImageProcessorConfig, LlavaConfig, LoraSpec,
                              VideoProcessorConfig)
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.weights import mapping, model_dir, peft
from llava_jax.weights.orbax_io import (
    check_stored,
    is_orbax,
    load_tree,
    save_param_batches,
    save_params,  # noqa: F401  (re-exported: the writer of `params/` that training and tests use)
    stored_shapes,
    stored_stacked,
)
from llava_jax.weights.safetensors_io import CheckpointError, save_file
from llava_jax.weights.side_files import copy_tokenizer, write_preprocessor
from llava_jax.weights.stores import read_json

PARAMS_DIR = "params"
EXTRA_FILE = "extra.safetensors"
# Where the parameters' dtype is read when the caller does not choose one.
DTYPE_PROBE = ("language_model", "embed_tokens", "embedding")


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
    tree = load_tree(directory, tu.unflatten_dict({prefix + q: v for q, v in want.items()}))
    loaded = {p[len(prefix):]: x for p, x in tu.flatten_dict(tree).items()}
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
    if is_orbax(os.path.join(path, PARAMS_DIR)):
        params, base = os.path.join(path, PARAMS_DIR), path
    elif is_orbax(path):
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
    model = StoredModel(path, record["config"], file_dirs, parts,
                        ImageProcessorConfig.from_dict(record["image_processor"]))
    if model.cfg.lora is None and any(lora_lib.is_lora_path(p) for p in model.stored[0]):
        model = dataclasses.replace(model, cfg=model.cfg.replace(lora=_spec_from_stage_output(path, model.stored[0])))
    return model


def _spec_from_stage_output(path: str, trained: dict) -> LoraSpec:
    """The LoRA spec of a LoRA stage's checkpoint written before checkpoints recorded it: rank and targets
    from its adapter arrays, alpha, dropout and rsLoRA from the finished stage's `adapter/adapter_config.json`."""
    a = {p: shape for p, (shape, _) in trained.items() if p[-1] == lora_lib.LORA_A}
    rank = next(iter(a.values()))[-1]
    targets = tuple(t for t in DECODER_LINEARS if any("/".join(p[-3:-1]) == t for p in a))
    stage = read_json(os.path.join(path, model_dir.CHECKPOINT_META)).get("stage")
    workdir = os.path.dirname(os.path.dirname(path))
    found = sorted(glob.glob(os.path.join(workdir, f"stage{stage + 1}_*", peft.ADAPTER_DIR, peft.ADAPTER_CONFIG))
                   if isinstance(stage, int) and not paths.is_remote(workdir) else [])
    if not found:
        number = stage + 1 if isinstance(stage, int) else "N"
        raise CheckpointError(f"{path}: holds LoRA adapters but, written before checkpoints recorded their spec, not "
                              f"their alpha, and its stage's output (WORKDIR/stage{number}_NAME/{peft.ADAPTER_DIR}) "
                              "that has it is not there; use a checkpoint written since")
    c = read_json(found[0])
    if c.get("r") != rank:
        raise CheckpointError(f"{path}: its adapters have rank {rank}, {found[0]} says r={c.get('r')}")
    return LoraSpec(rank=rank, alpha=float(c["lora_alpha"]), targets=targets, dropout=float(c.get("lora_dropout") or 0),
                    use_rslora=bool(c.get("use_rslora", False)))


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
    want = tu.flatten_dict(abstract_params(cfg))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = tu.unflatten_dict({p: device for p in want})
    targets = tu.flatten_dict(shardings)
    for p in targets:
        if p not in want:
            raise CheckpointError(f"{model.path}: shardings name {'/'.join(p)}, which the checkpoint does not hold")
    target = {p: jax.ShapeDtypeStruct(want[p].shape, np.dtype(dtype), sharding=s) for p, s in targets.items()}
    return cfg.replace(dtype=dtype, param_dtype=dtype), tu.unflatten_dict(model.load(target))


def load_converted(path: str, dtype: str | None = None, *, scan_layers: bool | None = None) -> LlavaModel:
    """A converted directory (or training checkpoint) as a `LlavaModel`; what `load_pretrained` calls."""
    cfg, params = load_params(path, dtype, scan_layers=scan_layers)
    return LlavaModel(cfg, params)


def save_converted(
    dst: str,
    cfg: LlavaConfig,
    batches: Iterable[dict],
    *,
    extras: Callable[[], list[tuple[str, np.ndarray]]] | None = None,
    tokenizer_dir: str | None = None,
    preprocessor: ImageProcessorConfig | str | None = None,
    video: VideoProcessorConfig | None = None,
    write_more: Callable[[str], None] | None = None,
) -> str:
    """Write our directory at `dst` (which must not exist) from parameter batches; returns its path.

    Args:
      cfg: the model config (its `dtype`/`param_dtype` should name the stored dtype).
      batches: disjoint subtrees of the parameter tree, each held in memory only while written.
      extras: returns (llava-hf name, torch-layout array) pairs kept for export in extra.safetensors.
      tokenizer_dir: directory whose tokenizer files are copied.
      preprocessor: preprocessor_config.json to copy, or settings to write (default: from `cfg`).
      video: video_preprocessor_config.json settings to write (a model that pools video frames).
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
        if video is not None:
            video.save(tmp)
        if write_more is not None:
            write_more(tmp)
        cfg.save(tmp)  # last, so that a directory with a config is a complete one

    return paths.atomic_directory(dst, write)
