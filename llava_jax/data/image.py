"""CLIP / LLaVA image preprocessing: the one function training, inference and evaluation use.

`preprocess` reproduces, value for value, the PIL path of Hugging Face's `CLIPImageProcessor`
(`CLIPImageProcessorPil` in transformers 5) and, with `pad_to_square=True`, of
`LlavaImageProcessorPil(do_pad=True)`, which is also what the original LLaVA-1.5 does with
`image_aspect_ratio = "pad"` (its `expand2square` then the CLIP processor):

  RGB -> [pad to square, background int(255 * mean)] -> resize shortest side to `size`
  (PIL bicubic) -> centre crop `crop_size` -> x / 255 -> (x - mean) / std     -> [H, W, 3] float32

The output is channels-last (HWC), the layout the Flax CLIP patch embedding takes; HF returns
CHW. The arithmetic is done in the same dtypes as transformers (rescale in float64 then cast to
float32, normalise in float32) so the results match bit for bit, not just within tolerance.

RGB conversion: transparent images (RGBA, LA, PA, P or L with a `transparency` entry) are
composited onto WHITE, as transformers' `convert_to_rgb` does. The original LLaVA code called
`Image.open(path).convert("RGB")` first, which drops the alpha channel instead (transparent
pixels keep whatever colour they store, often black). The two agree on every opaque image,
i.e. on all of LLaVA's training data (JPEG); we follow transformers, the executable reference.

LLaVA-NeXT anyres (settings with `grid_pinpoints`) follows transformers' `LlavaNextImageProcessor`
(PIL path), which is also the original LLaVA-NeXT's `process_anyres_image` given its pinpoints as
(height, width):

  RGB -> base: resize to size x size (aspect not kept)
      -> tiles: pick the resolution (anyres.select_best_resolution), resize into it keeping the aspect
         (the scaled side rounded up), paste centred on black, cut row-major crop x crop tiles
  each of [base, tiles...] -> the CLIP steps above (an identity on a tile when size == crop_size)
  -> [P, crop, crop, 3] float32, base first; P = anyres.layout(...).num_patches

transformers' pixel_values then pad P to the batch's largest with zero patches: `preprocess_images`.

LLaVA-OneVision (`cfg.onevision`) follows transformers' `LlavaOnevisionImageProcessor` (PIL path,
`LlavaOnevisionImageProcessorPil`). Its tile is its `size` (384, `{"height": 384, "width": 384}`) and every
patch is resized to exactly size x size with nothing cropped, so with `crop_size == size` (which its settings
require) an image alone in its prompt row is cut exactly as LLaVA-NeXT's above: same best resolution, same
resize (scaled side rounded up), same centred paste on black (its `divmod` padding puts the odd pixel
after, as here), base first. The difference is many images in one prompt row (`batch_num_images` > 1):
each of them is NOT tiled but padded to a square with `int(255 * mean)` (127 for OneVision's mean 0.5,
`expand_to_square`) and resized to size x size: one patch, `tiled=False` below. (transformers 5's default
`LlavaOnevisionImageProcessor` runs the same steps through torchvision, whose antialiased bicubic rounds
differently from PIL's by a level here and there; the PIL path is the one this project reproduces
everywhere, and the one the original LLaVA-NeXT code ran, through transformers 4's processors.)
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import BinaryIO, NamedTuple

import numpy as np
import PIL.Image

from llava_jax import anyres, paths
# The processor's settings live beside the model config (config.py, the bottom layer); re-exported here.
from llava_jax.config import (  # noqa: F401
    BICUBIC,
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_CONFIG,
    ImageProcessorConfig,
)


class ImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def load_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> PIL.Image.Image:
    """Opens an image file (or an open binary file) fully decoded and converted to RGB.

    Transparency is composited over white (see `to_rgb`). Raises ImageError (a ValueError) naming
    the file (`name`, for file objects) when it is missing, unreadable or corrupt.
    """
    try:
        # A remote image is read whole first: PIL's many small reads would each be a request.
        remote = isinstance(path, (str, os.PathLike)) and paths.is_remote(path)
        source = io.BytesIO(paths.read_bytes(path)) if remote else path
        with PIL.Image.open(source) as img:
            img.load()  # decode now, so a truncated file fails here and not later in a worker
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        where = name if name is not None else os.fspath(path)
        raise ImageError(f"Cannot read image {where!r}: {type(e).__name__}: {e}") from e


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB conversion exactly as transformers' `convert_to_rgb`: alpha is composited onto white."""
    if image.mode == "RGB":
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def expand_to_square(image: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """LLaVA's `expand2square`: the image centred on a square canvas (offset (long - short) // 2)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after the shortest side becomes `shortest_edge`; the long side is truncated.

    Same as transformers' `get_resize_output_image_size(..., default_to_square=False)`.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(array: np.ndarray, crop: int) -> np.ndarray:
    """Centre crop of an [H, W, C] array to [crop, crop, C], zero-padding first if it is smaller.

    Top/left offsets are (H - crop) // 2 as in transformers' `center_crop`, including its padding
    (ceil((crop - H) / 2) zeros before) when the image is smaller than the crop.
    """
    h, w = array.shape[:2]
    if h < crop or w < crop:
        new_h, new_w = max(h, crop), max(w, crop)
        top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
        padded[top_pad : top_pad + h, left_pad : left_pad + w] = array
        top, left = (h - crop) // 2 + top_pad, (w - crop) // 2 + left_pad
        return padded[max(0, top) : top + crop, max(0, left) : left + crop]
    top, left = (h - crop) // 2, (w - crop) // 2
    return array[top : top + crop, left : left + crop]


def preprocess(image: PIL.Image.Image, cfg: ImageProcessorConfig, tiled: bool = True) -> np.ndarray:
    """One PIL image -> normalised float32 pixels (HWC), as HF's CLIP/Llava/LlavaNext/LlavaOnevision processors.

    LLaVA-1.5 settings give [crop, crop, 3]; anyres settings (`cfg.grid_pinpoints`) the image's patches
    [P, crop, crop, 3], base first, without padding patches (`num_patches` says P). `tiled=False`: OneVision's
    untiled image (one of several in a prompt row), [1, size, size, 3]; see `is_tiled`.
    """
    return normalize(preprocess_uint8(image, cfg, tiled), cfg)


def preprocess_uint8(image: PIL.Image.Image, cfg: ImageProcessorConfig, tiled: bool = True) -> np.ndarray:
    """The geometric half of `preprocess`: RGB, pad or tile, resize, crop -> uint8 [crop, crop, 3] or [P, ...].

    The training pipeline stops here in its workers and normalises in the consuming process
    (`normalize`): uint8 is a quarter of the bytes to move between processes and to devices.
    """
    image = to_rgb(image)
    if not tiled:
        _check_untiled(cfg)
        # LlavaOnevisionImageProcessor.pad_to_square, then its resize to size x size (a shortest-edge resize
        # of a square to size and a centre crop of size, since size == crop_size).
        return _resize_and_crop(expand_to_square(image, cfg.background_color), cfg)[None]
    if cfg.grid_pinpoints:
        return np.stack([_patch_geometry(patch, cfg) for patch in anyres_patches(image, cfg)])
    if cfg.pad_to_square:
        image = expand_to_square(image, cfg.background_color)
    return _resize_and_crop(image, cfg)


def is_tiled(cfg: ImageProcessorConfig, images_in_row: int) -> bool:
    """Whether an image is tiled when its prompt row holds `images_in_row` images (transformers' `batch_num_images`).

    LlavaOnevisionImageProcessor tiles only an image alone in its row (`need_patching = n == 1`); LLaVA-NeXT tiles
    every image; LLaVA-1.5 settings never tile (one crop either way).
    """
    return not (cfg.onevision and images_in_row > 1)


def _check_untiled(cfg: ImageProcessorConfig) -> None:
    if not cfg.onevision:
        raise ValueError(f"only LlavaOnevisionImageProcessor settings leave an image untiled; these are a "
                         f"{cfg.processor_type}'s")


def _resize_and_crop(image: PIL.Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """The CLIP processor's geometry: shortest side to `size` (PIL), centre crop -> uint8 [crop, crop, 3]."""
    new_h, new_w = resize_output_size(image.height, image.width, cfg.size)
    image = image.resize((new_w, new_h), resample=cfg.resample)  # PIL takes (width, height)
    return center_crop(np.asarray(image), cfg.crop_size)  # [crop, crop, 3] uint8


def _patch_geometry(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """`_resize_and_crop` of one anyres patch (uint8 [h, w, 3]), which transformers applies to each."""
    if pixels.shape[0] == pixels.shape[1] == cfg.size == cfg.crop_size:
        return pixels  # both steps are identities (PIL returns a copy when asked for the same size)
    return _resize_and_crop(PIL.Image.fromarray(pixels), cfg)


def _tiling(cfg: ImageProcessorConfig) -> anyres.AnyresConfig:
    # Which pixels go to which patch does not depend on the tower's feature grid: any valid grid will do.
    return cfg.anyres_config(grid=1)


def num_patches(size: tuple[int, int], cfg: ImageProcessorConfig, tiled: bool = True) -> int:
    """Patches (base + tiles; 1 for LLaVA-1.5 and untiled OneVision images) of an image of `size` (height, width).

    transformers' `image_size_to_num_patches(size, image_grid_pinpoints, crop_size)`.
    """
    if not tiled:
        _check_untiled(cfg)
        return 1
    return anyres.layout(_tiling(cfg), size).num_patches


def anyres_patches(image: PIL.Image.Image, cfg: ImageProcessorConfig) -> list[np.ndarray]:
    """An image (made RGB) cut as LLaVA-NeXT cuts it: [base, tiles row-major...], uint8 [h, w, 3] arrays.

    The base is `size x size` (before the CLIP resize/crop, as in transformers); the tiles are
    `crop_size` a side, cut from the image resized into the best resolution and centred on black.
    """
    image = to_rgb(image)
    lay = anyres.layout(_tiling(cfg), (image.height, image.width))
    base = np.asarray(image.resize((cfg.size, cfg.size), resample=cfg.resample))
    (res_h, res_w), (new_h, new_w), (top, left) = lay.resolution, lay.resized, lay.offset
    canvas = np.zeros((res_h, res_w, 3), np.uint8)  # transformers pads with 0, the original pastes on black
    canvas[top:top + new_h, left:left + new_w] = np.asarray(image.resize((new_w, new_h), resample=cfg.resample))
    t = cfg.crop_size
    tiles = canvas.reshape(lay.rows, t, lay.cols, t, 3).swapaxes(1, 2).reshape(-1, t, t, 3)
    return [base, *tiles]


def normalization_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """float32 [256, 3]: the normalised value of every uint8 level in every channel.

    Same dtype path as transformers: uint8 -> float64 * factor -> float32, then float32
    (x - mean) / std. Each entry is computed by exactly those operations, so looking values up
    in this table gives the same bits as computing them pixel by pixel, at a fraction of the cost.
    """
    levels = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)
    x = (levels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return (x - mean) / std


def normalize(pixels: np.ndarray, cfg: ImageProcessorConfig | None, table: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: rescale and normalise per channel (see normalization_table).

    Pass `table` (normalization_table(cfg)) to skip rebuilding it (cfg is then unused), and `out`
    (float32, C-contiguous, the shape of `pixels`) to write the result there.
    """
    table = normalization_table(cfg) if table is None else table
    flat = np.ascontiguousarray(pixels).reshape(-1, 3)
    out = np.empty(pixels.shape, np.float32) if out is None else out
    dst = out.reshape(-1, 3)  # a view: out must be C-contiguous
    for c in range(3):  # one gather per channel: no index arithmetic, no intp copy of the pixels
        np.take(table[:, c], flat[:, c], out=dst[:, c])
    return out


def preprocess_batch(images: Sequence[PIL.Image.Image], cfg: ImageProcessorConfig) -> np.ndarray:
    """A list of PIL images -> [N, crop, crop, 3] float32 (LLaVA-1.5 settings; anyres: `preprocess_images`)."""
    if cfg.grid_pinpoints:
        raise ValueError("preprocess_batch takes LLaVA-1.5 settings; anyres images have patches and sizes: "
                         "use preprocess_images")
    if len(images) == 0:
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.float32)
    return np.stack([preprocess(im, cfg) for im in images])


class ImageBatch(NamedTuple):
    """Images of mixed sizes as the model takes them: transformers' LlavaNext inputs, channels last."""

    pixel_values: np.ndarray  # [N, max_patches, crop, crop, 3], each image's patches then zero patches
    image_sizes: np.ndarray  # int32 [N, 2]: (height, width) of each original image
    num_patches: np.ndarray  # int32 [N]: the real patches of each image (base + tiles)


def pad_patches(patches: Sequence[np.ndarray], max_patches: int | None = None) -> np.ndarray:
    """Per-image patches [P_i, H, W, 3] (any dtype) -> [N, max_patches, H, W, 3], zero patches after each.

    `max_patches` defaults to the largest P_i (transformers' `_pad_for_batching`); pass
    `cfg.anyres_config(grid).max_patches` for one static shape whatever the images. Zero is a zero patch
    only in float: uint8 patches padded here must be normalised image by image, the padding left alone.
    """
    if not patches:
        raise ValueError("pad_patches needs at least one image (the patch shape comes from them)")
    largest = max(len(p) for p in patches)
    max_patches = largest if max_patches is None else max_patches
    if largest > max_patches:
        raise ValueError(f"an image has {largest} patches, more than max_patches={max_patches}")
    out = np.zeros((len(patches), max_patches) + patches[0].shape[1:], patches[0].dtype)
    for i, p in enumerate(patches):
        out[i, :len(p)] = p
    return out


def preprocess_images(images: Sequence[PIL.Image.Image], cfg: ImageProcessorConfig,
                      max_patches: int | None = None, batch_num_images: Sequence[int] | None = None) -> ImageBatch:
    """Images of any sizes -> `ImageBatch` (pixel_values float32 zero-padded on the patch axis, sizes, counts).

    Equal, transposed to channels last, to LlavaNextImageProcessor's (LlavaOnevisionImageProcessor's) `pixel_values`
    and `image_sizes`. LLaVA-1.5 settings give one patch an image. `max_patches`: see `pad_patches`.
    `batch_num_images`: how many of the images (in order) each prompt row holds, as transformers' OneVision
    processor takes them (a list of lists of images); default one row per image. OneVision leaves the images
    of a row with several untiled (`is_tiled`).
    """
    rows = [1] * len(images) if batch_num_images is None else [int(n) for n in batch_num_images]
    if sum(rows) != len(images) or min(rows, default=1) < 1:
        raise ValueError(f"batch_num_images {rows} must be positive and add up to the {len(images)} images")
    tiled = [is_tiled(cfg, n) for n in rows for _ in range(n)]
    sizes = np.asarray([(im.height, im.width) for im in images], np.int32).reshape(-1, 2)
    patches = [preprocess(im, cfg, t) for im, t in zip(images, tiled)]
    if not cfg.grid_pinpoints:
        patches = [p[None] for p in patches]
    counts = np.asarray([len(p) for p in patches], np.int32)
    if not patches:
        limit = _tiling(cfg).max_patches if max_patches is None else max_patches
        return ImageBatch(np.zeros((0, limit, cfg.crop_size, cfg.crop_size, 3), np.float32), sizes, counts)
    return ImageBatch(pad_patches(patches, max_patches), sizes, counts)
