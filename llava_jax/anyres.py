"""Image tokens as data: what an image of a given size becomes (patches, tile grid, token count, token order).

LLaVA-NeXT's "anyres" cuts an image into a base view (the whole image resized to one tile) and a grid of tiles
chosen by `select_best_resolution` among the checkpoint's grid pinpoints; each tile gives `grid x grid` feature
vectors. After the projector the tiles are stitched into one feature map, the rows and columns that came from
padding are dropped (`unpad_image`), a learned `image_newline` follows every row, and the base's vectors go
first. LLaVA-1.5 is the one-tile case (`merge="flat"`): the base alone, no newline.

Every consumer asks this module: the renderer (how many `<image>` tokens to expand), preprocessing (how many
patches), the sources' lengths and bucketing, the model (`gather_index`: which feature row fills which image
token), the engine and the flops count. Pure Python + numpy, no jax, so that every layer can import it.

Sizes are `(height, width)` in pixels throughout, as in transformers' `image_sizes`.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

Size = tuple[int, int]  # (height, width)

# The LLaVA-v1.6 checkpoints' `image_grid_pinpoints` (height, width); symmetric, so the same in either order.
V16_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

MERGES = ("flat", "spatial_unpad")
VIDEO_POOLS = ("", "bilinear", "average")
# What a weighted table index holds per token: up to 4 rows (a bilinear sample's corners), weights summing to 1.
CORNERS = 4
CONVENTIONS = ("transformers", "original")


@dataclasses.dataclass(frozen=True)
class AnyresConfig:
    """How images become feature tokens (defaults: LLaVA-v1.6 with CLIP ViT-L/14-336).

    tile_size: pixels a side of one tile (the vision tower's image size: 336 CLIP, 384 SigLIP).
    grid: feature positions a side of one tile (image_size // patch_size: 24, 27).
    pinpoints: candidate resolutions, each a multiple of `tile_size` a side (see `convention`).
    merge: "spatial_unpad" (LLaVA-NeXT) or "flat" (LLaVA-1.5: one tile, pinpoints unused, no newline).
    convention: how `pinpoints` pairs are read. "transformers" reads them as (height, width); "original"
      (LLaVA-NeXT's mm_utils / llava_arch) as (width, height), and its `unpad_image` truncates where
      transformers rounds to 7 digits first. On a symmetric pinpoint list the two differ only on ties (an
      exactly square image up to one tile: 2x1 tiles in the original, 1x2 in transformers; same count,
      different layout) and on sizes where the float product lands just under an integer.
    extra_tokens: vectors a tile has beyond the grid (1 when the CLS token is kept, strategy "full" on CLIP);
      transformers' anyres merge cannot take them, so only with "flat".
    max_tiles: LLaVA-OneVision's `anyres_max_N` (N here; 0: none): when the unpadded feature grid holds more
      than 1.1^2 x N tiles' worth, it is bilinearly downscaled by sqrt(its size / N tiles) before the newlines.
      A downscaled token is a weighted sum of up to 4 table rows (`table_sources`), so weights join the index.
    untiled_multi: OneVision: an image that shares its prompt with others is its base tile alone plus one
      newline (transformers' `batch_num_images` > 1); otherwise every image is tiled.
    video: how a video's frames become tokens: "" (no video), "bilinear" (OneVision: each frame's grid of
      projected features bilinearly downscaled to ceil(grid / 2) a side, one newline after the video) or
      "average" (LLaVA-NeXT-Video: each frame's vision features average-pooled `video_stride` x `video_stride`
      before the projector, no newline). A frame is one tile slot.
    """

    tile_size: int = 336
    grid: int = 24
    pinpoints: tuple[Size, ...] = V16_PINPOINTS
    merge: str = "spatial_unpad"
    convention: str = "transformers"
    extra_tokens: int = 0
    max_tiles: int = 0
    untiled_multi: bool = False
    video: str = ""
    video_stride: int = 2

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"anyres merge {self.merge!r} is not supported (expected one of {MERGES})")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"anyres convention {self.convention!r} is not one of {CONVENTIONS}")
        if self.tile_size <= 0 or self.grid <= 0 or self.extra_tokens < 0:
            raise ValueError(f"anyres tile_size {self.tile_size} and grid {self.grid} must be positive, "
                             f"extra_tokens {self.extra_tokens} not negative")
        object.__setattr__(self, "pinpoints", tuple((int(a), int(b)) for a, b in self.pinpoints))
        if self.video not in VIDEO_POOLS:
            raise ValueError(f"video pooling {self.video!r} is not supported (expected one of {VIDEO_POOLS})")
        if self.video and self.extra_tokens:
            raise ValueError("video pooling needs a frame of exactly grid x grid vectors (the CLS token dropped)")
        if self.video_stride <= 0 or self.max_tiles < 0:
            raise ValueError(f"video_stride {self.video_stride} must be positive, "
                             f"max_tiles {self.max_tiles} not negative")
        if self.merge == "flat":
            if self.max_tiles or self.untiled_multi or self.video:
                raise ValueError("anyres_max, untiled multi-image and video need merge 'spatial_unpad' (a newline)")
            return
        if self.extra_tokens:
            raise ValueError(f"anyres merge 'spatial_unpad' needs a tile of exactly grid x grid vectors, "
                             f"got extra_tokens={self.extra_tokens} (the CLS token must be dropped)")
        if not self.pinpoints:
            raise ValueError("anyres merge 'spatial_unpad' needs at least one grid pinpoint")
        bad = [p for p in self.pinpoints if min(p) <= 0 or p[0] % self.tile_size or p[1] % self.tile_size]
        if bad:
            raise ValueError(f"anyres grid pinpoints {bad} are not positive multiples of tile_size {self.tile_size}")

    @classmethod
    def flat(cls, tile_size: int = 336, grid: int = 24, extra_tokens: int = 0) -> "AnyresConfig":
        """LLaVA-1.5: every image is one tile of `grid * grid + extra_tokens` tokens."""
        return cls(tile_size=tile_size, grid=grid, pinpoints=(), merge="flat", extra_tokens=extra_tokens)

    @property
    def tile_tokens(self) -> int:
        """Feature vectors one tile (the base included) contributes to the gather table."""
        return self.grid * self.grid + self.extra_tokens

    @property
    def max_patches(self) -> int:
        """Patches (base + tiles) of the largest pinpoint: the static per-image patch count under jit."""
        if self.merge == "flat":
            return 1
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    @property
    def max_tokens(self) -> int:
        """The most tokens any image can take: an image of exactly one pinpoint's size keeps its whole grid."""
        if self.merge == "flat":
            return self.tile_tokens
        per = [(h // self.tile_size * self.grid, w // self.tile_size * self.grid) for h, w in self.pinpoints]
        if not self.max_tiles:
            return self.tile_tokens + max(fh * fw + fh for fh, fw in per)
        # Downscaling is not monotone in the grid (a grid just under the 1.1 threshold keeps all of itself):
        # try every grid unpadding can leave (one side whole, the other cut).
        grids = {(fh, w) for fh, fw in per for w in range(1, fw + 1)} | {(h, fw) for fh, fw in per
                                                                          for h in range(1, fh + 1)}
        return self.tile_tokens + max(r * (c + 1) for r, c in (_downscaled(self, *g) for g in grids))

    @property
    def weighted(self) -> bool:
        """Whether some image or video tokens mix several table rows (bilinear downscaling): the model then
        takes [.., CORNERS] indices with weights (`table_sources`) instead of one row a token (`table_index`)."""
        return self.max_tiles > 0 or self.video == "bilinear"

    @property
    def video_grid(self) -> int:
        """Feature positions a side a video frame keeps after pooling (0 without video)."""
        if self.video == "bilinear":
            return math.ceil(self.grid / 2)
        if self.video == "average":
            return self.grid // self.video_stride
        return 0

    def video_tokens(self, frames: int) -> int:
        """Tokens a video of `frames` frames takes in the text (OneVision: one newline after the frames)."""
        if not self.video:
            raise ValueError("this model takes no video (its geometry has no video pooling)")
        return frames * self.video_grid ** 2 + (self.video == "bilinear")

    def table_rows(self, slots: int) -> int:
        """Rows of a batch row's feature table over `slots` tile slots: the tiles' features, the frames'
        pre-projector pooled features (NeXT-Video), then the newline (the last row)."""
        pooled = slots * self.video_grid ** 2 if self.video == "average" else 0
        return slots * self.tile_tokens + pooled + 1

    def resolutions(self) -> tuple[Size, ...]:
        """The pinpoints as (height, width) in list order, whichever convention they are written in."""
        if self.convention == "original":
            return tuple((b, a) for a, b in self.pinpoints)
        return self.pinpoints


def parse_pinpoints(spec: str | Sequence[Sequence[int]], tile_size: int) -> tuple[Size, ...]:
    """A config's `image_grid_pinpoints` as a tuple of pixel pairs, in the order and orientation written.

    Accepts a list of pairs, its string form ("[[336, 672], ...]"), explicit tile counts ("(1x2),(2x1)") or
    the range form "(1x1),...,(6x6)": every (i, j) from the first to the last, i outer, multiplied by
    `tile_size` (LLaVA-OneVision's configs).
    """
    if not isinstance(spec, str):
        return tuple((int(a), int(b)) for a, b in spec)
    text = spec.replace(" ", "")
    if "x" not in text:
        try:
            return parse_pinpoints(ast.literal_eval(text), tile_size)
        except (ValueError, SyntaxError, TypeError) as e:
            raise ValueError(f"image_grid_pinpoints {spec!r} is neither a list of [h, w] pairs nor '(AxB),...'") from e
    pairs = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)x(\d+)\)", text)]
    if not pairs or re.sub(r"\(\d+x\d+\)|,|\.\.\.", "", text):
        raise ValueError(f"image_grid_pinpoints {spec!r} is not of the form '(1x1),...,(6x6)' or '(1x2),(2x1)'")
    if "..." in text:
        (i0, j0), (i1, j1) = pairs[0], pairs[-1]
        pairs = [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
    return tuple((a * tile_size, b * tile_size) for a, b in pairs)


def select_best_resolution(size: Size, resolutions: Sequence[Size]) -> Size:
    """The (height, width) among `resolutions` that keeps the most of the image, then wastes the least.

    transformers' algorithm: scale each candidate to fit the image (aspect kept, truncated), effective = min(that
    area, the image's area), waste = candidate area - effective; the first candidate wins ties.
    """
    height, width = size
    best, best_effective, best_waste = None, 0, float("inf")
    for h, w in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """What one image becomes. `rows x cols` tiles (0 x 0 for flat) of `resolution`; the base comes first.

    Preprocessing (both conventions): resize the image to `resized` (aspect kept, the scaled side rounded up),
    paste it at `offset` (top, left) on a black `resolution` canvas, cut it into row-major tiles; the base is
    the whole image resized to one tile. Flat: the base only (`resized` is the tile; LLaVA-1.5's own
    `image_aspect_ratio` decides how the image gets there).
    """

    size: Size  # the original image (height, width)
    resolution: Size  # the padded canvas the tiles are cut from (height, width)
    resized: Size  # the image on that canvas
    offset: Size  # (top, left) of the image on the canvas
    rows: int
    cols: int
    num_patches: int  # base + rows * cols tiles: the vision tower's batch for this image
    feature_rows: int  # h': rows of the tile feature map left after unpadding
    feature_cols: int  # w'
    num_tokens: int  # image tokens in the text: base + h'' * (w'' + 1) newlines included
    token_rows: int = 0  # h'': rows of tokens after anyres_max downscaling (h' when none)
    token_cols: int = 0  # w''
    tiled: bool = True  # False: an untiled image of a multi-image prompt (OneVision), its base and a newline


def layout(cfg: AnyresConfig, size: Size, tiled: bool = True) -> ImageLayout:
    """The patches, tile grid, unpadded feature grid and token count of an image of `size` (height, width).

    `tiled=False` (only for `cfg.untiled_multi`, OneVision's images that share a prompt): the base alone and
    one newline. `tiled_images` says which images of a prompt are tiled.
    """
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (height, width) must be positive, got {tuple(size)}")
    t = cfg.tile_size
    if cfg.merge == "flat":
        return ImageLayout((height, width), (t, t), (t, t), (0, 0), 0, 0, 1, 0, 0, cfg.tile_tokens)
    if not tiled:
        if not cfg.untiled_multi:
            raise ValueError("this geometry tiles every image (untiled images are OneVision's multi-image rule)")
        return ImageLayout((height, width), (t, t), (t, t), (0, 0), 0, 0, 1, 0, 0, cfg.tile_tokens + 1, 0, 0, False)
    res = select_best_resolution((height, width), cfg.resolutions())
    resized = _fit(height, width, *res)
    offset = ((res[0] - resized[0]) // 2, (res[1] - resized[1]) // 2)
    rows, cols = res[0] // cfg.tile_size, res[1] // cfg.tile_size
    fh, fw = _unpadded(height, width, rows * cfg.grid, cols * cfg.grid, cfg.convention)
    th, tw = _downscaled(cfg, fh, fw)
    return ImageLayout((height, width), res, resized, offset, rows, cols, 1 + rows * cols, fh, fw,
                       cfg.tile_tokens + th * (tw + 1), th, tw)


def tiled_images(cfg: AnyresConfig, count: int) -> bool:
    """Whether the images of a prompt holding `count` of them are tiled (OneVision tiles a lone image only)."""
    return not (cfg.untiled_multi and count > 1)


def image_slots(cfg: AnyresConfig, images: int) -> int:
    """Tile slots one sample of at most `images` images fills at most: `max_patches` an image, but OneVision's
    several images are untiled (one slot each) and only a lone one tiles: max(max_patches, images) there."""
    return max(cfg.max_patches, images) if cfg.untiled_multi and images > 1 else images * cfg.max_patches


def _downscaled(cfg: AnyresConfig, fh: int, fw: int) -> Size:
    """The token grid of an unpadded fh x fw feature grid: OneVision's `anyres_max_N` shrinks it bilinearly by
    sqrt(fh * fw / (N * grid^2)) when that exceeds 1.1 (transformers' `pack_image_features`, floor division)."""
    if not cfg.max_tiles:
        return fh, fw
    ratio = math.sqrt(fh * fw / (cfg.max_tiles * cfg.grid ** 2))
    if ratio > 1.1:
        return int(fh // ratio), int(fw // ratio)
    return fh, fw


def bilinear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's `interpolate(mode="bilinear", align_corners=False)` along one axis, without antialiasing:
    for each output position its two source positions (lo, hi) and the weight of hi (lo's is 1 - it)."""
    # In float32 as torch's CPU kernel computes it, `scale * (i + 0.5) - 0.5` rounded once (a fused multiply-add):
    # at a few hundred positions any other rounding moves a weight by ~1e-5. The float64 product of two float32s
    # is exact, so rounding its difference to float32 once is the FMA's result.
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    exact = np.float64(scale) * (np.arange(size_out, dtype=np.float64) + 0.5) - 0.5
    src = np.maximum(exact.astype(f32), f32(0))
    lo = np.minimum(src.astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo.astype(f32)).astype(f32)


def _resample(grid: np.ndarray, out_rows: int, out_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A map of table rows [h, w] bilinearly resampled to [out_rows, out_cols]: (rows [o_r, o_c, 4], weights)."""
    y0, y1, wy = bilinear_weights(grid.shape[0], out_rows)
    x0, x1, wx = bilinear_weights(grid.shape[1], out_cols)
    wy, wx = wy[:, None], wx[None, :]
    one = np.float32(1)
    rows = np.stack([grid[y0][:, x0], grid[y0][:, x1], grid[y1][:, x0], grid[y1][:, x1]], axis=-1)
    weights = np.stack([(one - wy) * (one - wx), (one - wy) * wx, wy * (one - wx), wy * wx], axis=-1)
    return rows, weights


def _fit(height: int, width: int, target_h: int, target_w: int) -> Size:
    """The image resized into the target, aspect kept, the scaled side rounded up (`get_patch_output_size`)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _unpadded(height: int, width: int, fh: int, fw: int, convention: str) -> Size:
    """transformers' `unpad_image` on an fh x fw feature map: drop the rows or columns that padding filled."""
    # transformers rounds to 7 digits before truncating (so 11.999999999999998 -> 12); the original does not.
    to_int = (lambda x: int(round(x, 7))) if convention == "transformers" else int
    if width / height > fw / fh:
        pad = (fh - to_int(height * (fw / width))) // 2
        return fh - 2 * pad, fw
    pad = (fw - to_int(width * (fh / height))) // 2
    return fh, fw - 2 * pad


def _image_rows(cfg: AnyresConfig, lay: ImageLayout) -> tuple[np.ndarray, np.ndarray]:
    """(rows [num_tokens, CORNERS] int64, weights [num_tokens, CORNERS] float64) of one image's tokens in a table
    of its own patches (base then tiles, `tile_tokens` rows each); NEWLINE marks the newline."""
    base = np.arange(cfg.tile_tokens)
    if cfg.merge == "flat" or not lay.tiled:
        rows = base if cfg.merge == "flat" else np.concatenate([base, [NEWLINE]])
        return _single(rows)
    g = cfg.grid
    # The stitched map [rows * g, cols * g]: position (y, x) is tile (y // g, x // g), cell (y % g, x % g).
    y = np.arange(lay.rows * g)[:, None]
    x = np.arange(lay.cols * g)[None, :]
    stitched = (1 + (y // g) * lay.cols + x // g) * cfg.tile_tokens + (y % g) * g + x % g
    top = (lay.rows * g - lay.feature_rows) // 2
    left = (lay.cols * g - lay.feature_cols) // 2
    kept = stitched[top:top + lay.feature_rows, left:left + lay.feature_cols]
    if (lay.token_rows, lay.token_cols) == kept.shape:
        grid_rows, grid_w = _single(kept.reshape(-1))
        grid_rows = grid_rows.reshape(*kept.shape, CORNERS)
        grid_w = grid_w.reshape(*kept.shape, CORNERS)
    else:
        grid_rows, grid_w = _resample(kept, lay.token_rows, lay.token_cols)
    nl_rows, nl_w = _single(np.full(lay.token_rows, NEWLINE))
    rows = np.concatenate([grid_rows, nl_rows[:, None]], axis=1).reshape(-1, CORNERS)
    weights = np.concatenate([grid_w, nl_w[:, None]], axis=1).reshape(-1, CORNERS)
    b_rows, b_w = _single(base)
    return np.concatenate([b_rows, rows]), np.concatenate([b_w, weights])


def _video_rows(cfg: AnyresConfig, frames: int, first_slot: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weights) [tokens, CORNERS] of a video whose frames hold slots first_slot.. of a `slots`-slot table."""
    if not cfg.video:
        raise ValueError("this model takes no video (its geometry has no video pooling)")
    g, v = cfg.grid, cfg.video_grid
    parts = []
    for f in range(first_slot, first_slot + frames):
        if cfg.video == "average":  # the frame's pooled features, projected, in their own region of the table
            parts.append(_single(slots * cfg.tile_tokens + f * v * v + np.arange(v * v)))
        else:
            rows, weights = _resample(f * cfg.tile_tokens + np.arange(g * g).reshape(g, g), v, v)
            parts.append((rows.reshape(-1, CORNERS), weights.reshape(-1, CORNERS)))
    if cfg.video == "bilinear":
        parts.append(_single(np.array([NEWLINE])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


NEWLINE = -1  # marks the newline in a table index before it is placed at its table's last row


def _single(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens that each take one table row whole, in the weighted form."""
    rows = np.asarray(rows, np.int64)
    out = np.zeros((len(rows), CORNERS), np.int64)
    out[:, 0] = rows
    weights = np.zeros((len(rows), CORNERS))
    weights[:, 0] = 1.0
    return out, weights


def gather_index(cfg: AnyresConfig, size: Size, table_patches: int | None = None) -> np.ndarray:
    """int32 [num_tokens]: for each image token, its row in this image's feature table.

    The table is `concat(features.reshape(P * tile_tokens, D), newline[None])`, features [P, tile_tokens, D]
    being the projected base and tiles in preprocessing order (base, then tiles row-major) and P =
    `table_patches` (default: this image's own patch count; pass `cfg.max_patches` when patches are padded per
    image for static shapes), so that the newline sits at row P * tile_tokens. `table[index]` equals
    transformers' `LlavaNextModel.pack_image_features` for this image; flat gives arange(tile_tokens).
    A downscaled (anyres_max) image mixes rows: `table_sources` gives its weights.
    """
    lay = layout(cfg, size)
    patches = lay.num_patches if table_patches is None else table_patches
    if patches < lay.num_patches:
        raise ValueError(f"a table of {patches} patches cannot hold image {lay.size}'s {lay.num_patches}")
    rows, weights = _image_rows(cfg, lay)
    if np.any(weights[:, 0] != 1):
        raise ValueError(f"image {lay.size} is downscaled (anyres_max_{cfg.max_tiles}): its tokens mix table rows; "
                         "use table_sources")
    return np.where(rows[:, 0] == NEWLINE, patches * cfg.tile_tokens, rows[:, 0]).astype(np.int32)


def from_hf_config(c: dict, tile_size: int, grid: int, extra_tokens: int = 0,
                   source: str = "config.json") -> AnyresConfig:
    """The geometry of a transformers config.json: `llava` is flat, `llava_next` tiles by its pinpoints,
    `llava_onevision` adds anyres_max_N, untiled multi-image and bilinear video pooling, `llava_next_video`
    NeXT's tiling with average-pooled video frames.

    tile_size, grid and extra_tokens come from the vision tower as config.py parses it (image_size,
    image_size // patch_size, 1 when strategy "full" keeps a CLS), so that the tower is read in one place.
    """
    model_type = c.get("model_type")
    try:
        if model_type == "llava":
            return AnyresConfig.flat(tile_size, grid, extra_tokens)
        if model_type in ("llava_next", "llava_next_video"):
            # LlavaNextConfig's default when the field is absent is the v1.6 list.
            pins = parse_pinpoints(c.get("image_grid_pinpoints") or V16_PINPOINTS, tile_size)
            if model_type == "llava_next":
                return AnyresConfig(tile_size, grid, pins, extra_tokens=extra_tokens)
            mode = c.get("spatial_pool_mode", "average")
            if mode != "average":
                raise ValueError(f"spatial_pool_mode {mode!r} is not supported (only 'average')")
            return AnyresConfig(tile_size, grid, pins, extra_tokens=extra_tokens, video="average",
                                video_stride=int(c.get("spatial_pool_stride", 2)))
        if model_type == "llava_onevision":
            pins = parse_pinpoints(c.get("image_grid_pinpoints") or "(1x1),...,(6x6)", 384)
            aspect = c.get("vision_aspect_ratio", "anyres_max_9")
            match = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
            if not match:
                raise ValueError(f"vision_aspect_ratio {aspect!r} is not supported (expected anyres_max_N)")
            return AnyresConfig(tile_size, grid, pins, extra_tokens=extra_tokens, max_tiles=int(match.group(1)),
                                untiled_multi=True, video="bilinear")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    raise ValueError(f"{source}: model_type {model_type!r} has no image geometry "
                     f"(expected llava, llava_next, llava_next_video or llava_onevision)")


def to_hf_fields(cfg: AnyresConfig) -> dict:
    """The config.json fields that say this geometry (from_hf_config's inverse for the anyres families)."""
    g = cfg
    if g.convention != "transformers":
        # transformers reads pinpoints as (height, width); the original writes (width, height).
        g = dataclasses.replace(g, pinpoints=g.resolutions(), convention="transformers")
    out = {"image_grid_pinpoints": [list(p) for p in g.pinpoints]}
    if cfg.max_tiles:
        out["vision_aspect_ratio"] = f"anyres_max_{cfg.max_tiles}"
    if cfg.video == "average":
        out.update(spatial_pool_mode="average", spatial_pool_stride=cfg.video_stride)
    return out


def table_index(cfg: AnyresConfig, sizes: Sequence[Size], slots: int) -> np.ndarray:
    """int32 [sum of the images' num_tokens]: one row's image tokens, in placeholder order, as rows of the
    row's feature table `concat(tiles.reshape(slots * tile_tokens, D), newline[None])`.

    The row's images hold consecutive tile slots in order (each its base then its tiles), `slots` in all (the
    static tile count of a batch row); the newline is the table's last row. Flat (LLaVA-1.5) gives
    arange(len(sizes) * tile_tokens): the features in order. A geometry whose tokens mix rows (`cfg.weighted`)
    needs `table_sources`.
    """
    if cfg.weighted:
        raise ValueError("this geometry mixes table rows (anyres_max or bilinear video pooling): use table_sources")
    rows, _ = table_sources(cfg, sizes, slots)
    return rows[:, 0].copy() if len(rows) else np.zeros(0, np.int32)


def table_sources(cfg: AnyresConfig, sizes: Sequence[Size], slots: int, *,
                  tiled: bool | Sequence[bool] | None = None,
                  videos: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, CORNERS] int32, weights [n, CORNERS] float32): one batch row's image tokens in placeholder
    order, then its video tokens in placeholder order, each a weighted sum of rows of the row's feature table
    (`AnyresConfig.table_rows(slots)` rows: tiles, pooled frames for NeXT-Video, the newline last).

    The row's images take consecutive tile slots first (each its base then its tiles), then its videos one
    slot a frame (`videos`: each video's frame count). `tiled`: whether the images are tiled, one flag for all
    or one an image (a packed row's samples each decide for their own images); default: `tiled_images` of their
    count, OneVision tiling a lone image only.
    """
    tiled = tiled_images(cfg, len(sizes)) if tiled is None else tiled
    flags = [tiled] * len(sizes) if isinstance(tiled, (bool, np.bool_)) else list(tiled)
    if len(flags) != len(sizes):
        raise ValueError(f"{len(flags)} tiling flags for {len(sizes)} images")
    newline = cfg.table_rows(slots) - 1
    parts, used = [], 0
    for size, flag in zip(sizes, flags):
        lay = layout(cfg, size, flag)
        rows, weights = _image_rows(cfg, lay)
        parts.append((np.where(rows == NEWLINE, newline, rows + used * cfg.tile_tokens), weights))
        used += lay.num_patches
    frames_start = used
    used += sum(videos)
    if used > slots:
        raise ValueError(f"images of sizes {list(sizes)} and videos of {list(videos)} frames take {used} tiles, "
                         f"more than the row's {slots} slots")
    for frames in videos:
        rows, weights = _video_rows(cfg, frames, frames_start, slots)
        parts.append((np.where(rows == NEWLINE, newline, rows), weights))
        frames_start += frames
    if not parts:
        return np.zeros((0, CORNERS), np.int32), np.zeros((0, CORNERS), np.float32)
    return (np.concatenate([p[0] for p in parts]).astype(np.int32),
            np.concatenate([p[1] for p in parts]).astype(np.float32))
