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
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import PIL.Image

from llava_jax import paths

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# PIL's enum value for bicubic (also what HF stores as "resample": 3).
BICUBIC = int(PIL.Image.Resampling.BICUBIC)


class ImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the CLIP/LLaVA image processor.

    Attributes:
      size: target length of the shortest side after resizing (HF `size["shortest_edge"]`).
      crop_size: side of the square centre crop (HF `crop_size["height"]`).
      mean, std: per-channel normalisation, RGB order.
      pad_to_square: LLaVA-1.5 `image_aspect_ratio = "pad"` (HF Llava `do_pad`): pad the image to
        a square with the mean colour before resizing, so nothing is cropped away.
      rescale_factor: multiplies the uint8 pixel values before normalisation.
      resample: PIL resampling filter for the resize (bicubic for CLIP).
    """

    size: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC

    def __post_init__(self):
        # Lists (e.g. from JSON) would make the frozen dataclass unhashable.
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got mean={self.mean}, std={self.std}")
        if self.size <= 0 or self.crop_size <= 0:
            raise ValueError(f"size and crop_size must be positive; got {self.size}, {self.crop_size}")

    @property
    def background_color(self) -> tuple[int, int, int]:
        """Pad colour: `int(255 * mean)` per channel, (122, 116, 104) for CLIP, as LLaVA and HF use."""
        return tuple(int(x * 255) for x in self.mean)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of this config (our own field names)."""
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """Inverse of `to_dict`; unknown keys are an error (they are probably typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown ImageProcessorConfig keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as an HF `preprocessor_config.json` dict (CLIP keys plus Llava's `do_pad`)."""
        return {
            # CLIPImageProcessor reads every key below; LlavaImageProcessor also reads do_pad.
            "image_processor_type": "LlavaImageProcessor" if self.pad_to_square else "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_pad": self.pad_to_square,
        }

    def save(self, directory: str) -> str:
        """Writes `directory/preprocessor_config.json` in HF format; returns the file path."""
        paths.makedirs(directory)
        path = os.path.join(directory, PREPROCESSOR_CONFIG)
        paths.write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str, image_aspect_ratio: str | None = None) -> "ImageProcessorConfig":
        """Reads the processor settings of a checkpoint directory.

        Sources, in order:
        1. `preprocessor_config.json` (HF CLIP / Llava image processor JSON: size, crop_size,
           image_mean, image_std, rescale_factor, resample, do_pad). If it has no `do_pad` and the
           directory's `config.json` is an original-LLaVA one with `image_aspect_ratio`, that
           decides the padding, as in the original (CLIP processor + the model's aspect-ratio flag).
        2. Otherwise an original-LLaVA `config.json`: `image_aspect_ratio` ("pad" pads, anything
           else does not) and the image size from `mm_vision_tower` (a name ending in -336: 336 px,
           else 224 px), CLIP mean/std.
        `image_aspect_ratio` ("pad" | "square"), when given, overrides the padding choice. Note that
        llava-hf/llava-1.5-*-hf ships a CLIPImageProcessor without do_pad (centre crop) although the
        original LLaVA-1.5 pads: pass image_aspect_ratio="pad" to evaluate as the original did.

        Raises FileNotFoundError naming the directory when neither file exists.
        """
        hf_path = os.path.join(directory, PREPROCESSOR_CONFIG)
        llava_path = os.path.join(directory, "config.json")
        llava = _read_json(llava_path) if paths.isfile(llava_path) else None
        if paths.isfile(hf_path):
            hf = _read_json(hf_path)
            cfg = _from_hf_json(hf)
            if "do_pad" not in hf and llava is not None and "image_aspect_ratio" in llava:
                cfg = dataclasses.replace(cfg, pad_to_square=_aspect_ratio_pads(llava["image_aspect_ratio"]))
        elif llava is not None:
            cfg = _from_llava_config(llava, llava_path)
        else:
            raise FileNotFoundError(
                f"No image processor settings in {directory!r}: expected {PREPROCESSOR_CONFIG} "
                "(HF CLIP/Llava image processor) or config.json (original LLaVA, with mm_vision_tower)."
            )
        if image_aspect_ratio is not None:
            if image_aspect_ratio not in ("pad", "square"):
                raise ValueError(f"image_aspect_ratio must be 'pad' or 'square'; got {image_aspect_ratio!r}")
            cfg = dataclasses.replace(cfg, pad_to_square=_aspect_ratio_pads(image_aspect_ratio))
        return cfg


def _read_json(path: str) -> dict[str, Any]:
    with paths.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _aspect_ratio_pads(image_aspect_ratio: str | None) -> bool:
    # Original LLaVA: only "pad" pads; "square", None or anything else goes straight to the processor.
    if isinstance(image_aspect_ratio, str) and image_aspect_ratio.startswith("anyres"):
        raise ValueError("image_aspect_ratio 'anyres' (LLaVA-NeXT multi-crop) is not supported; use 'pad' or 'square'")
    return image_aspect_ratio == "pad"


def _edge(value: Any, keys: Sequence[str], what: str, path_hint: str) -> int:
    """HF stores sizes as an int or a dict ({"shortest_edge": N} / {"height": H, "width": W})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in keys:
            if k in value:
                if k == "height" and value.get("width", value[k]) != value[k]:
                    raise ValueError(f"{path_hint}: non-square {what} {value} is not supported")
                return int(value[k])
    raise ValueError(f"{path_hint}: cannot read {what} from {value!r}; expected an int or a dict with {keys}")


def _from_hf_json(d: dict[str, Any]) -> ImageProcessorConfig:
    hint = PREPROCESSOR_CONFIG
    defaults = ImageProcessorConfig()
    size = _edge(d.get("size", defaults.size), ("shortest_edge", "height"), "size", hint)
    crop = _edge(d.get("crop_size", size), ("height",), "crop_size", hint)
    return ImageProcessorConfig(
        size=size,
        crop_size=crop,
        mean=tuple(d.get("image_mean", CLIP_MEAN)),
        std=tuple(d.get("image_std", CLIP_STD)),
        pad_to_square=bool(d.get("do_pad", False)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        resample=int(d.get("resample", BICUBIC)),
    )


def _from_llava_config(d: dict[str, Any], path: str) -> ImageProcessorConfig:
    tower = d.get("mm_vision_tower") or d.get("vision_tower") or ""
    if not tower:
        raise ValueError(f"{path} has no mm_vision_tower: not an original LLaVA config, and no {PREPROCESSOR_CONFIG}")
    # openai/clip-vit-large-patch14-336 -> 336 px; the plain ViT-L/14 is 224 px.
    size = 336 if str(tower).rstrip("/").endswith("-336") else 224
    return ImageProcessorConfig(
        size=size, crop_size=size, pad_to_square=_aspect_ratio_pads(d.get("image_aspect_ratio"))
    )


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


def preprocess(image: PIL.Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One PIL image -> normalised pixels [crop, crop, 3] float32 (HWC), as HF's CLIP/Llava processors."""
    return normalize(preprocess_uint8(image, cfg), cfg)


def preprocess_uint8(image: PIL.Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """The geometric half of `preprocess`: RGB, pad, resize, crop -> uint8 [crop, crop, 3].

    The training pipeline stops here in its workers and normalises in the consuming process
    (`normalize`): uint8 is a quarter of the bytes to move between processes and to devices.
    """
    image = to_rgb(image)
    if cfg.pad_to_square:
        image = expand_to_square(image, cfg.background_color)
    new_h, new_w = resize_output_size(image.height, image.width, cfg.size)
    image = image.resize((new_w, new_h), resample=cfg.resample)  # PIL takes (width, height)
    return center_crop(np.asarray(image), cfg.crop_size)  # [crop, crop, 3] uint8


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
    """A list of PIL images -> [N, crop, crop, 3] float32."""
    if len(images) == 0:
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.float32)
    return np.stack([preprocess(im, cfg) for im in images])
