"""The one table from PyTorch checkpoint names to our parameter paths.

Loading, conversion and export all go through `entries(cfg)` and `torch_name(entry, layout)`.
Names are written once, relative to their component (CLIP's `embeddings...`, LLaMA's
`model.layers...`, the projector's `linear_N`); a layout says where each component sits in a
given checkpoint format.

Entries are per layer (`layers_3/self_attn/q_proj/kernel`), as torch names them. A model with
scanned layers (`LlavaConfig.scan_layers`) keeps each repeated parameter as one stacked array
`layers/self_attn/q_proj/kernel` [L, ...]: stacking is a transform of these entries
(`Entry.location`) and of whole trees (`stack_layers` / `unstack_layers`), not a second table.
Our converted directories store the per-layer layout (it streams a layer at a time); trees in
memory and training checkpoints hold the model's layout; loaders convert between them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.models.projector import projector_linears
from llava_jax.models.stack import STACK_AXIS

# How a tensor changes between torch and us.
SAME = "same"
LINEAR = "linear"  # torch Linear weight [out, in] <-> Flax kernel [in, out]
CONV = "conv"  # torch Conv2d weight OIHW <-> Flax kernel HWIO

# (our path under the component, torch name under the component, transform); {i} = layer index.
# The vision tower's own tensors by `VisionConfig.model_type`; CLIP and SigLIP share the layer table.
VISION_TABLES = {
    "clip_vision_model": [
        ("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
        ("embeddings/class_embedding", "embeddings.class_embedding", SAME),
        ("embeddings/position_embedding", "embeddings.position_embedding.weight", SAME),
        ("pre_layrnorm/scale", "pre_layrnorm.weight", SAME),
        ("pre_layrnorm/bias", "pre_layrnorm.bias", SAME),
    ],
    "siglip_vision_model": [
        ("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
        ("embeddings/patch_embedding/bias", "embeddings.patch_embedding.bias", SAME),
        ("embeddings/position_embedding", "embeddings.position_embedding.weight", SAME),
    ],
}
VISION_LAYER_TABLE = [
    ("layers_{i}/layer_norm1/scale", "encoder.layers.{i}.layer_norm1.weight", SAME),
    ("layers_{i}/layer_norm1/bias", "encoder.layers.{i}.layer_norm1.bias", SAME),
    ("layers_{i}/layer_norm2/scale", "encoder.layers.{i}.layer_norm2.weight", SAME),
    ("layers_{i}/layer_norm2/bias", "encoder.layers.{i}.layer_norm2.bias", SAME),
] + [
    (f"layers_{{i}}/{mod}/{p}/{ours}", f"encoder.layers.{{i}}.{mod}.{p}.{theirs}", t)
    for mod, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2")))
    for p in projs
    for ours, theirs, t in (("kernel", "weight", LINEAR), ("bias", "bias", SAME))
]
# Tensors a vision tower holds that LLaVA never computes with: the layers after the feature layer,
# post_layernorm and SigLIP's attention-pooling head (a full CLIPModel's text tower is the loader's business).
VISION_UNUSED_PREFIXES = ("post_layernorm.", "head.")
VISION_UNUSED_NAMES = ("embeddings.position_ids",)
# A full CLIPModel directory (openai/clip-vit-large-patch14-336) also holds the text tower and both projections.
CLIP_TEXT_TOWER_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")

TEXT_TABLE = [
    ("embed_tokens/embedding", "model.embed_tokens.weight", SAME),
    ("norm/scale", "model.norm.weight", SAME),
]
TEXT_HEAD = ("lm_head/kernel", "lm_head.weight", LINEAR)
TEXT_LAYER_NORMS = [
    ("layers_{i}/input_layernorm/scale", "model.layers.{i}.input_layernorm.weight", SAME),
    ("layers_{i}/post_attention_layernorm/scale", "model.layers.{i}.post_attention_layernorm.weight", SAME),
]
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
TEXT_MLP = ("gate_proj", "up_proj", "down_proj")
TEXT_UNUSED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: where it lives in our tree and, under its component, in torch's."""

    component: str  # "vision_tower" | "projector" | "language_model" | "image_newline" (a leaf itself)
    ours: str  # path under the component, "/"-separated, per layer (`layers_3/...`); "" for a leaf component
    theirs: str  # torch name under the component
    transform: str
    layer: int | None = None  # which repeated layer ({i} in the table); None outside the layer stack

    @property
    def path(self) -> tuple[str, ...]:
        """The per-layer path (`component/layers_3/...`)."""
        return (self.component, *self.ours.split("/")) if self.ours else (self.component,)

    def location(self, stacked: bool) -> tuple[tuple[str, ...], int | None]:
        """(path, layer index) of this entry in a tree of the given layout: with stacked layers, a
        layer's tensor is row `layer` of the array at `component/layers/...`; otherwise (path, None)."""
        if not stacked or self.layer is None:
            return self.path, None
        return stack_path(self.path), self.layer


def _text_layer_table(cfg: LlavaConfig) -> list[tuple[str, str, str]]:
    t = cfg.text
    rows = list(TEXT_LAYER_NORMS)
    # Which Linear layers carry a bias is the config's (Llama: all four or none; Qwen2: q, k, v).
    bias = {"q_proj": t.qkv_has_bias, "k_proj": t.qkv_has_bias, "v_proj": t.qkv_has_bias, "o_proj": t.o_has_bias}
    for mod, projs in (("self_attn", TEXT_ATTN), ("mlp", TEXT_MLP)):
        for p in projs:
            rows.append((f"layers_{{i}}/{mod}/{p}/kernel", f"model.layers.{{i}}.{mod}.{p}.weight", LINEAR))
            if bias.get(p, t.mlp_bias):
                rows.append((f"layers_{{i}}/{mod}/{p}/bias", f"model.layers.{{i}}.{mod}.{p}.bias", SAME))
    return rows


def _expand(component, table, n_layers) -> Iterator[Entry]:
    for ours, theirs, t in table:
        if "{i}" in ours:
            for i in range(n_layers):
                yield Entry(component, ours.format(i=i), theirs.format(i=i), t, layer=i)
        else:
            yield Entry(component, ours, theirs, t)


def vision_entries(cfg: LlavaConfig) -> list[Entry]:
    """The vision tower's entries, up to the layer LLaVA takes its features from."""
    table = VISION_TABLES[cfg.vision.model_type] + VISION_LAYER_TABLE
    return list(_expand("vision_tower", table, cfg.num_vision_layers_used))


def vision_unused_tensors(cfg: LlavaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(torch name under the component, torch shape) of the tensors after the encoder layers that a
    transformers tower of this config holds and LLaVA never computes with: `post_layernorm`, and SigLIP's
    attention-pooling `head` (a torch MultiheadAttention and an MLP) when `vision_use_head`."""
    v = cfg.vision
    d, i = v.hidden_size, v.intermediate_size
    out = [("post_layernorm.weight", (d,)), ("post_layernorm.bias", (d,))]
    if v.vision_use_head:
        out += [
            ("head.probe", (1, 1, d)),
            ("head.attention.in_proj_weight", (3 * d, d)),
            ("head.attention.in_proj_bias", (3 * d,)),
            ("head.attention.out_proj.weight", (d, d)),
            ("head.attention.out_proj.bias", (d,)),
            ("head.layernorm.weight", (d,)),
            ("head.layernorm.bias", (d,)),
            ("head.mlp.fc1.weight", (i, d)),
            ("head.mlp.fc1.bias", (i,)),
            ("head.mlp.fc2.weight", (d, i)),
            ("head.mlp.fc2.bias", (d,)),
        ]
    return out


def projector_entries(cfg: LlavaConfig) -> list[Entry]:
    """The projector's Linear layers `linear_1 ... linear_N`, as its registered factory builds them."""
    rows = []
    for name in projector_linears(cfg.projector_type):
        rows.append(Entry("projector", f"{name}/kernel", f"{name}.weight", LINEAR))
        if cfg.projector_bias:
            rows.append(Entry("projector", f"{name}/bias", f"{name}.bias", SAME))
    return rows


def text_entries(cfg: LlavaConfig) -> list[Entry]:
    """The language model's entries (lm_head only when not tied to the embedding)."""
    table = TEXT_TABLE + _text_layer_table(cfg)
    if not cfg.text.tie_word_embeddings:
        table = table + [TEXT_HEAD]
    return list(_expand("language_model", table, cfg.text.num_layers))


# PEFT keeps a LoRA adapter beside the Linear it adapts: `<module>.lora_A.weight` [r, in] and
# `<module>.lora_B.weight` [out, r]; ours sit beside the kernel as `lora_a` [in, r] and `lora_b` [r, out].
LORA_LEAVES = (("lora_a", "lora_A.weight"), ("lora_b", "lora_B.weight"))
PEFT_PREFIX = "base_model.model."  # what peft puts before the adapted model's own names


def lora_entries(cfg: LlavaConfig, modules) -> list[Entry]:
    """LoRA A and B of the decoder layers' Linear layers named in `modules` (as under a layer, e.g.
    `self_attn/q_proj`), derived from the text table: `kernel` -> `lora_a`/`lora_b` and
    `weight` -> `lora_A.weight`/`lora_B.weight`, both transposed like a Linear weight."""
    out = []
    for e in text_entries(cfg):
        head, _, rest = e.ours.partition("/")
        if not (head.startswith("layers_") and e.transform == LINEAR and rest.rsplit("/", 1)[0] in modules):
            continue
        for ours, theirs in LORA_LEAVES:
            out.append(Entry(e.component, e.ours[: -len("kernel")] + ours, e.theirs[: -len("weight")] + theirs, LINEAR,
                             layer=e.layer))
    return out


def newline_entries(cfg: LlavaConfig) -> list[Entry]:
    """LLaVA-NeXT's learned `image_newline` [hidden] (anyres configs only)."""
    return [Entry("image_newline", "", "image_newline", SAME)] if cfg.is_anyres else []


def entries(cfg: LlavaConfig) -> list[Entry]:
    """Every parameter of a LLaVA with this config, in a stable order."""
    return vision_entries(cfg) + projector_entries(cfg) + newline_entries(cfg) + text_entries(cfg)


def layer_order(entry: Entry) -> tuple:
    """Sort key that keeps each module's (e.g. one layer's) tensors together, layers in numeric order."""
    head = entry.path[-1] if len(entry.path) == 1 else entry.path[1]
    layer = -1 if entry.layer is None else entry.layer
    tower = ("vision_tower", "projector", "image_newline", "language_model").index(entry.component)
    return tower, head in ("norm", "lm_head"), layer, head


# ---------------------------------------------------------------------------------------------
# Stacked <-> per-layer layouts of our trees.

_LAYER_KEY = re.compile(rf"^{STACK_AXIS}_(\d+)$")


def stack_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """`(c, "layers_3", ...)` -> `(c, "layers", ...)`; other paths unchanged."""
    return tuple(STACK_AXIS if _LAYER_KEY.match(k) else k for k in path)


def layer_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """`(c, "layers", ...)` -> `(c, "layers_{layer}", ...)`: the per-layer path of one row of a stacked array."""
    return tuple(f"{STACK_AXIS}_{layer}" if k == STACK_AXIS else k for k in path)


def is_stacked_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter path is in the stacked layout (`.../layers/...`)."""
    return STACK_AXIS in path


def lookup(tree: dict, entry: Entry) -> Any:
    """The entry's tensor in one of our nested trees, stacked or per layer (a row of the stacked array)."""
    stacked = STACK_AXIS in tree.get(entry.component, {})
    path, row = entry.location(stacked)
    for k in path:
        tree = tree[k]
    return tree if row is None else tree[row]


def layer_index(path: tuple[str, ...]) -> int | None:
    """The layer a per-layer path (`c/layers_3/...`) belongs to; None for any other path."""
    for k in path:
        if m := _LAYER_KEY.match(k):
            return int(m.group(1))
    return None


def without_leading_axis(sharding):
    """The sharding of one row of an array sharded as `sharding` (its spec minus the first axis)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding  # a single-device sharding places any shape alike


def with_leading_axis(sharding):
    """The sharding of a stack of rows sharded as `sharding` (the layer axis unsplit, as the rules say)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return sharding


@functools.lru_cache(maxsize=None)
def _device_stacker(sharding) -> Callable:
    # Compiled to write straight into the target sharding; one program per (sharding, shapes).
    return jax.jit(lambda *rows: jax.numpy.stack(rows), out_shardings=sharding)


def stack_rows(rows: list, sharding=None) -> jax.Array:
    """Device arrays, one per layer -> one stacked array [L, ...] in `sharding` (default: the rows'
    sharding with an unsplit leading axis), computed where the rows are."""
    return _device_stacker(sharding or with_leading_axis(rows[0].sharding))(*rows)


def take_layer(x: Any, layer: int) -> Any:
    """Row `layer` of a stacked array; for a `jax.ShapeDtypeStruct`, the row's shape and sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=without_leading_axis(x.sharding))
    return x[layer]


def stack(xs: list) -> Any:
    """Per-layer arrays -> one stacked array [L, ...] (numpy on the host, jax arrays on their devices,
    `jax.ShapeDtypeStruct`s abstractly)."""
    first = xs[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *first.shape), first.dtype, sharding=with_leading_axis(first.sharding))
    if isinstance(first, jax.Array):
        return stack_rows(xs)
    return np.stack(xs)


def _holds_layers(x: Any) -> bool:
    return isinstance(x, dict) and any(k == STACK_AXIS or _LAYER_KEY.match(k) for k in x)


def stack_layers(tree: Any, combine: Callable[[list], Any] = stack) -> Any:
    """Every dict holding `layers_0 ... layers_{n-1}` gets one `layers` subtree instead, its leaves stacked.

    Works on any pytree whose parameter trees are dicts (parameters, optimizer states, abstract
    shapes); what is stacked already stays as it is.
    """

    def fix(d):
        if not _holds_layers(d):
            return d
        keys = sorted((int(m.group(1)), k) for k in d if (m := _LAYER_KEY.match(k)))
        if [i for i, _ in keys] != list(range(len(keys))):
            raise ValueError(f"layers {[k for _, k in keys]} are not numbered 0 ... {len(keys) - 1}")
        out = {k: v for k, v in d.items() if not _LAYER_KEY.match(k)}
        if keys:
            out[STACK_AXIS] = jax.tree.map(lambda *xs: combine(list(xs)), *[d[k] for _, k in keys])
        return out

    return jax.tree.map(fix, tree, is_leaf=_holds_layers)


def unstack_layers(tree: Any, take: Callable[[Any, int], Any] = take_layer) -> Any:
    """The inverse of `stack_layers`: every `layers` subtree becomes `layers_0 ... layers_{n-1}`
    (n: the leading axis of its leaves)."""

    def fix(d):
        if not _holds_layers(d) or STACK_AXIS not in d:
            return d
        out = {k: v for k, v in d.items() if k != STACK_AXIS}
        sub = d[STACK_AXIS]
        for i in range(jax.tree.leaves(sub)[0].shape[0]):
            out[f"{STACK_AXIS}_{i}"] = jax.tree.map(lambda x, i=i: take(x, i), sub)
        return out

    return jax.tree.map(fix, tree, is_leaf=_holds_layers)


def to_layout(tree: Any, stacked: bool) -> Any:
    """`tree` in the stacked or the per-layer layout (whichever it is in now)."""
    return stack_layers(tree) if stacked else unstack_layers(tree)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each component's torch names sit in one checkpoint format.

    `vision` prefixes the tower's names (CLIP's or SigLIP's `embeddings...`, `encoder.layers...`), `text`
    replaces LLaMA's `model.` and `head` its `lm_head.`; `projector` prefixes `linear_N...`, except in the
    original format where the projector is an nn.Sequential (`mm_projector.0`, `.2`, ...); `newline`
    prefixes LLaVA-NeXT's `image_newline`.
    """

    name: str
    vision: str | None = None
    projector: str | None = None
    text: str | None = None
    head: str | None = None
    newline: str | None = None

    def prefix(self, component: str) -> str | None:
        return {"vision_tower": self.vision, "projector": self.projector, "language_model": self.text,
                "image_newline": self.newline}[component]


# llava-hf checkpoints as published (and as we export them): what every loader understands.
HF_LEGACY = Layout("hf_legacy", "vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                   "language_model.lm_head.", "")
# transformers >= 4.52 in memory (and some re-saved checkpoints).
HF_NEW = Layout("hf", "model.vision_tower.vision_model.", "model.multi_modal_projector.", "model.language_model.",
                "lm_head.", "model.")
# liuhaotian/llava-v1.5-7b: a LLaMA checkpoint plus model.mm_projector; the CLIP tower kept apart.
ORIGINAL = Layout("original", None, "model.mm_projector.", "model.", "lm_head.", "model.")
CLIP = Layout("clip", vision="vision_model.")
LLAMA = Layout("llama", text="model.", head="lm_head.")

# Vision tower prefixes seen in the wild (CLIP and SigLIP alike): with and without the `vision_model.` level
# (transformers 5 drops it).
_VISION_PREFIXES = (
    "model.vision_tower.vision_tower.vision_model.",  # original LLaVA(-NeXT, -OneVision) checkpoints that embed it
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
    "vision_model.",
    "",
)


def torch_name(entry: Entry, layout: Layout, projector_type: str = "mlp2x_gelu") -> str:
    """The name of `entry` in a checkpoint of the given layout."""
    theirs = entry.theirs
    if entry.component == "language_model":
        if theirs.startswith("lm_head."):
            return layout.head + theirs[len("lm_head.") :]
        return layout.text + theirs[len("model.") :]
    if entry.component == "projector" and layout.name == "original":
        k = int(theirs.split(".")[0].split("_")[1])
        leaf = theirs.split(".")[-1]
        # nn.Sequential(Linear, GELU, Linear, ...): Linear k sits at index 2(k-1); `linear` is a bare Linear.
        return f"{layout.projector}{leaf}" if projector_type == "linear" else f"{layout.projector}{2 * (k - 1)}.{leaf}"
    prefix = layout.prefix(entry.component)
    if prefix is None:
        raise KeyError(f"{entry.component} is not part of a {layout.name} checkpoint")
    return prefix + theirs


def is_unused(name: str, cfg: LlavaConfig, layout: Layout) -> bool:
    """Whether a checkpoint tensor is one LLaVA never computes with (so loading may skip it)."""
    if name.endswith(TEXT_UNUSED_SUFFIXES):
        return True
    if layout.name == "clip" and name.startswith(CLIP_TEXT_TOWER_PREFIXES):
        return True
    if layout.vision is None or not name.startswith(layout.vision):
        return False
    rest = name[len(layout.vision) :]
    if rest.startswith(VISION_UNUSED_PREFIXES) or rest in VISION_UNUSED_NAMES:
        return True
    head = "encoder.layers."
    if rest.startswith(head):
        return int(rest[len(head) :].split(".")[0]) >= cfg.num_vision_layers_used
    return False


def find_vision_prefix(keys) -> str | None:
    """The prefix under which a checkpoint keeps the vision tower's names (None if it has no vision tower)."""
    keys = set(keys)
    for p in _VISION_PREFIXES:
        if p + "embeddings.patch_embedding.weight" in keys:
            return p
    return None


def vision_model_type_of(keys, prefix: str) -> str:
    """Which tower (a `VisionConfig.model_type`) a checkpoint keeps under `prefix`, from its tensor names:
    CLIP has a class embedding, SigLIP a patch-embedding bias and no class embedding."""
    keys = set(keys)
    if prefix + "embeddings.class_embedding" in keys:
        return "clip_vision_model"
    if prefix + "embeddings.patch_embedding.bias" in keys:
        return "siglip_vision_model"
    raise ValueError(f"cannot tell the vision tower under {prefix!r}: neither a class embedding (CLIP) "
                     f"nor a patch-embedding bias (SigLIP)")


def to_ours(x: np.ndarray, transform: str) -> np.ndarray:
    """A torch tensor (as numpy) in our layout."""
    if transform == LINEAR:
        return x.T
    if transform == CONV:
        return x.transpose(2, 3, 1, 0)
    return x


def to_torch(x: np.ndarray, transform: str) -> np.ndarray:
    """One of our parameters in torch's layout (inverse of `to_ours`)."""
    if transform == LINEAR:
        return x.T
    if transform == CONV:
        return x.transpose(3, 2, 0, 1)
    return x


def detect_layout(keys) -> Layout:
    """The layout of a checkpoint, from its tensor names (HF new or legacy, original, CLIP, LLaMA)."""
    keys = list(keys)
    vision = find_vision_prefix(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return dataclasses.replace(HF_NEW, vision=vision or HF_NEW.vision)
    if any(k.startswith("language_model.model.") for k in keys):
        return dataclasses.replace(HF_LEGACY, vision=vision or HF_LEGACY.vision)
    if any(k.startswith("model.mm_projector") for k in keys):
        return dataclasses.replace(ORIGINAL, vision=vision)
    if any(k.startswith("model.layers.") for k in keys):
        return LLAMA
    if vision is not None:
        return dataclasses.replace(CLIP, vision=vision)
    raise ValueError(f"cannot tell the checkpoint layout from its tensor names, e.g. {keys[:3]}")
