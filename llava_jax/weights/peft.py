"""LoRA adapters in PEFT's format, read and written through the one mapping table.

An adapter directory is what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained`
reads: `adapter_config.json` + `adapter_model.safetensors` (or `adapter_model.bin`), tensors named
`base_model.model.<the adapted model's module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r].
Names come from `mapping.lora_entries` under a checkpoint layout: we write transformers'
`LlavaForConditionalGeneration` names in the published llava-hf layout (`language_model.model.layers...`,
which peft also maps onto transformers 5's `model.language_model.layers...`), and read that layout,
transformers 5's, and the original LLaVA's (`model.layers...`, a LLaMA with `mm_projector`).

The original's LoRA run also writes `non_lora_trainables.bin` (the projector it trained fully,
`base_model.model.model.mm_projector.*`); `read_non_lora_trainables` reads it (torch pickles only
through `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util as tu
import jax
import numpy as np

from llava_jax import paths
from llava_jax.config import DECODER_LINEARS, LlavaConfig, LoraSpec
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import abstract_params
from llava_jax.weights import mapping
from llava_jax.weights.parts import Piece
from llava_jax.weights.safetensors_io import CheckpointError, save_file
from llava_jax.weights.stores import BinStore, open_file, read_json

ADAPTER_DIR = "adapter"  # an adapter inside a model directory: applied when the model is loaded
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
NON_LORA_FILE = "non_lora_trainables.bin"


def peft_layout(layout: mapping.Layout) -> mapping.Layout:
    """A checkpoint layout as seen inside a PEFT wrapper: every prefix under `base_model.model.`."""
    fields = ("vision", "projector", "text", "head")
    prefixed = {f: mapping.PEFT_PREFIX + getattr(layout, f) for f in fields if getattr(layout, f)}
    return dataclasses.replace(layout, **prefixed)


# Layouts an adapter's names may come in: llava-hf (what we write), transformers 5, original LLaVA.
READ_LAYOUTS = (mapping.HF_LEGACY, mapping.HF_NEW, mapping.ORIGINAL)
WRITE_LAYOUT = mapping.HF_LEGACY


def find_adapter(model_dir: str) -> str | None:
    """`model_dir/adapter` when it holds an adapter (a LoRA stage's output, an export), else None."""
    d = os.path.join(model_dir, ADAPTER_DIR)
    return d if paths.isfile(os.path.join(d, ADAPTER_CONFIG)) else None


def target_modules(cfg: LlavaConfig, spec: LoraSpec) -> str:
    """peft's `target_modules` for LlavaForConditionalGeneration as a regex: a list of names (q_proj, ...)
    would also catch the CLIP tower's q/k/v_proj. Matches both transformers layouts' module names."""
    first = {e.ours.split("/", 1)[1].rsplit("/", 1)[0]: e for e in mapping.text_entries(cfg)
             if e.ours.startswith("layers_0/") and e.transform == mapping.LINEAR}  # the weight, not a bias
    modules = [first[t].theirs[len("model.layers.0.") : -len(".weight")] for t in DECODER_LINEARS if t in spec.targets]
    return r".*language_model\.(model\.)?layers\.\d+\.(" + "|".join(re.escape(m) for m in modules) + ")"


def adapter_config(cfg: LlavaConfig, spec: LoraSpec, base_model: str | None = None) -> dict:
    """The `adapter_config.json` peft reads (fields it does not find take peft's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": target_modules(cfg, spec),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(directory: str, cfg: LlavaConfig, lora_params: Any, *, base_model: str | None = None) -> str:
    """Write `cfg.lora`'s adapter (`lora_params`: a tree holding our `lora_a`/`lora_b` leaves) as a PEFT
    adapter directory for transformers' LlavaForConditionalGeneration; returns the directory."""
    spec = cfg.lora
    if spec is None:
        raise ValueError("save_adapter needs a config with a LoRA spec (cfg.lora)")
    layout = peft_layout(WRITE_LAYOUT)
    tensors = []
    for e in mapping.lora_entries(cfg, spec.targets):
        x = np.asarray(mapping.lookup(lora_params, e))  # stacked or per layer
        tensors.append((mapping.torch_name(e, layout), np.ascontiguousarray(mapping.to_torch(x, e.transform))))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(cfg, spec, base_model), f, indent=2)
    return directory


def _spec_from_config(c: dict, path: str) -> dict:
    """The adapter config, checked for what plain LoRA here supports."""
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {c.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out") if c.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if c.get(k)]
    unsupported += [k for k in ("modules_to_save", "trainable_token_indices") if c.get(k)]
    if c.get("bias", "none") != "none":
        unsupported.append(f"bias={c['bias']!r}")
    if unsupported:
        raise CheckpointError(f"{path}: adapter options {unsupported} are not supported "
                              "(plain LoRA with bias='none' is)")
    for k in ("r", "lora_alpha"):
        if not isinstance(c.get(k), (int, float)):
            raise CheckpointError(f"{path}: {k} is missing or not a number")
    return c


def read_adapter(directory: str, cfg: LlavaConfig, stacked: bool | None = None) -> tuple[LoraSpec, dict]:
    """(spec, our adapter tree as float32 numpy) of a PEFT LoRA directory, checked against `cfg`.

    Modules the adapter does not cover in some layers get zero A and B there (no change), so that
    every layer carries the same Linear layers. The tree has the model's layout (`cfg.scan_layers`:
    layers stacked) unless `stacked` says otherwise.
    """
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not paths.isfile(config_path):
        raise CheckpointError(f"{directory}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    c = _spec_from_config(read_json(config_path), config_path)
    files = [os.path.join(directory, n) for n in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)]
    files = [f for f in files if paths.isfile(f)]
    if not files:
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    store = open_file(files[0])
    keys = set(store.keys())
    all_entries = mapping.lora_entries(cfg, DECODER_LINEARS)
    best = max(READ_LAYOUTS, key=lambda lay: sum(mapping.torch_name(e, peft_layout(lay)) in keys for e in all_entries))
    layout = peft_layout(best)
    by_name = {mapping.torch_name(e, layout): e for e in all_entries}
    unknown = sorted(k for k in keys if k not in by_name)
    if unknown:
        raise CheckpointError(
            f"{store.source}: {len(unknown)} tensors are not LoRA weights of the language model's decoder "
            "Linear layers, "
            f"e.g. {unknown[:3]} (llava_jax adapts only those, as LLaVA's LoRA recipe does)"
        )
    present = {by_name[k] for k in keys}
    targets = tuple(t for t in DECODER_LINEARS if any(e.ours.split("/", 1)[1].startswith(t + "/") for e in present))
    a_key = next((k for k in sorted(keys) if k.endswith(".lora_A.weight")), None)
    if a_key is None:
        raise CheckpointError(f"{store.source}: no lora_A tensors")
    rank = int(store.shape(a_key)[0])
    if rank != int(c["r"]):
        raise CheckpointError(f"{store.source}: {a_key} has rank {rank} but {ADAPTER_CONFIG} says r={c['r']}")
    spec = LoraSpec(rank=rank, alpha=float(c["lora_alpha"]), targets=targets,
                    dropout=float(c.get("lora_dropout") or 0.0), use_rslora=bool(c.get("use_rslora", False)))
    shapes = tu.flatten_dict(mapping.unstack_layers(abstract_params(cfg.replace(lora=spec))))
    flat: dict = {}
    for e in mapping.lora_entries(cfg, targets):
        want = tuple(shapes[e.path].shape)
        name = mapping.torch_name(e, layout)
        if e in present:
            x = mapping.to_ours(store.get(name), e.transform).astype(np.float32)
            if tuple(x.shape) != want:
                raise CheckpointError(f"{store.source}: {name} has shape {store.shape(name)}, which does not fit the "
                                      f"model (ours: {'/'.join(e.path)} {want})")
        else:
            x = np.zeros(want, np.float32)
        flat[e.path] = np.ascontiguousarray(x)
    return spec, mapping.to_layout(tu.unflatten_dict(flat), cfg.scan_layers if stacked is None else stacked)


def _non_lora_store(path: str, cfg: LlavaConfig) -> tuple[Any, dict[str, Any]]:
    """(the `.bin` store, its tensor names -> mapping entries); an error names tensors that are not
    the projector, the embeddings, the final norm or lm_head (no layer tensors)."""
    store = BinStore([path], path)
    layout = peft_layout(mapping.ORIGINAL)
    by_name = {mapping.torch_name(e, layout, cfg.projector_type): e
               for e in mapping.projector_entries(cfg) + mapping.text_entries(cfg) if e.layer is None}
    unknown = sorted(k for k in store.keys() if k not in by_name)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensors that are not the projector, the embeddings, the final "
                              f"norm or lm_head of this config ({cfg.projector_type} projector), e.g. {unknown[:3]}")
    return store, by_name


def read_non_lora_trainables(path: str, cfg: LlavaConfig) -> dict[tuple[str, ...], np.ndarray]:
    """The original LoRA run's `non_lora_trainables.bin` (projector, and whatever else it trained fully)
    as {our parameter path: array}, read with `torch.load(weights_only=True)`."""
    store, by_name = _non_lora_store(path, cfg)
    shapes = tu.flatten_dict(abstract_params(cfg.replace(lora=None)))
    out = {}
    for name in store.keys():
        e = by_name[name]
        x = mapping.to_ours(store.get(name), e.transform)
        want = tuple(shapes[e.path].shape)
        if tuple(x.shape) != want:
            raise CheckpointError(f"{path}: {name} has shape {store.shape(name)}, "
                                  f"expected ours {'/'.join(e.path)} {want}")
        out[e.path] = x
    return out


def apply_adapter(cfg: LlavaConfig, params: Any, directory: str) -> tuple[LlavaConfig, dict]:
    """(config with `lora` set, parameters with the adapter added) for a base model and an adapter
    directory (ours, peft's, or the original LLaVA's: its `non_lora_trainables.bin`, when present,
    replaces the base's projector). Everything is cast to the base's parameter dtype."""
    spec, lora = read_adapter(directory, cfg)
    flat = tu.flatten_dict(params)
    dtype = cfg.param_dtype
    non_lora = os.path.join(directory, NON_LORA_FILE)
    if paths.isfile(non_lora):
        for p, x in read_non_lora_trainables(non_lora, cfg).items():
            flat[p] = jax.device_put(np.asarray(x).astype(dtype))
    for p, x in tu.flatten_dict(lora).items():
        flat[p] = jax.device_put(x.astype(dtype))
    return cfg.replace(lora=spec), tu.unflatten_dict(flat)


class AdapterDeltas(Mapping):
    """{kernel path: scale * A B as float32 numpy} of an adapter: what merging adds to each kernel.
    Computed when asked for, so that merging a 7B holds one delta at a time, not a model's worth.

    Built from the adapter's spec and its `lora_a`/`lora_b` tree (`read_adapter`'s result, or a LoRA
    training checkpoint's); the paths are in that tree's layer layout.
    """

    def __init__(self, spec: LoraSpec, tree: dict):
        self.spec = spec
        flat = tu.flatten_dict(tree)
        self._ab = {k[:-1] + ("kernel",): (a, flat[k[:-1] + (lora_lib.LORA_B,)]) for k, a in flat.items()
                    if k[-1] == lora_lib.LORA_A}

    def __getitem__(self, path: tuple[str, ...]) -> np.ndarray:
        a, b = self._ab[path]
        return np.asarray(lora_lib.delta(a, b, self.spec.scale))

    def __iter__(self):
        return iter(self._ab)

    def __len__(self) -> int:
        return len(self._ab)


def use_non_lora_trainables(plan, path: str) -> None:
    """Make a conversion plan (weights/parts.py) take every tensor the original LoRA run's
    `non_lora_trainables.bin` holds (its trained projector) from that file instead of the base."""
    cfg = plan.cfg
    store, by_name = _non_lora_store(path, cfg)
    taken = [by_name[k] for k in store.keys()]  # no layer tensors (see read_non_lora_trainables)
    paths = {e.path for e in taken}
    for piece in plan.pieces:
        dropped = [e for e in piece.entries if e.path in paths]
        piece.entries = [e for e in piece.entries if e.path not in paths]
        piece.skip = piece.skip | {mapping.torch_name(e, piece.layout, cfg.projector_type) for e in dropped}
    if any(p[0] == "projector" for p in paths) and "projector" in plan.fresh:
        del plan.fresh["projector"]
        plan.notes = [n for n in plan.notes if "freshly initialised" not in n]
    plan.pieces.append(Piece(store, peft_layout(mapping.ORIGINAL), taken))
    plan.notes.append(f"{len(taken)} tensors ({', '.join(sorted({p[0] for p in paths}))}) from {path}")


def merged_batches(batches, deltas: Mapping):
    """Parameter batches (nested numpy trees) with `deltas` added to their kernels, in float32, stored
    back in each kernel's dtype."""
    for batch in batches:
        flat = tu.flatten_dict(batch)
        for p, x in flat.items():
            if p in deltas:
                flat[p] = (np.asarray(x, np.float32) + deltas[p]).astype(x.dtype)
        yield tu.unflatten_dict(flat)
