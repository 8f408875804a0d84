"""LLaVA: CLIP vision tower -> projector -> LLaMA, joined the way transformers' `LlavaForConditionalGeneration`
(LLaVA-1.5) and `LlavaNextForConditionalGeneration` (LLaVA-NeXT anyres) are.

Images enter per row as tiles: `pixel_values` [B, S, H, W, C] holds row b's tiles (LLaVA-1.5: one per image;
NeXT: each image's base then its tiles), its images in the order of their placeholder runs, zeros in unused
slots. `input_ids` already carry each image as its own number of `image_token_index` copies (`llava_jax.anyres`
says how many). Each row's projected tile features, with the learned `image_newline` after them (NeXT), form
a table; `image_index` [B, T] names the table row each image token takes (built on the host by
`image_index`, below). Without it the features fill the placeholders in order, which is LLaVA-1.5's layout.
Shapes are static under jit: unused tile slots cost vision compute but change nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import anyres
from llava_jax.config import LlavaConfig
from llava_jax.models.layers import INIT_STD
from llava_jax.models.llama import Cache, LlamaModel
from llava_jax.models.lora import LORA_A, LORA_B, lora_a_init
from llava_jax.models.projector import build_projector
from llava_jax.models.vision import build_vision_tower


class Llava(nn.Module):
    cfg: LlavaConfig

    def setup(self):
        c = self.cfg
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        stack = dict(remat=c.remat, scan_layers=c.scan_layers)
        self.vision_tower = build_vision_tower(c, **stack, **kw)
        self.projector = build_projector(
            c.projector_type, c.text.hidden_size, use_bias=c.projector_bias, name="projector", **kw
        )
        self.language_model = LlamaModel(c.text, attention=c.attention, lora=c.lora, **stack, **kw)
        if c.is_anyres:
            # Replicated like a norm scale: it is appended to every row's feature table.
            init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("norm",))
            self.image_newline = self.param("image_newline", init, (c.text.hidden_size,), kw["param_dtype"])

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:  # [B, S, H, W, C] -> [B, table_rows - 1, D]
        """The feature table of each row but its newline: every tile's vision features of the chosen layer and
        strategy, projected to the language width (`S * tile_tokens` rows), then for NeXT-Video every slot's
        features average-pooled before the projector (`S * video_grid^2` rows; only video tokens read them)."""
        b, i = pixel_values.shape[:2]
        feats = self.vision_tower(pixel_values.reshape(b * i, *pixel_values.shape[2:]))
        if self.cfg.vision_feature_select_strategy in ("default", "patch"):
            feats = feats[:, 1:]
        elif self.cfg.vision_feature_select_strategy not in ("full", "cls_patch"):
            raise ValueError(f"unknown vision_feature_select_strategy {self.cfg.vision_feature_select_strategy!r}")
        table = self.projector(feats).reshape(b, -1, self.cfg.text.hidden_size)
        g = self.cfg.geometry
        if g.video == "average":  # transformers' LlavaNextVideoPooler (AvgPool2d, floor mode), then the projector
            n, side, s, v = feats.shape[0], g.grid, g.video_stride, g.video_grid
            grid = feats.reshape(n, side, side, -1)[:, :v * s, :v * s]
            pooled = grid.reshape(n, v, s, v, s, grid.shape[-1]).mean(axis=(2, 4))
            pooled = self.projector(pooled.reshape(n, v * v, -1)).reshape(b, -1, table.shape[-1])
            table = jnp.concatenate([table, pooled], axis=1)
        return table

    def is_media(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] bool: the image (and video) placeholder tokens, which take vision features."""
        is_media = input_ids == self.cfg.image_token_index
        if self.cfg.video_token_index is not None:
            is_media |= input_ids == self.cfg.video_token_index
        return is_media

    def embed(
        self, input_ids: jax.Array, pixel_values: jax.Array | None, image_index: Any = None
    ) -> jax.Array:  # [B, T, D]
        """Token embeddings with image (and video) placeholders replaced by their row's vision features.

        `image_index`: the row of the feature table (`anyres.AnyresConfig.table_rows`: tile features, NeXT-Video's
        pooled frames, the newline last) each image or video token takes: [B, T] int, or for a geometry whose tokens
        mix rows (OneVision's anyres_max and video pooling) a pair (rows [B, T, K], weights [B, T, K]), each token
        the weighted sum of its K rows (`anyres.table_sources`). None fills the placeholders with the tile features
        in order (LLaVA-1.5).
        """
        is_image = self.is_media(input_ids)
        text_ids = jnp.where(is_image, 0, input_ids)
        embeds = self.language_model.embed(text_ids)
        if pixel_values is None:
            return embeds
        feats = self.encode_images(pixel_values).astype(embeds.dtype)
        if self.cfg.is_anyres:
            newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (feats.shape[0], 1, feats.shape[2]))
            feats = jnp.concatenate([feats, newline], axis=1)
        # Rows stay on their devices through the gather: without these the partitioner replicates it.
        axes = ("activation_batch", "activation_length", "activation_embed")
        feats = nn.with_logical_constraint(feats, axes)
        embeds = nn.with_logical_constraint(embeds, axes)
        if image_index is None:
            if self.cfg.is_anyres:
                raise ValueError("an anyres (LLaVA-NeXT) model needs image_index: which feature each image token takes")
            image_index = jnp.cumsum(is_image, axis=1) - 1

        def take(idx):
            return jnp.take_along_axis(feats, jnp.clip(idx, 0, feats.shape[1] - 1)[..., None], axis=1)

        if isinstance(image_index, (tuple, list)):
            rows, weights = image_index
            # K gathers of [B, T, D] summed in float32 (no [B, T, K, D] intermediate).
            gathered = sum(take(rows[..., k]).astype(jnp.float32) * weights[..., k, None].astype(jnp.float32)
                           for k in range(rows.shape[-1])).astype(embeds.dtype)
        else:
            gathered = take(image_index)
        return nn.with_logical_constraint(jnp.where(is_image[..., None], gathered, embeds), axes)

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T]
        pixel_values: jax.Array | None = None,  # [B, I, H, W, C]
        attention_mask: jax.Array | None = None,  # [B, T] (or [B, S] with a cache)
        positions: jax.Array | None = None,  # [B, T]
        cache: Cache | None = None,
        cache_index: jax.Array | int | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        image_index: Any = None,  # [B, T], or (rows, weights) [B, T, K] each: see `embed`
        segment_ids: jax.Array | None = None,  # [B, T] int: packed rows, 0 = padding, 1, 2, ... each sample
    ) -> tuple[jax.Array, Cache | None]:
        """Logits [B, T, V] in float32 ([B, 1, V] with `last_only`) and the updated cache (None without one).

        With `hidden_only`, the final-norm hidden states [B, T, D] instead of logits (`lm_logits`
        turns them into logits). The cuDNN attention kernel takes padding as per-row lengths: rows
        must be right-padded (tokens first), as the training pipeline and evaluation write them;
        `LlavaModel` checks its inputs on the host and takes the XLA path for other layouts. A
        prefill into a cache (`cache_index` None) takes left-padded prompts (`LlamaModel`).

        Packed rows (`segment_ids`, no cache): several samples a row, each a contiguous run of slots
        numbered 1, 2, ... in the row, 0 on padding. Each sample's tokens attend only to its own, with
        `positions` restarting at 0 at its first slot (derived from the segments when None), so each
        gets the logits it gets alone. A token is real where `segment_ids != 0` and `attention_mask`
        (when given) is nonzero: the two must agree (`LlavaModel` checks on the host). Images need
        nothing more: a row's images fill its placeholders in order across its samples (LLaVA-1.5),
        and `image_index` (anyres) names each image token's feature row whatever sample holds it.
        """
        embeds = self.embed(input_ids, pixel_values, image_index)
        if segment_ids is not None:
            if attention_mask is not None:
                segment_ids = jnp.where(attention_mask != 0, segment_ids, 0)
            attention_mask = (segment_ids != 0).astype(jnp.int32)
            if positions is None:
                positions = segment_positions(segment_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        return self.language_model(embeds, positions, attention_mask, cache, cache_index, last_only, hidden_only,
                                   segment_ids=segment_ids)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:  # [..., D] -> [..., V] float32
        """The LM head on final-norm hidden states (from `hidden_only`)."""
        return self.language_model.logits(hidden)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding (left or right): cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] of packed rows: 0 at each segment's first slot, counting up within it (a
    segment is a contiguous run of one id; padding's values are never read)."""
    slots = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


def check_segments(segment_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> None:
    """Raise ValueError naming the row unless each row's nonzero segment ids are contiguous runs, each id
    once, and `attention_mask` (when given) is nonzero exactly where they are."""
    segment_ids = np.asarray(segment_ids)
    if attention_mask is not None and np.asarray(attention_mask).shape != segment_ids.shape:
        raise ValueError(f"segment_ids {segment_ids.shape} and attention_mask {np.asarray(attention_mask).shape} "
                         "differ in shape")
    for b, row in enumerate(segment_ids):
        runs = row[np.r_[True, row[1:] != row[:-1]]]
        runs = runs[runs != 0]
        if len(set(runs.tolist())) != len(runs):
            raise ValueError(f"row {b} of segment_ids: a segment is not one contiguous run of slots "
                             f"(runs in order: {runs.tolist()})")
        if attention_mask is not None and not np.array_equal(row != 0, np.asarray(attention_mask)[b] != 0):
            raise ValueError(f"row {b}: attention_mask and segment_ids != 0 disagree on which slots hold tokens")


def place_images(
    input_ids: np.ndarray,  # [B, T]
    images: Sequence[np.ndarray],  # per image in order across the batch: [P, H, W, C] tiles, or [H, W, C]
    cfg: LlavaConfig,
    sizes: Sequence[tuple[int, int]] | None = None,  # per image (height, width); needed for anyres only
    slots: int | None = None,
    *,
    videos: Sequence[np.ndarray] = (),  # per video in order across the batch: frames [F, H, W, C]
    images_per_row: Sequence[int] | None = None,
) -> tuple[np.ndarray | None, Any]:
    """(pixel_values [B, S, H, W, C], image_index): the images (and videos) of a batch as the model takes them.

    Images are matched to image placeholder runs in order, row by row: each takes `cfg.image_layout(size)
    .num_tokens` of its row's image tokens and `num_patches` tile slots (an image's padding patches beyond those
    are dropped); videos likewise to video placeholders, `video_tokens(frames)` tokens and a slot a frame, after
    the row's images. `images_per_row` (transformers' `batch_num_images`) says how many images each row holds,
    which decides OneVision's tiling (a row of several images takes each untiled); None tiles every image, as
    transformers does without it. S is `slots`, or the most a row needs. `image_index` is None for LLaVA-1.5,
    whose features fill the placeholders in order; [B, T] int32 for LLaVA-NeXT; (rows, weights) [B, T, 4] for a
    geometry whose tokens mix rows (`Llava.embed`). A row whose placeholders do not add up to whole images or
    videos is an error naming the row.
    """
    input_ids = np.asarray(input_ids)
    g = cfg.geometry
    is_image = input_ids == cfg.image_token_index
    is_video = input_ids == cfg.video_token_index if cfg.video_token_index is not None else np.zeros_like(is_image)
    if len(videos) and not g.video:
        raise ValueError("this model takes no video (its config has no video pooling)")
    if sizes is None:
        if cfg.is_anyres and len(images):
            raise ValueError("an anyres (LLaVA-NeXT) model needs image_sizes: each image's (height, width)")
        sizes = [(cfg.vision.image_size, cfg.vision.image_size)] * len(images)
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} image sizes")
    if images_per_row is not None:
        if len(images_per_row) != len(input_ids) or sum(images_per_row) != len(images):
            raise ValueError(f"images_per_row {list(images_per_row)} does not give each of the {len(input_ids)} "
                             f"rows its count of the {len(images)} images")
        tiled = [anyres.tiled_images(g, n) for n in images_per_row for _ in range(n)]
    else:
        tiled = [True] * len(images)
    layouts = [anyres.layout(g, s, t) for s, t in zip(sizes, tiled)]
    if not cfg.is_anyres:
        n = g.tile_tokens
        bad = np.nonzero(is_image.sum(axis=1) % n)[0]
        if bad.size:
            raise ValueError(f"row {bad[0]} of input_ids holds {is_image.sum(axis=1)[bad[0]]} image tokens "
                             f"({cfg.image_token_index}), not a multiple of the {n} tokens one image takes")
    frames = [len(v) for v in videos]
    image_rows = _match_rows(is_image.sum(axis=1), [lay.num_tokens for lay in layouts], "image", cfg.image_token_index,
                             lambda j: f"images of sizes {[tuple(sizes[k]) for k in j]}")
    video_rows = _match_rows(is_video.sum(axis=1), [g.video_tokens(f) for f in frames] if g.video else [],
                             "video", cfg.video_token_index, lambda j: f"videos of {[frames[k] for k in j]} frames")
    if image_rows is not None and images_per_row is not None and [len(r) for r in image_rows] != list(images_per_row):
        raise ValueError(f"the image placeholders give the rows {[len(r) for r in image_rows]} images, but "
                         f"images_per_row says {list(images_per_row)}")
    if image_rows is None or video_rows is None:
        total = int(is_image.sum())
        if video_rows is None:
            raise ValueError(f"input_ids hold {int(is_video.sum())} video tokens but {len(videos)} videos were given "
                             f"(of {frames} frames)")
        if cfg.is_anyres:
            raise ValueError(f"input_ids hold {total} image tokens but {len(images)} images were given "
                             f"(of sizes {[tuple(s) for s in sizes]})")
        n = g.tile_tokens
        raise ValueError(f"input_ids hold {total // n} image placeholder runs of {n} tokens "
                         f"but {len(images)} images were given")
    if not len(images) and not len(videos):
        return None, None
    tiles = [np.asarray(im)[None] if np.ndim(im) == 3 else np.asarray(im) for im in images]
    for j, (t, lay) in enumerate(zip(tiles, layouts)):
        if len(t) < lay.num_patches:
            raise ValueError(f"image {j} (size {tuple(sizes[j])}) has {len(t)} patches; its layout needs "
                             f"{lay.num_patches}")
    clips = [np.asarray(v) for v in videos]
    first = (tiles + clips)[0]
    for j, v in enumerate(clips):
        if v.ndim != 4 or v.shape[1:] != first.shape[1:]:
            raise ValueError(f"video {j} has frames of shape {v.shape[1:]}, not the {first.shape[1:]} of a tile")
    need = max(sum(layouts[j].num_patches for j in ir) + sum(frames[j] for j in vr)
               for ir, vr in zip(image_rows, video_rows))
    slots = need if slots is None else slots
    if slots < need:
        raise ValueError(f"a row needs {need} tile slots, more than the {slots} given")
    pixels = np.zeros((len(input_ids), slots, *first.shape[1:]), first.dtype)
    weighted = g.weighted
    index = None
    if cfg.is_anyres:
        index = np.zeros((*input_ids.shape, anyres.CORNERS) if weighted else input_ids.shape, np.int32)
        weights = np.zeros((*input_ids.shape, anyres.CORNERS), np.float32) if weighted else None
    for b, (ir, vr) in enumerate(zip(image_rows, video_rows)):
        start = 0
        for j in ir:
            n = layouts[j].num_patches
            pixels[b, start:start + n] = tiles[j][:n]
            start += n
        for j in vr:
            pixels[b, start:start + frames[j]] = clips[j]
            start += frames[j]
        if index is None:
            continue
        rows, w = anyres.table_sources(g, [sizes[j] for j in ir], slots, tiled=[tiled[j] for j in ir],
                                       videos=[frames[j] for j in vr])
        media = np.concatenate([np.nonzero(is_image[b])[0], np.nonzero(is_video[b])[0]])
        if weighted:
            index[b, media], weights[b, media] = rows, w
        else:
            index[b, media] = rows[:, 0]
    return pixels, ((index, weights) if weighted else index)


def _match_rows(counts: np.ndarray, tokens: list[int], kind: str, token_id: int | None, describe):
    """Items (images or videos, in order across the batch) to rows by their token counts: [items of each row],
    or None when the items ran out before the placeholders or outnumber them."""
    rows: list[list[int]] = [[] for _ in counts]
    i = 0
    for b, count in enumerate(counts):
        taken = 0
        while taken < count and i < len(tokens):
            taken += tokens[i]
            rows[b].append(i)
            i += 1
        if taken > count:
            raise ValueError(f"row {b} of input_ids holds {count} {kind} tokens ({token_id}), not the "
                             f"{taken} its {describe(rows[b])} take")
        if taken < count:
            return None
    return rows if i == len(tokens) else None


@dataclasses.dataclass
class LlavaOutput:
    logits: jax.Array  # [B, T, V] float32


class LlavaModel:
    """A LLaVA with its parameters: what `load_pretrained` returns.

    Call it like transformers' model: `model(input_ids, pixel_values, attention_mask, image_sizes).logits`,
    with `pixel_values` in order across the batch, channels last and normalised: LLaVA-1.5 [num_images, H, W, 3];
    LLaVA-NeXT [num_images, max_patches, H, W, 3] (zero patches as padding) with `image_sizes` [num_images, 2]
    as (height, width), as transformers' `LlavaNextForConditionalGeneration` takes them.
    """

    def __init__(self, config: LlavaConfig, params: Any):
        self.config = config
        self.params = params
        self.module = Llava(config)
        self._forward = _jitted_forward(config)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, segment_ids=None,
                 positions=None, pixel_values_videos=None, batch_num_images=None) -> LlavaOutput:
        """Logits [B, T, V] float32 of right- or left-padded rows, or of packed rows: `segment_ids` [B, T]
        (0 = padding, 1, 2, ... each sample, a contiguous run) and optionally `positions` [B, T] (0 at each
        sample's start; derived when None) give each sample the logits it gets alone (`Llava.__call__`).
        With packed rows `attention_mask` may be left out; given, it must be nonzero where the segments are.
        OneVision and NeXT-Video: `pixel_values_videos` [num_videos, frames, H, W, 3] in order across the batch,
        and `batch_num_images` (images per row: a row of several takes them untiled, as transformers does)."""
        input_ids = np.asarray(input_ids, np.int32)
        index = None
        if pixel_values is not None and not self.config.is_anyres and np.ndim(pixel_values) == 5:
            packed = np.asarray(pixel_values)  # already per row [B, I, H, W, C]
        else:
            images = [] if pixel_values is None else list(np.asarray(pixel_values))
            videos = [] if pixel_values_videos is None else list(np.asarray(pixel_values_videos))
            packed, index = place_images(
                input_ids, images, self.config,
                None if image_sizes is None else [tuple(s) for s in np.asarray(image_sizes)],
                videos=videos, images_per_row=None if batch_num_images is None else [int(n) for n in batch_num_images])
        if packed is not None:
            packed = packed.astype(self.config.dtype)
        if segment_ids is not None:
            segment_ids = np.asarray(segment_ids, np.int32)
            if segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids {segment_ids.shape} and input_ids {input_ids.shape} differ in shape")
            check_segments(segment_ids, attention_mask)
            attention_mask = (segment_ids != 0).astype(np.int32)
        if positions is not None:
            positions = np.asarray(positions, np.int32)
            if positions.shape != input_ids.shape:
                raise ValueError(f"positions {positions.shape} and input_ids {input_ids.shape} differ in shape")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, np.int32)
        attention = self.config.attention if is_right_padded(attention_mask) else "xla"
        return LlavaOutput(self._forward(self.params, input_ids, packed, attention_mask, index, segment_ids, positions,
                                         attention))


def is_right_padded(attention_mask: np.ndarray) -> bool:
    """Whether every row of a [B, T] mask is its tokens then its padding (what the cuDNN kernel takes)."""
    m = np.asarray(attention_mask) != 0
    return bool(np.all(m == (np.arange(m.shape[1]) < m.sum(axis=1, keepdims=True))))


@functools.lru_cache(maxsize=16)
def _jitted_forward(cfg: LlavaConfig):
    """One compiled forward per config, shared by every model loaded with it (loading twice compiles once).

    The attention implementation is a static argument: a left-padded batch falls back to "xla".
    """
    def forward(p, ids, px, mask, index, segments, positions, attention):
        return Llava(cfg.replace(attention=attention)).apply({"params": p}, ids, px, mask, positions, image_index=index,
                                                             segment_ids=segments)[0]

    return jax.jit(forward, static_argnums=7)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: LlavaConfig) -> Any:
    v = cfg.vision
    ids = jnp.zeros((1, 1), jnp.int32)
    px = jnp.zeros((1, 1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return jax.eval_shape(lambda: Llava(cfg).init(jax.random.key(0), ids, px, image_index=ids))["params"]


def abstract_params(cfg: LlavaConfig, *, boxed: bool = False) -> Any:
    """Shapes and dtypes of every parameter of a config ([jax.ShapeDtypeStruct]), nothing allocated.

    Traced once per architecture and layer layout in a process (abstractly, never compiled; with
    scanned layers the trace holds one layer per tower): compute settings change no shape, and every
    parameter takes `param_dtype`. `boxed=True` keeps the logical axis names (`nn.Partitioned`)
    that the sharding rules read. Each call returns a fresh tree: callers may edit it.
    """
    tree = _abstract_boxed(cfg.replace(dtype="float32", param_dtype="float32", remat="none"))
    dtype = jnp.dtype(cfg.param_dtype)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731

    def leaf(x):
        value = x.value if is_box(x) else x
        value = jax.ShapeDtypeStruct(value.shape, dtype)
        return x.replace_boxed(value) if boxed and is_box(x) else value

    return jax.tree.map(leaf, tree, is_leaf=is_box)


# Every parameter starts from one of three initializers, chosen by its leaf name as the modules
# declare them (`models/layers.py`): norm scales at 1, biases at 0, every matrix and embedding
# from N(0, INIT_STD^2). LoRA adapters start as peft's: A Kaiming-uniform, B at 0 (models/lora.py).
_ONES, _ZEROS = ("scale",), ("bias", LORA_B)


def _initial(key: jax.Array, name: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    if name == LORA_A:
        return lora_a_init(key, leaf.shape, leaf.dtype)
    if name in _ONES:
        return jnp.ones(leaf.shape, leaf.dtype)
    if name in _ZEROS:
        return jnp.zeros(leaf.shape, leaf.dtype)
    return INIT_STD * jax.random.normal(key, leaf.shape, leaf.dtype)


@functools.lru_cache(maxsize=32)
def _initializer(cfg: LlavaConfig):
    """rng -> unboxed parameters: one RNG stream per parameter, folded in from its path (stable across
    layouts of the rest of the tree), so any subset can be drawn alone."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))

    def init(rng: jax.Array) -> Any:
        leaves = []
        for path, leaf in flat:
            keys = [str(getattr(k, "key", k)) for k in path]
            leaves.append(_initial(jax.random.fold_in(rng, zlib.crc32("/".join(keys).encode())), keys[-1], leaf))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return init


def init_params(cfg: LlavaConfig, rng: jax.Array, *, shardings: Any = None) -> Any:
    """Randomly initialised parameters (boxed with logical axis names; `nn.unbox` for plain arrays).

    Built from `abstract_params(cfg)` and the initializers alone: no forward pass is traced or
    compiled. With `shardings` (a tree of `jax.sharding.Sharding`s nested like the parameters) each
    array is created directly in its shards: no device ever holds the whole model.
    """
    jitted = jax.jit(_initializer(cfg)) if shardings is None else jax.jit(_initializer(cfg), out_shardings=shardings)
    values = jitted(rng)
    boxed = abstract_params(cfg, boxed=True)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda box, value: box.replace_boxed(value), boxed, values, is_leaf=is_box)
