"""Video input: frames decoded with PyAV, sampled uniformly, and preprocessed as transformers' LLaVA video processors.

Decoding (`decode_frames`) reads the file with PyAV (`av` on PyPI: FFmpeg comes inside the wheel, no system
ffmpeg) and converts each kept frame with `frame.to_ndarray(format="rgb24")`, as transformers' `read_video_pyav`
does. The frame count is the number of frames the decoder yields, not the container's header (which may be 0
or wrong): decoding keeps only the sampled frames, so memory is bounded by `num_frames` frames whatever the
video's length. When the header's count is right (the usual case) the file is decoded once; otherwise a second
pass picks the frames for the counted total.

Sampling (`sample_indices`):
  "transformers" (the default): `np.arange(n) * total // n`, transformers 5's `default_sample_indices_fn`, which
    the LLaVA video processors use with `do_sample_frames=True`; its deprecated `get_uniform_frame_indices`
    (`np.arange(0, total, total / n).astype(int)`) gives the same indices except where the float step rounds
    (tests/test_data_video.py counts the cases). A video with fewer frames than asked is an error, as there.
  "original": LLaVA-NeXT's video demo (playground/demo/video_demo.py `load_video`): one frame a second
    (`range(0, total, round(fps))`), and when that is more than n frames (or always, with its `force_sample`),
    `np.linspace(0, total - 1, n, dtype=int)`, which includes the last frame where transformers' stops up to
    total / n frames short of it. A short video gives fewer than n frames there, never an error.

Preprocessing (`preprocess_frames`) reproduces, frame by frame, the steps of `LlavaNextVideoVideoProcessor`
(shortest side to 224, centre crop 224; llava-hf's NeXT-Video checkpoints set 336) and
`LlavaOnevisionVideoProcessor` (resized to 384 x 384, aspect not kept, no crop): RGB -> resize (bicubic) ->
[centre crop] -> x / 255 -> (x - mean) / std, channels last: [F, H, W, 3] float32, the layout of
`pixel_values_videos` [B, F, H, W, 3] in the model's input (transformers: [B, F, 3, H, W]). Two backends, named as
transformers names its processors' (tests/test_data_video.py checks both, exactly):
  "torchvision" (the default): what transformers 5's video processors compute, and so what llava-hf checkpoints'
    video processors give: torchvision's resize of the uint8 frames (torch's antialiased fixed-point kernel,
    written here in numpy: `resize_torchvision`), its centre crop, and rescale fused into the normalisation in
    float32 (`normalization_table`). No torch at run time.
  "pil": PIL's resize and the image path's arithmetic (data/image.py), i.e. transformers' PIL image processors
    with the video processors' settings, which is what the original LLaVA-NeXT code ran (its demo calls the
    image processor on the frames). PIL rounds its resize weights at 22 bits where torch rounds them to int16:
    where both sides shrink or both grow (always, for NeXT-Video's aspect-keeping resize) the two backends are a
    level apart on a few pixels in a thousand. Where one side grows and the other shrinks (OneVision's square
    resize of a tall frame) Pillow resizes the shrinking side first and torch the width first, so the clamping
    of bicubic overshoot between the passes differs too: up to 20 levels on frames of noise. Their normalised
    values are an ulp apart on about half the levels.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from llava_jax import paths
from llava_jax.config import BICUBIC, VideoProcessorConfig
from llava_jax.data import image as image_lib
from llava_jax.data.image import center_crop, normalize, resize_output_size

SAMPLINGS = ("transformers", "original")
BACKENDS = ("torchvision", "pil")  # frame preprocessing: transformers 5's video processors, or its PIL route
BILINEAR = int(PIL.Image.Resampling.BILINEAR)


class VideoError(ValueError):
    """A video file that cannot be read, has no video stream or too few frames; the message names the file."""


class VideoInfo(NamedTuple):
    """What `decode_frames` found: the decoded frame count, the stream's rate and size, the frames it kept."""

    total_frames: int  # frames the decoder yielded (not the container header's count)
    fps: float | None  # the stream's average rate; None when the container does not say
    height: int
    width: int
    indices: np.ndarray  # int64 [num_frames]: the kept frames' positions in decoding order


def sample_indices(total_frames: int, num_frames: int, sampling: str = "transformers",
                   fps: float | None = None) -> np.ndarray:
    """int64 indices of the frames to keep from a video of `total_frames` frames (see the module docstring).

    "transformers": `np.arange(num_frames) * total_frames // num_frames`; raises ValueError when the video has
    fewer frames than asked, as transformers' `default_sample_indices_fn`. "original": LLaVA-NeXT's demo (one
    frame a second, or `linspace(0, total - 1, num_frames)` when that is more); needs `fps`.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"frame sampling {sampling!r} is not one of {SAMPLINGS}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total_frames <= 0:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    if sampling == "transformers":
        if num_frames > total_frames:
            raise ValueError(f"{num_frames} frames asked of a video of {total_frames} frames")
        return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames
    if not fps or fps <= 0:
        raise ValueError(f"sampling 'original' takes one frame a second and needs the video's fps, got {fps}")
    every_second = np.arange(0, total_frames, max(1, round(fps)), dtype=np.int64)
    if len(every_second) > num_frames:
        return np.linspace(0, total_frames - 1, num_frames, dtype=int).astype(np.int64)
    return every_second


def decode_frames(path: str | os.PathLike, num_frames: int = 32, sampling: str = "transformers"
                  ) -> tuple[np.ndarray, VideoInfo]:
    """Decodes `num_frames` frames of a video file sampled uniformly: (uint8 [F, H, W, 3] RGB, VideoInfo).

    F is `num_frames` ("original" sampling may give fewer for a short video). Raises VideoError (a
    ValueError) in one line naming the file when it is missing, not a video, has no video stream, has no
    frames or fewer than asked.
    """
    where = os.fspath(path)
    try:
        frames, info = _decode(path, num_frames, sampling)
    except VideoError:
        raise
    except (OSError, EOFError, _av_error()) as e:  # before ValueError: PyAV's errors are ValueErrors too
        raise VideoError(f"Cannot read video {where!r}: {type(e).__name__}: {_one_line(e)}") from e
    except ValueError as e:  # the sampling's own complaints (too few frames, bad arguments)
        raise VideoError(f"Cannot sample video {where!r}: {e}") from None
    return frames, info


def _av_error() -> type[Exception]:
    import av  # a module import would make `av` a dependency of every importer of the data layer

    return av.error.FFmpegError


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[Any]:
    """The file as an open PyAV container with a video stream; closed (and a remote file with it) on exit."""
    import av

    where = os.fspath(path)
    with contextlib.ExitStack() as stack:
        if paths.is_remote(path):
            source = stack.enter_context(paths.open(path, "rb"))  # PyAV reads any seekable file object
        elif os.path.isfile(where):
            source = where
        else:
            raise VideoError(f"Cannot read video {where!r}: no such file")
        container = stack.enter_context(av.open(source, mode="r"))
        if not container.streams.video:
            raise VideoError(f"Cannot read video {where!r}: the file has no video stream")
        yield container


def _decode(path: str | os.PathLike, num_frames: int, sampling: str) -> tuple[np.ndarray, VideoInfo]:
    where = os.fspath(path)
    if num_frames <= 0 or sampling not in SAMPLINGS:  # before any decoding
        raise ValueError(f"num_frames must be positive and sampling one of {SAMPLINGS}; got {num_frames}, "
                         f"{sampling!r}")
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        header = int(stream.frames or 0)
    indices = None
    if header > 0:
        # Trust the header for the first pass; the pass counts the frames and tells whether it was right.
        indices = sample_indices(header, num_frames, sampling, fps) if header >= num_frames or \
            sampling == "original" else None
    kept, total, (height, width) = _pass(path, indices)
    if total == 0:
        raise VideoError(f"Cannot read video {where!r}: the video stream has no frames")
    if indices is None or total != header:
        indices = sample_indices(total, num_frames, sampling, fps)
        kept, total, _ = _pass(path, indices)
    frames = np.stack([kept[int(i)] for i in indices])
    return frames, VideoInfo(total, fps, height, width, indices)


def _pass(path: str | os.PathLike, indices: np.ndarray | None) -> tuple[dict[int, np.ndarray], int, tuple[int, int]]:
    """One decode of the whole stream: the frames at `indices` (RGB uint8), the frame count, the frame size."""
    wanted = set() if indices is None else {int(i) for i in indices}
    kept: dict[int, np.ndarray] = {}
    total, size = 0, (0, 0)
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: same frames, faster
        for frame in container.decode(stream):
            if total in wanted:
                kept[total] = _rgb(frame)
            size = (frame.height, frame.width)
            total += 1
    return kept, total, size


def _rgb(frame) -> np.ndarray:
    """uint8 [H, W, 3]: a decoded frame converted as transformers' `read_video_pyav` converts it."""
    return frame.to_ndarray(format="rgb24")


def preprocess_frames_uint8(frames: np.ndarray, cfg: VideoProcessorConfig, backend: str = "torchvision"
                            ) -> np.ndarray:
    """The geometric half of `preprocess_frames`: uint8 [F, H, W, 3] -> uint8 [F, s, s, 3] (resize, crop)."""
    frames = _check_frames(frames)
    _check_backend(backend)
    height, width = frames.shape[1:3]
    size = (cfg.size, cfg.size) if cfg.resize_to_square else resize_output_size(height, width, cfg.size)
    if backend == "pil":
        return np.stack([_frame_geometry_pil(frame, size, cfg) for frame in frames])
    frames = resize_torchvision(frames, *size, resample=cfg.resample)
    return center_crop_torchvision(frames, cfg.crop_size) if cfg.crop_size else frames


def preprocess_frames(frames: np.ndarray, cfg: VideoProcessorConfig, backend: str = "torchvision") -> np.ndarray:
    """Decoded frames uint8 [F, H, W, 3] -> float32 [F, s, s, 3] (s = cfg.frame_size), as the video processor.

    `backend`: "torchvision", transformers 5's video processors bit for bit; "pil", transformers' PIL image
    processors with the same settings (the original LLaVA-NeXT code's route). See the module docstring.
    """
    return normalize(preprocess_frames_uint8(frames, cfg, backend), None, table=normalization_table(cfg, backend))


def normalization_table(cfg: VideoProcessorConfig, backend: str = "torchvision") -> np.ndarray:
    """float32 [256, 3]: the normalised value of every uint8 level in every channel, as `backend` computes it.

    "torchvision" fuses rescale and normalisation as transformers' TorchvisionBackend does: mean and std are
    scaled by 1 / rescale_factor in float32, then (x - mean) / std in float32 on the uint8 value. "pil" is the
    image path's table (data/image.py `normalization_table`: x * rescale_factor in float64, then float32). The two
    differ by an ulp on about half the entries.
    """
    _check_backend(backend)
    if backend == "pil":
        return image_lib.normalization_table(cfg)
    scale = np.float32(1.0 / cfg.rescale_factor)
    mean = np.asarray(cfg.mean, np.float32) * scale
    std = np.asarray(cfg.std, np.float32) * scale
    levels = np.arange(256, dtype=np.float32)[:, None]
    return (levels - mean) / std


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"frame preprocessing backend {backend!r} is not one of {BACKENDS}")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _frame_geometry_pil(frame: np.ndarray, size: tuple[int, int], cfg: VideoProcessorConfig) -> np.ndarray:
    if size != frame.shape[:2]:
        frame = np.asarray(PIL.Image.fromarray(frame).resize(size[::-1], resample=cfg.resample))
    return center_crop(frame, cfg.crop_size) if cfg.crop_size else frame


# ---------------------------------------------------------------------------------------------------------------
# torchvision's resize of uint8 frames, in numpy


def resize_torchvision(frames: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """uint8 [F, H, W, C] -> uint8 [F, height, width, C]: torchvision's antialiased resize on CPU, bit for bit.

    `resample` is PIL's number: BICUBIC (3, the LLaVA processors') or BILINEAR (2). torchvision's `resize` hands
    a uint8 tensor to `interpolate(antialias=True, align_corners=False)` as it is (bilinear: on CPUs with AVX2,
    which torch reports as its capability; others take a float round trip there), and torch's CPU kernel for
    uint8 is Pillow's algorithm in fixed point: Keys' cubic (a = -0.5) or the triangle, stretched by the
    downscale factor, weights normalised per output pixel in float64, then rounded to int16 at the most bits
    that keep the largest weight below 2^15; a pass along the width, rounded and clamped to uint8, then a pass
    along the height (a pass is skipped when its size does not change). The integer sums here are the ones
    torch's kernels compute (its AVX2 kernel and its generic one agree), so the result is equal, not close;
    Pillow differs by rounding its weights at 22 bits.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 [F, H, W, C], got {frames.dtype} {frames.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize to {height} x {width}")
    if resample not in _FILTERS:
        raise ValueError(f"resample {resample}: the torchvision backend reproduces bicubic ({BICUBIC}) and bilinear "
                         f"({BILINEAR}) only; backend 'pil' takes any of PIL's filters")
    count, in_h, in_w, channels = frames.shape
    if (in_h, in_w) == (height, width):
        return frames
    # Each pass runs along axis 0 of a [size, everything else] array, so that its taps gather whole rows.
    x = frames
    if in_w != width:
        rows = _resample_rows(x.transpose(2, 0, 1, 3).reshape(in_w, -1), width, resample)  # [width, F * H * C]
        x = rows.reshape(width, count, in_h, channels).transpose(1, 2, 0, 3)  # [F, H, width, C] view
    if in_h != height:
        rows = _resample_rows(x.transpose(1, 0, 2, 3).reshape(in_h, -1), height, resample)  # [height, F*width*C]
        x = rows.reshape(height, count, width, channels).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(x)


def _aa_taps(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased taps along one axis: (input index [out, K], int32 weight [out, K], bits).

    As aten/src/ATen/native/cpu/UpSampleKernel.cpp `_compute_index_ranges_int16_weights` (with
    `_compute_indices_min_size_weights_aa` and HelperInterpCubic's `aa_filter<double, true>` or
    HelperInterpLinear's), in float64 in its order of operations. Taps past an output pixel's window have weight
    0 (their index is clipped in range).
    """
    half_width, kernel = _FILTERS[resample]  # interp_size * 0.5: the kernel's support at scale 1
    scale = in_size / out_size
    support = half_width * scale if scale >= 1.0 else half_width
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C's float -> int64 casts truncate toward zero: astype does too.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps)
    weights = kernel(((j + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale)
    weights[j >= xsize[:, None]] = 0.0
    total = weights[:, 0].copy()
    for k in range(1, taps):  # summed left to right as the kernel does (numpy's sum is pairwise)
        total += weights[:, k]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    largest = weights.max()
    bits = 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = weights * (1 << bits)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return np.minimum(xmin[:, None] + j, in_size - 1), fixed, bits


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, a = -0.5, written as torch's cubic_convolution1 / cubic_convolution2."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    """The bilinear kernel, as torch's HelperInterpLinear::aa_filter."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {BICUBIC: (2.0, _keys_cubic), BILINEAR: (1.0, _triangle)}


# int32 accumulator elements per block (2 MB): bounds a pass's memory and keeps its taps' sums in cache
# (1.7x faster than 16 MB blocks on 1080p frames).
_CHUNK = 1 << 19


def _resample_rows(x: np.ndarray, out_size: int, resample: int) -> np.ndarray:
    """uint8 [L, N] -> uint8 [out_size, N]: one pass of torch's fixed-point filter along axis 0.

    Each output value is clamp((2^(bits-1) + sum_k w_k * x[i_k]) >> bits, 0, 255) in int32, as in torch's
    `basic_loop_aa_horizontal<uint8_t>` (the sums stay far below 2^31: |w| < 2^15, x < 2^8, a few dozen taps).
    """
    index, weights, bits = _aa_taps(x.shape[0], out_size, resample)
    n = x.shape[1]
    out = np.empty((out_size, n), np.uint8)
    block = max(1, _CHUNK // out_size)
    acc = np.empty((out_size, min(block, n)), np.int32)
    term = np.empty_like(acc)
    columns = [weights[:, k, None] for k in range(weights.shape[1])]
    for start in range(0, n, block):
        stop = min(n, start + block)
        a, t = acc[:, :stop - start], term[:, :stop - start]
        a.fill(1 << (bits - 1))
        for k, w in enumerate(columns):
            np.multiply(x[index[:, k], start:stop], w, out=t)
            a += t
        np.right_shift(a, bits, out=a)  # an arithmetic shift: floor, as C's >> on int
        np.clip(a, 0, 255, out=a)
        out[:, start:stop] = a
    return out


def center_crop_torchvision(frames: np.ndarray, crop: int) -> np.ndarray:
    """[F, H, W, C] -> [F, crop, crop, C] as transformers' TorchvisionBackend.center_crop.

    Top and left are int((H - crop) / 2); a frame smaller than the crop is first zero-padded with
    (crop - H) // 2 rows before (the PIL path, data/image.py `center_crop`, puts the odd row before instead).
    """
    count, height, width, channels = frames.shape
    if height < crop or width < crop:
        pad_h, pad_w = max(0, crop - height), max(0, crop - width)
        frames = np.pad(frames, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        height, width = frames.shape[1:3]
    top, left = int((height - crop) / 2), int((width - crop) / 2)
    return frames[:, top:top + crop, left:left + crop]


def load_video(path: str | os.PathLike, cfg: VideoProcessorConfig, num_frames: int | None = None,
               sampling: str = "transformers", backend: str = "torchvision") -> np.ndarray:
    """A video file -> float32 [F, s, s, 3], ready for `pixel_values_videos` (F = num_frames or cfg.num_frames)."""
    frames, _ = decode_frames(path, cfg.num_frames if num_frames is None else num_frames, sampling)
    return preprocess_frames(frames, cfg, backend)
