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

    OneVision's `anyres_max_9` (bilinear downscale of the unpadded grid when it exceeds 9 tiles) would be one
    more merge name here; it is not implemented.
    """

    tile_size: int = 336
    grid: int = 24
    pinpoints: tuple[Size, ...] = V16_PINPOINTS
    merge: str = "spatial_unpad"
    convention: str = "transformers"
    extra_tokens: int = 0

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"anyres merge {self.merge!r} is not supported (expected one of {MERGES})")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"anyres convention {self.convention!r} is not one of {CONVENTIONS}")
        if self.tile_size <= 0 or self.grid <= 0 or self.extra_tokens < 0:
            raise ValueError(f"anyres tile_size {self.tile_size} and grid {self.grid} must be positive, "
                             f"extra_tokens {self.extra_tokens} not negative")
        object.__setattr__(self, "pinpoints", tuple((int(a), int(b)) for a, b in self.pinpoints))
        if self.merge == "flat":
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
        return self.tile_tokens + max(fh * fw + fh for fh, fw in per)

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
    num_tokens: int  # image tokens in the text: base + h' * (w' + 1) newlines included


def layout(cfg: AnyresConfig, size: Size) -> ImageLayout:
    """The patches, tile grid, unpadded feature grid and token count of an image of `size` (height, width)."""
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (height, width) must be positive, got {tuple(size)}")
    if cfg.merge == "flat":
        t = cfg.tile_size
        return ImageLayout((height, width), (t, t), (t, t), (0, 0), 0, 0, 1, 0, 0, cfg.tile_tokens)
    res = select_best_resolution((height, width), cfg.resolutions())
    resized = _fit(height, width, *res)
    offset = ((res[0] - resized[0]) // 2, (res[1] - resized[1]) // 2)
    rows, cols = res[0] // cfg.tile_size, res[1] // cfg.tile_size
    fh, fw = _unpadded(height, width, rows * cfg.grid, cols * cfg.grid, cfg.convention)
    return ImageLayout((height, width), res, resized, offset, rows, cols, 1 + rows * cols, fh, fw,
                       cfg.tile_tokens + fh * (fw + 1))


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


def gather_index(cfg: AnyresConfig, size: Size, table_patches: int | None = None) -> np.ndarray:
    """int32 [num_tokens]: for each image token, its row in this image's feature table.

    The table is `concat(features.reshape(P * tile_tokens, D), newline[None])`, features [P, tile_tokens, D]
    being the projected base and tiles in preprocessing order (base, then tiles row-major) and P =
    `table_patches` (default: this image's own patch count; pass `cfg.max_patches` when patches are padded per
    image for static shapes), so that the newline sits at row P * tile_tokens. `table[index]` equals
    transformers' `LlavaNextModel.pack_image_features` for this image; flat gives arange(tile_tokens).
    """
    lay = layout(cfg, size)
    patches = lay.num_patches if table_patches is None else table_patches
    if patches < lay.num_patches:
        raise ValueError(f"a table of {patches} patches cannot hold image {lay.size}'s {lay.num_patches}")
    base = np.arange(cfg.tile_tokens, dtype=np.int32)
    if cfg.merge == "flat":
        return base
    g, newline = cfg.grid, patches * cfg.tile_tokens
    # The stitched map [rows * g, cols * g]: position (y, x) is tile (y // g, x // g), cell (y % g, x % g).
    y = np.arange(lay.rows * g)[:, None]
    x = np.arange(lay.cols * g)[None, :]
    stitched = (1 + (y // g) * lay.cols + x // g) * cfg.tile_tokens + (y % g) * g + x % g
    top = (lay.rows * g - lay.feature_rows) // 2
    left = (lay.cols * g - lay.feature_cols) // 2
    kept = stitched[top:top + lay.feature_rows, left:left + lay.feature_cols]
    with_newlines = np.concatenate([kept, np.full((lay.feature_rows, 1), newline)], axis=1)
    return np.concatenate([base, with_newlines.reshape(-1)]).astype(np.int32)


def from_hf_config(c: dict, tile_size: int, grid: int, extra_tokens: int = 0,
                   source: str = "config.json") -> AnyresConfig:
    """The geometry of a transformers config.json: `llava` is flat, `llava_next` tiles by its pinpoints.

    tile_size, grid and extra_tokens come from the vision tower as config.py parses it (image_size,
    image_size // patch_size, 1 when strategy "full" keeps a CLS), so that the tower is read in one place.
    """
    model_type = c.get("model_type")
    try:
        if model_type == "llava":
            return AnyresConfig.flat(tile_size, grid, extra_tokens)
        if model_type == "llava_next":
            # LlavaNextConfig's default when the field is absent is the v1.6 list.
            pins = parse_pinpoints(c.get("image_grid_pinpoints") or V16_PINPOINTS, tile_size)
            return AnyresConfig(tile_size, grid, pins, extra_tokens=extra_tokens)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if model_type == "llava_onevision":
        raise ValueError(f"{source}: vision_aspect_ratio {c.get('vision_aspect_ratio')!r} of llava_onevision "
                         f"(anyres_max_9 downscaling) is not supported")
    raise ValueError(f"{source}: model_type {model_type!r} has no image geometry (expected llava or llava_next)")


def table_index(cfg: AnyresConfig, sizes: Sequence[Size], slots: int) -> np.ndarray:
    """int32 [sum of the images' num_tokens]: one row's image tokens, in placeholder order, as rows of the
    row's feature table `concat(tiles.reshape(slots * tile_tokens, D), newline[None])`.

    The row's images hold consecutive tile slots in order (each its base then its tiles), `slots` in all (the
    static tile count of a batch row); the newline is the table's last row. Flat (LLaVA-1.5) gives
    arange(len(sizes) * tile_tokens): the features in order.
    """
    parts, used = [], 0
    for size in sizes:
        lay = layout(cfg, size)
        index = gather_index(cfg, size)
        own_newline = lay.num_patches * cfg.tile_tokens
        parts.append(np.where(index == own_newline, slots * cfg.tile_tokens, index + used * cfg.tile_tokens))
        used += lay.num_patches
    if used > slots:
        raise ValueError(f"images of sizes {list(sizes)} take {used} tiles, more than the row's {slots} slots")
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
