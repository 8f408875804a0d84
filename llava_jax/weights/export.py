"""Export to Hugging Face: our directory (converted, or a training checkpoint) -> a llava-hf directory.

The output is what `transformers.LlavaForConditionalGeneration.from_pretrained` (and vLLM, SGLang)
load: safetensors in the published llava-hf layout (`mapping.HF_LEGACY`: `language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`), sharded past
`max_shard_bytes` with an index, plus config.json, the tokenizer files and preprocessor_config.json.

Tensors are streamed: one parameter group is read from Orbax, transposed back to torch's layout and
appended to the open shard, so exporting a 7B model holds about one layer in memory (one stacked
parameter, all layers, when the source stores its layers stacked).

CLIP tensors LLaVA never computes with (post_layernorm, the layers past `vision_feature_layer`)
come from `extra.safetensors` when the conversion kept them; otherwise they are filled (LayerNorm
scales 1, everything else 0) so that transformers finds every key it expects, and the export says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterator

import flax.traverse_util as tu
import jax
import numpy as np

from llava_jax import paths
from llava_jax.config import (
    CONFIG_FILE,
    PREPROCESSOR_CONFIG,
    VIDEO_PREPROCESSOR_CONFIG,
    ImageProcessorConfig,
    LlavaConfig,
    LoraSpec,
    llava_config_to_hf,
)
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import abstract_params
from llava_jax.weights import mapping, peft
from llava_jax.weights.converted import DTYPE_PROBE, EXTRA_FILE, StoredModel, open_model
from llava_jax.weights.orbax_io import check_stored
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore, write_safetensors
from llava_jax.weights.side_files import copy_tokenizer, write_preprocessor

SHARD_BYTES = 5 * 10**9  # as the published llava-hf checkpoints
VOCAB_MULTIPLE = 64  # llava-hf pads 32000 + <image> + <pad> to 32064


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One output tensor: its HF name, torch-layout shape, and how to make it."""

    name: str
    shape: tuple[int, ...]
    group: tuple[str, ...] | None  # stored parameter group to read from Orbax (None: not a parameter)
    make: Callable[[dict], np.ndarray]  # group arrays (stored, by path) -> torch-layout array


def _torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    return tuple(mapping.to_torch(np.broadcast_to(np.zeros((), np.uint8), shape), transform).shape)


def padded_vocab(cfg: LlavaConfig) -> int:
    """Vocabulary size for HF: llava-hf keeps `<image>`, `<video>` (a video model's) and `<pad>` after them inside
    the embedding (transformers looks the placeholders up before it replaces them)."""
    v = cfg.text.vocab_size
    last = max(cfg.image_token_index, cfg.video_token_index or 0)
    if last < v:
        return v
    return -(-(last + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Rows appended as the mean row (what transformers' resize_token_embeddings starts new tokens from)."""
    if rows == x.shape[0]:
        return x
    mean = x.astype(np.float32).mean(axis=0, keepdims=True).astype(x.dtype)
    return np.concatenate([x, np.repeat(mean, rows - x.shape[0], axis=0)])


def tokenizer_config(cfg: LlavaConfig, tokenizer_model: str | bytes, vocab: int) -> dict:
    """A llava-hf style tokenizer_config.json for a bare sentencepiece tokenizer.model.

    LLaMA's special tokens and BOS; `<image>`, then `<video>` for a video model (an original LLaVA-NeXT-Video
    converted: the id after `<image>`'s), then `<pad>` when the vocabulary was padded, become added tokens when
    their ids directly follow the sentencepiece pieces, as in llava-hf.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    if isinstance(tokenizer_model, bytes):
        sp.LoadFromSerializedProto(tokenizer_model)
    else:
        sp.Load(tokenizer_model)
    pieces = sp.get_piece_size()
    added = {}
    if cfg.image_token_index == pieces:
        added["<image>"] = pieces
        if cfg.video_token_index == pieces + 1:
            added["<video>"] = pieces + 1
        if vocab > pieces + len(added):
            added["<pad>"] = pieces + len(added)
    out = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "padding_side": "left",
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}
            for t, i in added.items()
        },
    }
    if "<pad>" in added:
        out["pad_token"] = "<pad>"
    return out


def plan_tensors(
    cfg: LlavaConfig, dtype: np.dtype, extras: TensorStore | None, *, stacked: bool = False
) -> tuple[list[Tensor], list[str]]:
    """Every tensor of the HF checkpoint, in writing order, and notes on what was filled or padded.

    `stacked`: the source stores its layers stacked; tensors are then read one stacked parameter
    at a time (all its layers), else one module (e.g. one layer) at a time.
    """
    shapes = tu.flatten_dict(mapping.unstack_layers(abstract_params(cfg)))
    vocab = padded_vocab(cfg)
    notes = []
    out = []
    entries = sorted(mapping.entries(cfg), key=mapping.layer_order)
    if stacked:  # keep each stacked parameter's rows together
        entries = sorted(entries, key=lambda e: (e.location(True)[0] != e.path, e.location(True)[0]))
    for e in entries:
        name = mapping.torch_name(e, mapping.HF_LEGACY, cfg.projector_type)
        shape = _torch_shape(tuple(shapes[e.path].shape), e.transform)
        where, row = e.location(stacked)

        def make(arrays, e=e, where=where, row=row):
            x = arrays[where] if row is None else arrays[where][row]
            x = mapping.to_torch(x, e.transform)
            if e.ours in ("embed_tokens/embedding", "lm_head/kernel"):
                x = _pad_rows(x, vocab)
            return x

        if e.ours in ("embed_tokens/embedding", "lm_head/kernel"):
            shape = (vocab,) + shape[1:]
        out.append(Tensor(name, shape, where if row is not None else e.path[:2], make))
    if vocab != cfg.text.vocab_size:
        notes.append(
            f"vocabulary padded from {cfg.text.vocab_size} to {vocab} rows (mean-initialised) so that <image> "
            f"({cfg.image_token_index}) is inside the embedding, as llava-hf checkpoints have it"
        )
    # CLIP's own tensors past what LLaVA uses.
    full = cfg.replace(vision_feature_layer=cfg.vision.num_layers)
    full_shapes = tu.flatten_dict(mapping.unstack_layers(abstract_params(full)))
    unused = [e for e in mapping.vision_entries(full) if e.layer is not None and e.layer >= cfg.num_vision_layers_used]
    rest = [(mapping.HF_LEGACY.vision + name, shape) for name, shape in mapping.vision_unused_tensors(cfg)]
    rest += [(mapping.torch_name(e, mapping.HF_LEGACY), _torch_shape(tuple(full_shapes[e.path].shape), e.transform))
             for e in sorted(unused, key=mapping.layer_order)]
    filled = []
    for name, shape in rest:
        if extras is not None and name in extras:
            if tuple(extras.shape(name)) != shape:
                raise CheckpointError(f"{EXTRA_FILE}: {name} has shape {extras.shape(name)}, expected {shape}")
            out.append(Tensor(name, shape, None, lambda _, name=name: np.asarray(extras.get(name)).astype(dtype)))
        else:
            fill = 1.0 if ("layer_norm" in name or "layernorm" in name) and name.endswith(".weight") else 0.0
            out.append(Tensor(name, shape, None, lambda _, shape=shape, fill=fill: np.full(shape, fill, dtype)))
            filled.append(name)
    if filled:
        notes.append(
            f"filled {len(filled)} CLIP tensors LLaVA never uses (post_layernorm, vision layers >= "
            f"{cfg.num_vision_layers_used}) with LayerNorm 1 / 0, as the source did not keep them, e.g. {filled[:2]}"
        )
    return out, notes


def _adapter(model: StoredModel, cfg: LlavaConfig) -> tuple[LoraSpec, dict] | None:
    """(spec, float32 adapter tree in the model's stored layout) of the LoRA adapter that comes with a model:
    its own `lora_a`/`lora_b` (a LoRA stage's training checkpoint) or its `adapter/` (a LoRA stage's output)."""
    if model.cfg.lora is not None:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        shapes = tu.flatten_dict(mapping.to_layout(abstract_params(model.cfg), model.stacked))
        targets = {p: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=cpu) for p, x in shapes.items()
                   if lora_lib.is_lora_path(p)}
        return model.cfg.lora, tu.unflatten_dict({p: np.asarray(x) for p, x in model.load(targets).items()})
    directory = peft.find_adapter(model.path)
    return None if directory is None else peft.read_adapter(directory, cfg, stacked=model.stacked)


def _produce(tensors: list[Tensor], model: StoredModel, cfg: LlavaConfig, dtype: np.dtype,
             deltas: dict | None = None) -> Iterator[np.ndarray]:
    """Each tensor's array, reading one parameter group of `cfg` (the base) at a time (in the model's
    stored layout: stacked, or per layer); `deltas` (kernel path -> float32 array) are added to their
    kernels (a merged LoRA adapter)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = tu.flatten_dict(mapping.to_layout(abstract_params(cfg), model.stacked))
    cached: tuple[tuple[str, ...] | None, dict] = (None, {})
    for t in tensors:
        if t.group is not None and t.group != cached[0]:
            members = [p for p in shapes if p[: len(t.group)] == t.group]
            loaded = model.load({p: jax.ShapeDtypeStruct(shapes[p].shape, dtype, sharding=cpu) for p in members})
            cached = (t.group, {p: np.asarray(loaded[p]) for p in members})
            for p in members if deltas else ():
                if p in deltas:
                    cached[1][p] = (cached[1][p].astype(np.float32) + deltas[p]).astype(dtype)
        yield t.make(cached[1])


def _shards(tensors: list[Tensor], dtype: np.dtype, max_bytes: int) -> list[list[Tensor]]:
    shards, size = [[]], 0
    for t in tensors:
        n = math.prod(t.shape) * dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def export_hf(
    src: str, dst: str, *, dtype: str | None = None, max_shard_bytes: int = SHARD_BYTES, merge_lora: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Write `src` (our converted directory or a training checkpoint) as a llava-hf directory at `dst`.

    Args:
      src: our directory, a stage output or a training checkpoint (see `converted.open_model`).
        When it holds a LoRA adapter (`adapter/`, a LoRA stage's output) the adapter is written to
        `dst/adapter/` in PEFT's layout beside the base, or merged into the weights with `merge_lora`.
      dst: output directory; must not exist. Written under `dst.tmp-XXXX`, renamed at the end.
      dtype: output dtype (default: the stored one).
      max_shard_bytes: split into `model-0000i-of-0000n.safetensors` + index past this size.
      merge_lora: fold the adapter into the weights: one model with the base's tensors, size and dtype.
    """
    model = open_model(src)
    cfg = model.cfg.replace(lora=None)  # the base; a LoRA training checkpoint's adapters are exported apart
    try:
        hf_config = llava_config_to_hf(cfg)
    except ValueError as e:
        raise CheckpointError(f"{src} ({CONFIG_FILE}): {e}") from None
    stored = model.shapes()
    check_stored(model.cfg, stored, model.path)
    out_dtype = np.dtype(dtype or stored[DTYPE_PROBE][1].name)
    extra_dir = model.find_file(EXTRA_FILE)
    extras = TensorStore([os.path.join(extra_dir, EXTRA_FILE)]) if extra_dir else None
    tensors, notes = plan_tensors(cfg, out_dtype, extras, stacked=model.stacked)
    hf_config["text_config"]["vocab_size"] = padded_vocab(cfg)
    hf_config["dtype"] = hf_config["torch_dtype"] = out_dtype.name
    shards = _shards(tensors, out_dtype, max_shard_bytes)
    adapter = _adapter(model, cfg)
    if merge_lora and adapter is None:
        raise CheckpointError(f"{src}: --merge-lora, but there is no LoRA adapter "
                              f"({peft.ADAPTER_DIR}/{peft.ADAPTER_CONFIG}) to merge")
    deltas = peft.AdapterDeltas(*adapter) if merge_lora else None
    tok_dir = model.find_file("tokenizer.model") or model.find_file("tokenizer_config.json")
    pre_dir = model.find_file(PREPROCESSOR_CONFIG)
    video_dir = model.find_file(VIDEO_PREPROCESSOR_CONFIG)

    def write(tmp: str) -> None:
        arrays = _produce(tensors, model, cfg, out_dtype, deltas)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = [(t.name, t.shape, out_dtype) for t in shard]
            total += write_safetensors(os.path.join(tmp, fname), specs, (next(arrays) for _ in shard))
            weight_map.update({t.name: fname for t in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            paths.write_text(os.path.join(tmp, "model.safetensors.index.json"), json.dumps(index, indent=2))
        copied = copy_tokenizer(tok_dir, tmp, dst)
        if "tokenizer.model" in copied and "tokenizer_config.json" not in copied:
            tok_cfg = tokenizer_config(cfg, paths.read_bytes(os.path.join(tmp, "tokenizer.model")), padded_vocab(cfg))
            paths.write_text(os.path.join(tmp, "tokenizer_config.json"), json.dumps(tok_cfg, indent=2))
        if pre_dir:
            write_preprocessor(os.path.join(pre_dir, PREPROCESSOR_CONFIG), tmp)
        elif model.image_processor is not None:
            write_preprocessor(model.image_processor, tmp)
        else:
            size = cfg.vision.image_size
            write_preprocessor(ImageProcessorConfig(size=size, crop_size=size, pad_to_square=False), tmp)
        if video_dir:  # already HF's format (VideoProcessorConfig.save)
            name = VIDEO_PREPROCESSOR_CONFIG
            paths.copy(os.path.join(video_dir, name), os.path.join(tmp, name))
        if adapter is not None and not merge_lora:
            spec, lora = adapter
            peft.save_adapter(os.path.join(tmp, peft.ADAPTER_DIR), cfg.replace(lora=spec), lora)
            notes.append(f"LoRA adapter written to {os.path.join(dst, peft.ADAPTER_DIR)} (PEFT: "
                         f"PeftModel.from_pretrained(model, that directory)); --merge-lora folds it into the weights")
        elif merge_lora:
            notes.append(f"LoRA adapter of {src} merged into the weights")
        paths.write_text(os.path.join(tmp, "config.json"), json.dumps(hf_config, indent=2))  # last: marks it complete

    out = paths.atomic_directory(dst, write)
    for n in notes:
        log(f"note: {n}")
    size = sum(math.prod(t.shape) for t in tensors) * out_dtype.itemsize
    log(f"wrote {out}: {len(tensors)} tensors, {len(shards)} shard(s), {size / 1e9:.2f} GB {out_dtype.name} "
        "(llava-hf layout)")
    return out
