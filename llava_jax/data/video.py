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
`pixel_values_videos` [B, F, H, W, 3] in the model's input (transformers: [B, F, 3, H, W]). The resize is PIL's,
as in the rest of this project (data/image.py) and as the original LLaVA-NeXT code ran it (its demo calls the
image processor on the frames); transformers 5's video processors run the same steps through torchvision,
whose antialiased uint8 bicubic rounds differently (a level or a few on some pixels). The comparison is in
tests/test_data_video.py: equal to transformers' PIL image processors with the video processors' settings,
and within those levels of the torchvision path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from llava_jax import paths
from llava_jax.config import VideoProcessorConfig
from llava_jax.data.image import center_crop, normalization_table, normalize, resize_output_size

SAMPLINGS = ("transformers", "original")


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


def preprocess_frames_uint8(frames: np.ndarray, cfg: VideoProcessorConfig) -> np.ndarray:
    """The geometric half of `preprocess_frames`: uint8 [F, H, W, 3] -> uint8 [F, s, s, 3] (resize, crop)."""
    frames = _check_frames(frames)
    return np.stack([_frame_geometry(frame, cfg) for frame in frames])


def preprocess_frames(frames: np.ndarray, cfg: VideoProcessorConfig) -> np.ndarray:
    """Decoded frames uint8 [F, H, W, 3] -> float32 [F, s, s, 3] (s = cfg.frame_size), as the video processor.

    Normalised by the same table as images (data/image.py `normalization_table`): uint8 -> float64 * 1/255 ->
    float32, then (x - mean) / std in float32.
    """
    return normalize(preprocess_frames_uint8(frames, cfg), None, table=normalization_table(cfg))


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _frame_geometry(frame: np.ndarray, cfg: VideoProcessorConfig) -> np.ndarray:
    height, width = frame.shape[:2]
    if cfg.resize_to_square:
        new_h = new_w = cfg.size
    else:
        new_h, new_w = resize_output_size(height, width, cfg.size)
    if (new_h, new_w) != (height, width):
        frame = np.asarray(PIL.Image.fromarray(frame).resize((new_w, new_h), resample=cfg.resample))
    return center_crop(frame, cfg.crop_size) if cfg.crop_size else frame


def load_video(path: str | os.PathLike, cfg: VideoProcessorConfig, num_frames: int | None = None,
               sampling: str = "transformers") -> np.ndarray:
    """A video file -> float32 [F, s, s, 3], ready for `pixel_values_videos` (F = num_frames or cfg.num_frames)."""
    frames, _ = decode_frames(path, cfg.num_frames if num_frames is None else num_frames, sampling)
    return preprocess_frames(frames, cfg)
