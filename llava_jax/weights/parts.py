"""Checkpoint sources for conversion: HF LLaVA, original LLaVA, and CLIP + LLaMA (+ mm_projector) parts.

Each source becomes a `Plan`: our config plus `Piece`s (a tensor store, its mapping layout and the
entries it provides). Names and shapes are checked from the file headers before anything is
written, then `Plan.batches` streams the parameters in groups of a bounded size. Files are opened
as tensor stores (stores.py), which read each tensor by copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Iterator

import flax.traverse_util as tu
import numpy as np

from llava_jax import paths
from llava_jax.anyres import AnyresConfig
from llava_jax.config import (
    LLAVA_MODEL_TYPES,
    PREPROCESSOR_CONFIG,
    SIGLIP_MEAN,
    SIGLIP_SO400M_384,
    SIGLIP_STD,
    ImageProcessorConfig,
    LlavaConfig,
    TextConfig,
    VideoProcessorConfig,
    VisionConfig,
    llava_config_from_hf,
    original_grid_pinpoints,
    original_max_tiles,
    text_config_from_hf,
    vision_config_from_hf,
)
from llava_jax.models.llava import abstract_params
from llava_jax.models.projector import projector_linears
from llava_jax.weights import mapping
from llava_jax.weights.entries import check_names, checkpoint_dtype, load_entries
from llava_jax.weights.safetensors_io import CheckpointError
from llava_jax.weights.stores import Store, open_checkpoint, open_file, read_json

FORMATS = ("hf", "original", "parts")
# OpenAI CLIP towers (ViT-B/32 ... ViT-L/14-336) all use 64-wide heads: the only field shapes do not give.
CLIP_HEAD_DIM = 64


# ---------------------------------------------------------------------------------------------
# Configs


def _wrap(fn, *args):
    """Config parsers raise ValueError; conversion reports every source problem as a CheckpointError."""
    try:
        return fn(*args)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def clip_vision_config(directory: str) -> VisionConfig:
    """The vision config of a CLIP directory (a full `CLIPModel` or a `CLIPVisionModel`)."""
    path = os.path.join(directory, "config.json")
    c = read_json(path)
    model_type = c.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a CLIP vision tower "
                              "(expected clip or clip_vision_model)")
    return _wrap(vision_config_from_hf, c.get("vision_config") or {} if model_type == "clip" else c, path)


def llama_text_config(directory: str) -> TextConfig:
    """The config of a LLaMA-family language model directory."""
    path = os.path.join(directory, "config.json")
    return _wrap(text_config_from_hf, read_json(path), path)


def infer_clip_config(store: Store, prefix: str) -> VisionConfig:
    """A CLIP (or SigLIP) vision config read off tensor shapes (for original checkpoints that embed the tower)."""
    if _wrap(mapping.vision_model_type_of, store.keys(), prefix) == "siglip_vision_model":
        return infer_siglip_config(store, prefix)
    hidden, channels, patch, _ = store.shape(prefix + "embeddings.patch_embedding.weight")
    positions = store.shape(prefix + "embeddings.position_embedding.weight")[0]
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in store.keys() if (m := layer.match(k))}
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=store.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=len(layers),
        num_heads=max(1, hidden // CLIP_HEAD_DIM),
        image_size=math.isqrt(positions - 1) * patch,
        patch_size=patch,
        num_channels=channels,
    )


def infer_siglip_config(store: Store, prefix: str) -> VisionConfig:
    """The SigLIP tower an original LLaVA-NeXT / OneVision checkpoint embeds, read off tensor shapes as CLIP's is:
    LLaVA-NeXT's SigLipVisionTower builds SigLIP-SO400M/14-384 (SigLipVisionConfig's defaults, 72-wide heads) and
    deletes the last layer; the head count is the width over SO400M's head width (it cannot be read off shapes)."""
    hidden, channels, patch, _ = store.shape(prefix + "embeddings.patch_embedding.weight")
    positions = store.shape(prefix + "embeddings.position_embedding.weight")[0]
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"{store.source}: {prefix}embeddings.position_embedding.weight holds {positions} "
                              "positions, not a square grid of patches (a SigLIP tower has no class token)")
    return dataclasses.replace(
        SIGLIP_SO400M_384, hidden_size=hidden,
        intermediate_size=store.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=len({int(m.group(1)) for k in store.keys() if (m := layer.match(k))}),
        num_heads=max(1, hidden // SIGLIP_SO400M_384.head_dim),
        # 384 px of 14 px patches is 27 a side (the last 6 px never reach a patch): keep the preset's size then.
        image_size=SIGLIP_SO400M_384.image_size if SIGLIP_SO400M_384.image_size // patch == side else side * patch,
        patch_size=patch,
        num_channels=channels)


_ORIGINAL_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llama": "llama", "llava_mistral": "mistral",
                        "llava_qwen": "qwen2"}
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def original_llava_config(c: dict, vision: VisionConfig, path: str, image_token_index: int | None) -> LlavaConfig:
    """Our config from an original LLaVA `config.json` (`mm_*` fields) and the tower's vision config."""
    model_type = c.get("model_type", "llava")
    if model_type not in _ORIGINAL_TEXT_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a LLaMA-based LLaVA "
                              f"(expected one of {sorted(_ORIGINAL_TEXT_TYPES)})")
    text = _wrap(text_config_from_hf, {**c, "model_type": _ORIGINAL_TEXT_TYPES[model_type]}, path)
    projector = c.get("mm_projector_type", "linear")  # LLaVA v1 configs predate the field
    _wrap(projector_linears, projector)
    feature = c.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise CheckpointError(f"{path}: mm_vision_select_feature {feature!r} is not supported "
                              "(expected patch or cls_patch)")
    mm_hidden = c.get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise CheckpointError(f"{path}: mm_hidden_size is {mm_hidden} but the vision tower's width is "
                              f"{vision.hidden_size}")
    layer, strategy = int(c.get("mm_vision_select_layer", -1)), _SELECT_FEATURE[feature]
    if vision.model_type == "siglip_vision_model":
        # LLaVA-NeXT's SigLipVisionTower ignores mm_vision_select_*: the last layer of its (last-layer-deleted)
        # tower, every one of the 729 patch tokens (there is no CLS to drop).
        layer, strategy = -1, "full"
    image = text.vocab_size if image_token_index is None else image_token_index
    cfg = LlavaConfig(
        vision=vision,
        text=text,
        projector_type=projector,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        # The original splices images at run time (id -200); ours takes the first id past the vocabulary.
        image_token_index=image,
    )
    _wrap(lambda: cfg.num_vision_layers_used)
    geometry = original_anyres(c, cfg, path)
    # The original feeds a video through its image placeholder; ours marks it with the id after <image>'s.
    return cfg.replace(anyres=geometry, video_token_index=image + 1 if geometry and geometry.video else None)


def original_anyres(c: dict, cfg: LlavaConfig, path: str) -> AnyresConfig | None:
    """LLaVA-NeXT's tiling from an original config.json (`image_aspect_ratio: anyres`, `mm_patch_merge_type`,
    `image_grid_pinpoints` as (width, height) pairs, read as the image settings read them); None for
    LLaVA-1.5's one tile ("pad" / "square"). `anyres_max_N` adds OneVision's rules, `mm_resampler_type:
    spatial_pool` LLaVA-NeXT-Video's average-pooled frames."""
    flat = cfg.geometry
    resampler = c.get("mm_resampler_type")
    if resampler not in (None, "spatial_pool"):
        raise CheckpointError(f"{path}: mm_resampler_type {resampler!r} is not supported (expected 'spatial_pool', "
                              "LLaVA-NeXT-Video's frame pooling, or none)")
    pins = _wrap(original_grid_pinpoints, c, path, flat.tile_size)
    if not pins:
        if resampler:
            raise CheckpointError(f"{path}: mm_resampler_type 'spatial_pool' (video) needs image_aspect_ratio "
                                  f"'anyres' (LLaVA-NeXT-Video's), found {c.get('image_aspect_ratio')!r}")
        return None
    if flat.extra_tokens:
        raise CheckpointError(f"{path}: anyres needs mm_vision_select_feature 'patch' (the CLS token dropped)")
    max_tiles = original_max_tiles(c)
    if resampler:
        if max_tiles is not None:
            raise CheckpointError(f"{path}: mm_resampler_type 'spatial_pool' with image_aspect_ratio "
                                  f"{c['image_aspect_ratio']!r} is not supported (LLaVA-NeXT-Video tiles by 'anyres')")
        return _wrap(functools.partial(AnyresConfig, video="average", video_stride=next_video_stride(c, cfg, path)),
                     flat.tile_size, flat.grid, pins, "spatial_unpad", "original")
    if max_tiles is None:
        return _wrap(AnyresConfig, flat.tile_size, flat.grid, pins, "spatial_unpad", "original")
    # LLaVA-OneVision (llava_arch.py): frames pooled by `get_2dPool` (bilinear, stride 2: ceil(grid / 2) a side)
    # and one newline after a video (`mm_newline_position` "one_token"); the other settings are not supported.
    pool = c.get("mm_spatial_pool_mode", "bilinear")
    newline = c.get("mm_newline_position", "one_token")
    if pool != "bilinear" or newline != "one_token" or int(c.get("mm_spatial_pool_stride", 2)) != 2:
        raise CheckpointError(f"{path}: video pooling mm_spatial_pool_mode {pool!r}, stride "
                              f"{c.get('mm_spatial_pool_stride', 2)}, mm_newline_position {newline!r} is not "
                              "supported (LLaVA-OneVision's: 'bilinear', 2, 'one_token')")
    return _wrap(functools.partial(AnyresConfig, max_tiles=max_tiles, untiled_multi=True, video="bilinear"),
                 flat.tile_size, flat.grid, pins, "spatial_unpad", "original")


# Keys of LLaVA-NeXT's later video code (July 2024 on) and the only values that compute as the release did.
_NEXT_VIDEO_LATER_KEYS = {"mm_pooling_position": "before", "mm_newline_position": "no_token"}


def next_video_stride(c: dict, cfg: LlavaConfig, path: str) -> int:
    """The frame pooling stride of an original LLaVA-NeXT-Video config (`mm_resampler_type: spatial_pool`).

    As the checkpoints were released (LLaVA-NeXT's `llavavid`, May 2024; transformers' LlavaNextVideo computes the
    same): a video's frames go through the tower, `SpatialPool` (nn.AvgPool2d, kernel = stride =
    `mm_spatial_pool_stride`) on each frame's grid of vision features, then the projector; the frames' tokens
    follow one another with no newline. Images are LLaVA-NeXT's (anyres, newlines, never pooled). Only the
    'average' mode is supported: 'max' and 'conv' (which adds `vision_resampler` weights) are not.
    """
    mode = c.get("mm_spatial_pool_mode")
    if mode != "average":
        raise CheckpointError(f"{path}: mm_spatial_pool_mode {mode!r} is not supported with mm_resampler_type "
                              "'spatial_pool' (expected 'average', LLaVA-NeXT-Video's)")
    stride = c.get("mm_spatial_pool_stride")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= cfg.geometry.grid:
        raise CheckpointError(f"{path}: mm_spatial_pool_stride {stride!r} is not a whole number of feature "
                              f"positions from 1 to the tower's grid ({cfg.geometry.grid})")
    # SpatialPool's width (the projector's mm_hidden_size): average pooling keeps the tower's.
    out = c.get("mm_spatial_pool_out_channels", cfg.vision.hidden_size)
    if out != cfg.vision.hidden_size:
        raise CheckpointError(f"{path}: mm_spatial_pool_out_channels is {out!r} but 'average' pooling keeps the "
                              f"vision tower's width {cfg.vision.hidden_size}")
    for key, value in _NEXT_VIDEO_LATER_KEYS.items():
        if c.get(key, value) != value:
            raise CheckpointError(f"{path}: {key} {c[key]!r} is not supported with mm_resampler_type "
                                  f"'spatial_pool' (expected {value!r}: frames pooled before the projector, "
                                  "no newline, as LLaVA-NeXT-Video was released)")
    return stride


def projector_type_of(keys, prefix: str = "model.mm_projector.") -> str | None:
    """The projector type an `mm_projector` state dict holds: a bare Linear or an nn.Sequential of N."""
    rest = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if "weight" in rest:
        return "linear"
    linears = {r.split(".")[0] for r in rest if r.split(".")[0].isdigit()}
    return f"mlp{len(linears)}x_gelu" if linears else None


def init_projector(cfg: LlavaConfig, seed: int) -> dict:
    """A fresh projector as LLaVA stage 1 starts it: torch nn.Linear's default U(-1/sqrt(in), 1/sqrt(in))."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for name, leaves in abstract_params(cfg)["projector"].items():
        bound = 1.0 / math.sqrt(leaves["kernel"].shape[0])
        out[name] = {k: rng.uniform(-bound, bound, v.shape).astype(np.float32) for k, v in leaves.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass
class Piece:
    """Entries one store provides, under one layout; `skip` names are present but deliberately not read."""

    store: Store
    layout: mapping.Layout
    entries: list[mapping.Entry]
    skip: frozenset[str] = frozenset()

    def names(self, cfg: LlavaConfig) -> dict[str, mapping.Entry]:
        return {mapping.torch_name(e, self.layout, cfg.projector_type): e for e in self.entries}


@dataclasses.dataclass
class Plan:
    """Everything a conversion writes, still unread: config, tensor pieces, extras, side files."""

    cfg: LlavaConfig
    pieces: list[Piece]
    source_dtype: str
    tokenizer_dir: str | None
    preprocessor: ImageProcessorConfig | str  # a config to write, or a preprocessor_config.json to copy
    fresh: dict = dataclasses.field(default_factory=dict)  # parameters made here (a new projector)
    notes: list[str] = dataclasses.field(default_factory=list)
    video: VideoProcessorConfig | None = None  # a video_preprocessor_config.json to write (a video model)

    def validate(self) -> None:
        """Names and shapes of every piece against the config, from headers only (nothing read yet)."""
        shapes = tu.flatten_dict(mapping.unstack_layers(abstract_params(self.cfg)))
        for p in self.pieces:
            expected = p.names(self.cfg)
            keys = [k for k in p.store.keys() if k not in p.skip]
            check_names(keys, expected, self.cfg, p.layout, p.store.source)
            for name, e in expected.items():
                found = p.store.shape(name)
                got = mapping.to_ours(np.broadcast_to(np.zeros((), np.uint8), found), e.transform).shape
                want = shapes[e.path].shape
                if tuple(got) != tuple(want):
                    raise CheckpointError(
                        f"{p.store.source}: tensor {name} has shape {tuple(found)}, which does not match the config "
                        f"(ours: {'/'.join(e.path)} {tuple(want)}; read as {tuple(got)})"
                    )

    def extras(self, dtype: str) -> list[tuple[str, np.ndarray]]:
        """Vision tensors LLaVA never computes with (post_layernorm, layers past the feature layer), kept
        under their published llava-hf names so that export to HF is complete."""
        out = []
        for p in self.pieces:
            if p.layout.vision is None or not any(e.component == "vision_tower" for e in p.entries):
                continue
            for k in p.store.keys():
                rest = k[len(p.layout.vision) :]
                if (k.startswith(p.layout.vision) and k not in p.skip and mapping.is_unused(k, self.cfg, p.layout)
                        and rest not in mapping.VISION_UNUSED_NAMES):
                    out.append((mapping.HF_LEGACY.vision + rest, p.store.get(k).astype(dtype)))
        return out

    def batches(self, dtype: str, max_bytes: int) -> Iterator[dict]:
        """Our parameter tree (one array per layer, as stored) in pieces of about `max_bytes`, never
        splitting a layer."""
        shapes = tu.flatten_dict(mapping.unstack_layers(abstract_params(self.cfg)))
        np_dtype = np.dtype(dtype)
        if self.fresh:
            yield _cast(self.fresh, np_dtype)
        for p in self.pieces:
            batch: list[mapping.Entry] = []
            size, group = 0, None
            for e in sorted(p.entries, key=mapping.layer_order):
                if batch and size >= max_bytes and e.path[:2] != group:
                    yield self._load(p, batch, np_dtype)
                    batch, size = [], 0
                batch.append(e)
                group = e.path[:2]
                size += math.prod(shapes[e.path].shape) * np_dtype.itemsize
            if batch:
                yield self._load(p, batch, np_dtype)

    def _load(self, p: Piece, entries, dtype) -> dict:
        return load_entries(
            p.store, self.cfg, entries, p.layout, dtype=dtype, source=p.store.source, place=lambda path, x: x,
            stacked=False,
        )


def _cast(tree: dict, dtype: np.dtype) -> dict:
    return tu.unflatten_dict({p: np.asarray(v).astype(dtype) for p, v in tu.flatten_dict(tree).items()})


def _preprocessor(directory: str | None, cfg: LlavaConfig, pad: bool | None) -> ImageProcessorConfig | str:
    """The source's preprocessor_config.json (copied as is unless padding is overridden), else one from the config.

    An anyres model (LLaVA-NeXT) always gets anyres settings: its own tiling (pinpoints and their convention)
    with a CLIP json's sizes and normalisation where the directory has one (the original keeps the tower's
    CLIP processor beside an `image_aspect_ratio: anyres` config).
    """
    parsed = None
    if directory and paths.isfile(os.path.join(directory, PREPROCESSOR_CONFIG)):
        try:
            parsed = ImageProcessorConfig.from_pretrained(directory)
        except ValueError as e:
            raise CheckpointError(f"{directory}/{PREPROCESSOR_CONFIG}: {e}") from None
        if pad is None and parsed.is_anyres == cfg.is_anyres:
            return os.path.join(directory, PREPROCESSOR_CONFIG)
    if cfg.is_anyres:
        if pad:
            raise CheckpointError("image_aspect_ratio 'pad' does not apply to an anyres (LLaVA-NeXT) model")
        g = cfg.geometry
        # No processor file (an original with its tower inside): the tower's processor, SigLIP's 0.5 mean/std for
        # a SigLIP one; OneVision's rules where images of a row are taken untiled.
        norm = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD) if cfg.vision.model_type == "siglip_vision_model" else {}
        base = parsed or ImageProcessorConfig(size=g.tile_size, crop_size=g.tile_size, **norm)
        return dataclasses.replace(base, pad_to_square=False, grid_pinpoints=g.pinpoints,
                                   pinpoint_convention=g.convention, onevision=base.onevision or g.untiled_multi)
    if parsed is not None:
        return dataclasses.replace(parsed, pad_to_square=bool(pad))
    size = cfg.vision.image_size
    return ImageProcessorConfig(size=size, crop_size=size, pad_to_square=bool(pad))


def _video_settings(cfg: LlavaConfig, pre: ImageProcessorConfig | str, src: str | None) -> VideoProcessorConfig | None:
    """The video_preprocessor_config.json a model that pools video frames gets (None for one that does not).

    A llava-hf source's own settings where it has them (`src`); else the originals' rule (their video demos run
    the tower's image processor on every frame): NeXT-Video's frames resized by the shortest side and centre
    cropped to a tile, OneVision's resized to a tile, normalised as the images are
    (`VideoProcessorConfig.from_image_processor`, as training's frames).
    """
    if not cfg.geometry.video:
        return None
    if src is not None:
        try:
            return VideoProcessorConfig.from_pretrained(src)
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    image = ImageProcessorConfig.from_pretrained(os.path.dirname(pre)) if isinstance(pre, str) else pre
    return VideoProcessorConfig.from_image_processor(image, cfg.geometry.video)


def detect_format(src: str) -> str:
    """`hf` or `original`, from `src/config.json`; a clear error for anything else."""
    path = os.path.join(src, "config.json")
    if not paths.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    if not paths.isfile(path):
        raise CheckpointError(f"{src}: unknown checkpoint format: no config.json "
                              "(expected a HF or original LLaVA directory)")
    c = read_json(path)
    if "text_config" in c or "vision_config" in c:
        if c.get("model_type") not in LLAVA_MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {c.get('model_type')!r} is not LLaVA "
                                  f"(expected one of {list(LLAVA_MODEL_TYPES)})")
        return "hf"
    if any(k.startswith("mm_") for k in c):
        return "original"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (model_type {c.get('model_type')!r}): not HF LLaVA (text_config + "
        "vision_config) nor original LLaVA (mm_* fields); for a CLIP tower plus a LLaMA use "
        "--vision-tower DIR --llm DIR"
    )


def plan_hf(src: str, *, image_aspect_ratio: str | None = None) -> Plan:
    """A HF LLaVA directory (either key layout, safetensors or .bin)."""
    path = os.path.join(src, "config.json")
    cfg = _wrap(llava_config_from_hf, read_json(path), path)
    store = open_checkpoint(src)
    layout = _wrap(mapping.detect_layout, store.keys())
    if layout.name not in ("hf", "hf_legacy"):
        raise CheckpointError(f"{src}: config.json is HF LLaVA but the tensor names look like a "
                              f"{layout.name} checkpoint")
    piece = Piece(store, layout, mapping.entries(cfg))
    first = next(iter(piece.names(cfg)))
    dtype = checkpoint_dtype(store, first) if first in store else "float32"
    pre = _preprocessor(src, cfg, _pad(image_aspect_ratio))
    return Plan(cfg, [piece], dtype, src, pre, video=_video_settings(cfg, pre, src))


def _pad(image_aspect_ratio: str | None) -> bool | None:
    return None if image_aspect_ratio is None else image_aspect_ratio == "pad"


def plan_original(
    src: str, *, vision_tower: str | None = None, image_aspect_ratio: str | None = None,
    image_token_index: int | None = None,
) -> Plan:
    """An original LLaVA directory: LLaMA + `model.mm_projector`, the CLIP tower apart (or embedded)."""
    path = os.path.join(src, "config.json")
    c = read_json(path)
    store = open_checkpoint(src)
    layout = _wrap(mapping.detect_layout, store.keys())
    if layout.name != "original":
        raise CheckpointError(f"{src}: config.json has mm_* fields but the tensor names look like a "
                              f"{layout.name} checkpoint")
    embedded = layout.vision
    notes = []
    if vision_tower:
        vision = clip_vision_config(vision_tower)
        skip = frozenset(k for k in store.keys() if k.startswith("model.vision_tower.")) if embedded else frozenset()
        if embedded:
            notes.append(f"using the vision tower from {vision_tower}; the copy embedded in {src} is not read")
        layout = dataclasses.replace(layout, vision=None)
    elif embedded:
        vision, skip = infer_clip_config(store, embedded), frozenset()
        if vision.has_class_token:
            notes.append(f"vision tower read from {src} itself; its heads ({vision.num_heads}) assume CLIP's "
                         f"{CLIP_HEAD_DIM}-wide heads")
    else:
        raise CheckpointError(
            f"{src}: the vision tower is not in the checkpoint; config.json names "
            f"{c.get('mm_vision_tower') or c.get('vision_tower')!r}: pass its local directory with --vision-tower DIR"
        )
    cfg = original_llava_config(c, vision, path, image_token_index)
    if cfg.geometry.video == "average":
        # llavavid's video_demo.py sets rope_scaling itself when a Vicuna's frames overrun 4096 positions.
        notes.append("LLaVA-NeXT-Video: the original's video demo stretches a Vicuna's RoPE linearly at run time "
                     "(factor ceil((frames x pooled tokens + 1000) / 4096)); config.json's rope settings are kept")
    pieces = []
    if vision_tower:
        clip = open_checkpoint(vision_tower)
        clip_layout = _clip_layout(clip)
        pieces.append(Piece(clip, clip_layout, mapping.vision_entries(cfg)))
        entries = mapping.projector_entries(cfg) + mapping.text_entries(cfg)
    else:
        entries = mapping.entries(cfg)
    pieces.append(Piece(store, layout, entries, skip))
    aspect = image_aspect_ratio or c.get("image_aspect_ratio") or "square"
    pre = _preprocessor(vision_tower, cfg, None if cfg.is_anyres and image_aspect_ratio is None else aspect == "pad")
    text_name = mapping.torch_name(mapping.text_entries(cfg)[0], layout)
    dtype = checkpoint_dtype(store, text_name) if text_name in store else "float32"
    return Plan(cfg, pieces, dtype, src, pre, notes=notes, video=_video_settings(cfg, pre, None))


def _clip_layout(store: Store) -> mapping.Layout:
    prefix = mapping.find_vision_prefix(store.keys())
    if prefix is None:
        raise CheckpointError(f"{store.source}: no CLIP vision tower found "
                              "(no *embeddings.patch_embedding.weight tensor)")
    return dataclasses.replace(mapping.CLIP, vision=prefix)


def plan_parts(
    vision_tower: str,
    llm: str,
    *,
    projector: str | None = None,
    projector_type: str | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_aspect_ratio: str | None = None,
    image_token_index: int | None = None,
    seed: int = 0,
) -> Plan:
    """Stage-1 initialisation: a CLIP directory, a LLaMA/Vicuna directory and a projector (file or fresh)."""
    vision = clip_vision_config(vision_tower)
    text = llama_text_config(llm)
    notes = []
    proj_store = open_file(projector) if projector else None
    found = projector_type_of(proj_store.keys()) if proj_store else None
    if proj_store and found is None:
        raise CheckpointError(f"{projector}: no model.mm_projector.* tensors "
                              "(expected the mm_projector.bin stage 1 writes)")
    if projector_type and found and projector_type != found:
        raise CheckpointError(f"{projector}: holds a {found} projector but --projector-type is {projector_type}")
    cfg = LlavaConfig(
        vision=vision,
        text=text,
        projector_type=projector_type or found or "mlp2x_gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_token_index=text.vocab_size if image_token_index is None else image_token_index,
    )
    _wrap(projector_linears, cfg.projector_type)
    _wrap(lambda: cfg.num_vision_layers_used)
    clip = open_checkpoint(vision_tower)
    lm = open_checkpoint(llm)
    lm_layout = _wrap(mapping.detect_layout, lm.keys())
    if lm_layout.name != "llama":
        raise CheckpointError(f"{llm}: expected a LLaMA checkpoint (model.layers.*), the tensor names look like "
                              f"{lm_layout.name}")
    pieces = [Piece(clip, _clip_layout(clip), mapping.vision_entries(cfg))]
    fresh = {}
    if proj_store:
        pieces.append(Piece(proj_store, mapping.ORIGINAL, mapping.projector_entries(cfg)))
    else:
        fresh = {"projector": init_projector(cfg, seed)}
        notes.append(f"projector {cfg.projector_type} freshly initialised (seed {seed})")
    pieces.append(Piece(lm, lm_layout, mapping.text_entries(cfg)))
    first = mapping.torch_name(mapping.text_entries(cfg)[0], lm_layout)
    dtype = checkpoint_dtype(lm, first) if first in lm else "float32"
    pre = _preprocessor(vision_tower, cfg, _pad(image_aspect_ratio))
    return Plan(cfg, pieces, dtype, llm, pre, fresh=fresh, notes=notes)
