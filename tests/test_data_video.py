"""Video decoding, frame sampling and frame preprocessing (data/video.py) against transformers and PyAV.

The videos are made here with PyAV: 40 frames of 64x80 with a moving coloured square, as MPEG-4 in MP4 (the
container's header counts the frames) and as lossless FFV1 in Matroska (the header says 0: the frames must be
counted, and decode to exactly the frames written).
"""

from __future__ import annotations

import json
import warnings

import av
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, get_uniform_frame_indices

from llava_jax.config import VideoProcessorConfig
from llava_jax.data import video as video_lib
from llava_jax.data.video import VideoError
from tests._seeds import fresh_seed
from tests._torchvision import torchvision_or_skip

FRAMES, HEIGHT, WIDTH, RATE = 40, 64, 80, 10


def _frames(seed: int, count: int = FRAMES) -> np.ndarray:
    """uint8 [count, H, W, 3]: a textured background and a square of a new colour at a new place each frame."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    out = np.repeat(background[None], count, axis=0)
    for i in range(count):
        top, left = rng.integers(0, HEIGHT - 16), rng.integers(0, WIDTH - 16)
        out[i, top:top + 16, left:left + 16] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def _write(path, frames: np.ndarray, codec: str, container: str, pix_fmt: str) -> str:
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """{"mp4": MPEG-4 (lossy, header count right), "mkv": FFV1 RGB (lossless, header count 0)}, and the source."""
    tmp = tmp_path_factory.mktemp("videos")
    source = _frames(fresh_seed())
    return {"mp4": _write(tmp / "v.mp4", source, "mpeg4", "mp4", "yuv420p"),
            "mkv": _write(tmp / "v.mkv", source, "ffv1", "matroska", "bgr0"), "source": source}


def _all_frames(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_the_fixture_headers_are_what_the_tests_need(videos):
    headers = {}
    for kind in ("mp4", "mkv"):
        with av.open(videos[kind]) as container:
            headers[kind] = container.streams.video[0].frames
    assert headers == {"mp4": FRAMES, "mkv": 0}


def _hf_indices(total: int, n: int) -> np.ndarray:
    return default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=float(RATE)), num_frames=n)


def test_indices_equal_transformers_default_sampler():
    for total in range(1, 130):
        for n in range(1, total + 1):
            np.testing.assert_array_equal(video_lib.sample_indices(total, n), _hf_indices(total, n),
                                          err_msg=f"{n} of {total}")


def test_indices_equal_deprecated_uniform_sampler_where_its_float_step_is_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for n in range(1, FRAMES + 1):  # 40 frames: every float step of total / n lands where integers do
            np.testing.assert_array_equal(video_lib.sample_indices(FRAMES, n), get_uniform_frame_indices(FRAMES, n))
        # Elsewhere its float arange can take one frame too many (7 of 300 gives 8): the integer sampler is the one
        # transformers' processors call.
        assert len(get_uniform_frame_indices(300, 7)) == 8 and len(video_lib.sample_indices(300, 7)) == 7


def test_original_sampling_is_the_demos():
    # One frame a second while that is at most n frames; else linspace over the whole video, last frame included.
    np.testing.assert_array_equal(video_lib.sample_indices(40, 8, "original", fps=10), [0, 10, 20, 30])
    np.testing.assert_array_equal(video_lib.sample_indices(400, 8, "original", fps=10),
                                  np.linspace(0, 399, 8, dtype=int))
    assert video_lib.sample_indices(400, 8, "original", fps=10)[-1] == 399
    with pytest.raises(ValueError, match="needs the video's fps"):
        video_lib.sample_indices(40, 8, "original")


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
@pytest.mark.parametrize("n", [1, 7, 8, 32, FRAMES])
def test_decoded_frames_equal_decoding_all_and_indexing(videos, kind: str, n: int):
    frames, info = video_lib.decode_frames(videos[kind], n)
    expected = _hf_indices(FRAMES, n)
    np.testing.assert_array_equal(info.indices, expected)
    assert (info.total_frames, info.height, info.width, info.fps) == (FRAMES, HEIGHT, WIDTH, RATE)
    assert frames.dtype == np.uint8 and frames.shape == (n, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(frames, _all_frames(videos[kind])[expected])
    if kind == "mkv":  # lossless: the frames written come back
        np.testing.assert_array_equal(frames, videos["source"][expected])


def test_original_sampling_decodes_its_indices(videos):
    frames, info = video_lib.decode_frames(videos["mkv"], 3, sampling="original")
    np.testing.assert_array_equal(info.indices, [0, 19, 39])
    np.testing.assert_array_equal(frames, videos["source"][[0, 19, 39]])


def test_decoding_keeps_only_the_sampled_frames(videos, monkeypatch):
    """Memory is bounded by the frames asked for: no pass holds more than the sampled frames' arrays."""
    converted = []
    real = video_lib._rgb

    def counting(frame):
        converted.append(frame)
        return real(frame)

    monkeypatch.setattr(video_lib, "_rgb", counting)
    video_lib.decode_frames(videos["mp4"], 4)
    assert len(converted) == 4  # the header was right: one pass, four frames converted
    converted.clear()
    video_lib.decode_frames(videos["mkv"], 4)
    assert len(converted) == 4  # no header count: a counting pass converts nothing, the second pass four


def _nonvideo(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video at all\n" * 50)
    return str(path)


def _audio_only(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _empty_video(tmp_path):
    path = tmp_path / "empty.avi"  # an AVI keeps its header and video stream with no frame in it
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        out.start_encoding()
    return str(path)


@pytest.mark.parametrize("make, num_frames, message", [
    (lambda tmp: str(tmp / "missing.mp4"), 8, "no such file"),
    (_nonvideo, 8, "InvalidDataError"),
    (_audio_only, 8, "has no video stream"),
    (_empty_video, 8, "has no frames"),
    (None, 41, "41 frames asked of a video of 40 frames"),
    (None, 0, "num_frames must be positive and sampling one of"),
])
def test_bad_input_is_one_line_naming_the_file(videos, tmp_path, make, num_frames: int, message: str):
    path = make(tmp_path) if make else videos["mkv"]
    with pytest.raises(VideoError, match=message) as e:
        video_lib.decode_frames(path, num_frames)
    text = str(e.value)
    assert "\n" not in text and repr(path) in text, text
    assert isinstance(e.value, ValueError)  # the CLIs' bad-input exit (2) catches it as the image errors


# ---------------------------------------------------------------------------------------------------------------
# Frame preprocessing

NEXT_VIDEO = VideoProcessorConfig(size=40, crop_size=32)  # LlavaNextVideoVideoProcessor's steps, small
ONEVISION = VideoProcessorConfig.onevision(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _random_frames(rng: np.random.Generator, low: int = 12, high: int = 100) -> np.ndarray:
    """uint8 [F, H, W, 3] of a random size: smaller and larger than the tests' 32-48 px frames, odd and even."""
    count, height, width = rng.integers(1, 4), rng.integers(low, high), rng.integers(low, high)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, resample", [("bicubic", 3), ("bilinear", 2)])
def test_resize_equals_torch_interpolate(mode: str, resample: int):
    """torchvision's uint8 resize on CPU is this call; ours is numpy, equal bit for bit on any shape."""
    rng = np.random.default_rng(fresh_seed())
    shapes = [tuple(rng.integers(1, 120, 4)) for _ in range(40)] + [(7, 7, 21, 21), (64, 48, 64, 48), (300, 2, 1, 5)]
    for in_h, in_w, out_h, out_w in shapes:
        frames = rng.integers(0, 256, (int(rng.integers(1, 3)), in_h, in_w, 3), dtype=np.uint8)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # as transformers hands frames to torchvision
        ref = torch.nn.functional.interpolate(x, size=[int(out_h), int(out_w)], mode=mode, align_corners=False,
                                              antialias=True)
        np.testing.assert_array_equal(video_lib.resize_torchvision(frames, out_h, out_w, resample),
                                      ref.permute(0, 2, 3, 1).numpy(), err_msg=f"{in_h}x{in_w} -> {out_h}x{out_w}")


def test_resize_in_blocks_equals_torch_interpolate(monkeypatch):
    """A pass works through its columns in blocks of _CHUNK accumulator values: blocks that do not divide them."""
    monkeypatch.setattr(video_lib, "_CHUNK", 1000)
    rng = np.random.default_rng(fresh_seed())
    frames = rng.integers(0, 256, (3, 61, 75, 3), dtype=np.uint8)
    for out_h, out_w in ((40, 33), (90, 101)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
                                              size=[out_h, out_w], mode="bicubic", align_corners=False, antialias=True)
        np.testing.assert_array_equal(video_lib.resize_torchvision(frames, out_h, out_w),
                                      ref.permute(0, 2, 3, 1).numpy())


def _hf_video_processor(cfg: VideoProcessorConfig, tmp_path):
    """transformers' own video processor class for `cfg` (torchvision), set up with `cfg`'s saved json."""
    torchvision_or_skip()
    from transformers import LlavaNextVideoVideoProcessor, LlavaOnevisionVideoProcessor

    cls = {c.__name__: c for c in (LlavaNextVideoVideoProcessor, LlavaOnevisionVideoProcessor)}[cfg.processor_type]
    cfg.save(str(tmp_path))
    proc = cls.from_pretrained(str(tmp_path))
    assert proc.backend == "torchvision"
    return proc


def _hf_frames(proc, frames: np.ndarray) -> np.ndarray:
    out = proc(videos=[frames], do_sample_frames=False, return_tensors="np")["pixel_values_videos"]
    return np.asarray(out)[0].transpose(0, 2, 3, 1)  # [F, 3, s, s] -> [F, s, s, 3]


@pytest.mark.parametrize("cfg", [NEXT_VIDEO, ONEVISION], ids=["next_video", "onevision"])
def test_frames_equal_transformers_video_processors(videos, tmp_path, cfg: VideoProcessorConfig):
    """Our frames are `pixel_values_videos` of LlavaNextVideoVideoProcessor / LlavaOnevisionVideoProcessor, exactly,
    for the decoded frames and for frames of random sizes, with the settings read back from the processor's json."""
    proc = _hf_video_processor(cfg, tmp_path)
    cfg = VideoProcessorConfig.from_pretrained(str(tmp_path))  # as the engine and the pipeline read a checkpoint
    rng = np.random.default_rng(fresh_seed())
    decoded, _ = video_lib.decode_frames(videos["mp4"], 8)
    for frames in [decoded] + [_random_frames(rng) for _ in range(6)]:
        ours = video_lib.preprocess_frames(frames, cfg)
        assert ours.dtype == np.float32 and ours.shape == (len(frames), cfg.frame_size, cfg.frame_size, 3)
        np.testing.assert_array_equal(ours, _hf_frames(proc, frames), err_msg=str(frames.shape))


def test_crop_larger_than_the_resize_pads_as_torchvision(tmp_path):
    """A crop larger than the resized frame zero-pads (crop - h) // 2 rows before it (the PIL path: the odd one)."""
    cfg = VideoProcessorConfig(size=23, crop_size=32)
    proc = _hf_video_processor(cfg, tmp_path)
    frames = _random_frames(np.random.default_rng(fresh_seed()), low=20, high=40)
    np.testing.assert_array_equal(video_lib.preprocess_frames(frames, cfg), _hf_frames(proc, frames))


def test_normalization_is_transformers_fused_float32():
    """TorchvisionBackend.rescale_and_normalize: mean and std times 1 / rescale_factor in float32, (x - m) / s."""
    for cfg in (NEXT_VIDEO, ONEVISION):
        mean = torch.tensor(cfg.mean) * (1.0 / cfg.rescale_factor)
        std = torch.tensor(cfg.std) * (1.0 / cfg.rescale_factor)
        levels = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 3)
        np.testing.assert_array_equal(video_lib.normalization_table(cfg), ((levels.float() - mean) / std).numpy())
        # The image path's float64 rescale lands an ulp away on some levels: the tables are not interchangeable.
        assert (video_lib.normalization_table(cfg, "pil") != video_lib.normalization_table(cfg)).any()


def _pil_reference(cfg: VideoProcessorConfig, frames: np.ndarray) -> np.ndarray:
    """transformers' PIL image processors set as the video processor is, on each frame -> [F, s, s, 3]."""
    common = dict(image_mean=list(cfg.mean), image_std=list(cfg.std), resample=cfg.resample)
    if cfg.resize_to_square:
        proc = SiglipImageProcessorPil(size={"height": cfg.size, "width": cfg.size}, **common)
    else:
        proc = CLIPImageProcessorPil(size={"shortest_edge": cfg.size},
                                     crop_size={"height": cfg.crop_size, "width": cfg.crop_size}, **common)
    out = proc(images=list(frames), return_tensors="np")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("cfg", [NEXT_VIDEO, ONEVISION], ids=["next_video", "onevision"])
def test_pil_backend_equals_transformers_pil_processors(videos, cfg: VideoProcessorConfig):
    """backend="pil" is the original LLaVA-NeXT route: its image processor (PIL) on each frame, bit for bit."""
    rng = np.random.default_rng(fresh_seed())
    decoded, _ = video_lib.decode_frames(videos["mp4"], 8)
    for frames in (decoded, _random_frames(rng)):
        np.testing.assert_array_equal(video_lib.preprocess_frames(frames, cfg, "pil"), _pil_reference(cfg, frames))


@pytest.mark.parametrize("cfg", [NEXT_VIDEO, ONEVISION], ids=["next_video", "onevision"])
def test_pil_and_torchvision_backends_differ_by_rounding(videos, cfg: VideoProcessorConfig):
    """Pillow rounds its weights at 22 bits, torch at about 14: where both sides shrink (here), a level or two
    apart on a few pixels. (Where one side grows and the other shrinks the passes run in other orders: more.)"""
    frames, _ = video_lib.decode_frames(videos["mp4"], 8)
    pil = video_lib.preprocess_frames_uint8(frames, cfg, "pil").astype(int)
    tv = video_lib.preprocess_frames_uint8(frames, cfg).astype(int)
    assert 1 <= np.abs(pil - tv).max() <= 2 and (pil != tv).mean() < 0.05, (np.abs(pil - tv).max(), (pil != tv).mean())


def test_preprocessing_refuses_non_frames_and_unknown_backends():
    with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
        video_lib.preprocess_frames(np.zeros((4, 8, 8, 3), np.float32), NEXT_VIDEO)
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="backend 'opencv' is not one of"):
        video_lib.preprocess_frames(frames, NEXT_VIDEO, "opencv")
    nearest = VideoProcessorConfig(size=40, crop_size=32, resample=0)
    with pytest.raises(ValueError, match="resample 0: the torchvision backend reproduces bicubic"):
        video_lib.preprocess_frames(frames, nearest)
    assert video_lib.preprocess_frames(frames, nearest, "pil").shape == (1, 32, 32, 3)  # PIL has them all


@pytest.mark.parametrize("backend", video_lib.BACKENDS)
def test_load_video_is_decode_then_preprocess(videos, backend: str):
    frames, _ = video_lib.decode_frames(videos["mkv"], 5)
    np.testing.assert_array_equal(video_lib.load_video(videos["mkv"], ONEVISION, num_frames=5, backend=backend),
                                  video_lib.preprocess_frames(frames, ONEVISION, backend))


# ---------------------------------------------------------------------------------------------------------------
# Settings from checkpoint directories


def test_settings_match_the_processor_classes_defaults():
    # From their modules: without torchvision the top-level names are placeholders that refuse attribute access.
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    for ours, cls in ((VideoProcessorConfig(), LlavaNextVideoVideoProcessor),
                      (VideoProcessorConfig.onevision(), LlavaOnevisionVideoProcessor)):
        assert ours.processor_type == cls.__name__
        assert ours.resample == int(cls.resample) and ours.rescale_factor == cls.rescale_factor
        assert list(ours.mean) == list(cls.image_mean) and list(ours.std) == list(cls.image_std)
        size = {"height": ours.size, "width": ours.size} if ours.resize_to_square else {"shortest_edge": ours.size}
        assert size == cls.size and bool(ours.crop_size) == bool(cls.do_center_crop)
        assert (cls.crop_size or {}).get("height", 0) == ours.crop_size


@pytest.mark.parametrize("cfg", [NEXT_VIDEO, ONEVISION], ids=["next_video", "onevision"])
def test_save_and_read_back(tmp_path, cfg: VideoProcessorConfig):
    cfg.save(str(tmp_path))
    assert VideoProcessorConfig.from_pretrained(str(tmp_path)) == cfg
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == cfg.processor_type


def test_from_pretrained_falls_back_to_the_image_processor_and_model_type(tmp_path):
    # A llava-hf OneVision directory saved before video processors had a file: the image processor's settings,
    # the class from config.json's model_type (AutoVideoProcessor's choice).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 384, "width": 384},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_pad": True}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    cfg = VideoProcessorConfig.from_pretrained(str(tmp_path))
    assert cfg == VideoProcessorConfig.onevision(mean=(0.5,) * 3, std=(0.5,) * 3)
    # processor_config.json's nested video_processor comes first, as in transformers 5.
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {
        "video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336}}}))
    assert VideoProcessorConfig.from_pretrained(str(tmp_path)) == VideoProcessorConfig(size=336, crop_size=336)


@pytest.mark.parametrize("fields, message", [
    ({"video_processor_type": "Qwen2VLVideoProcessor"}, "video_processor_type 'Qwen2VLVideoProcessor'"),
    ({"video_processor_type": "LlavaNextVideoVideoProcessor", "do_normalize": False}, "do_normalize: false"),
    ({"video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"height": 10, "width": 12}},
     "non-square size"),
])
def test_bad_settings_one_line_naming_the_file(tmp_path, fields, message):
    path = tmp_path / "video_preprocessor_config.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=message) as e:
        VideoProcessorConfig.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path) + ": "), str(e.value)
    with pytest.raises(FileNotFoundError, match="No video processor settings"):
        VideoProcessorConfig.from_pretrained(str(tmp_path / "nowhere"))


def test_remote_paths_are_read_through_file_objects_and_closed(videos, monkeypatch):
    """A gs:// video goes to PyAV as the file object paths.open gives (here a local file standing in for it)."""
    opened = []

    def fake_open(path, mode="r", encoding=None):
        f = open(path.removeprefix("gs:/"), mode)  # gs://tmp/... -> /tmp/...
        opened.append(f)
        return f

    monkeypatch.setattr(video_lib.paths, "open", fake_open)
    frames, info = video_lib.decode_frames("gs:/" + videos["mkv"], 5)
    np.testing.assert_array_equal(frames, videos["source"][info.indices])
    assert opened and all(f.closed for f in opened)
