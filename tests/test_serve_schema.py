"""The server's request layer without a server: OpenAI messages to LLaVA conversations, image and video URLs,
parameters, and the Prometheus text (llava_jax/serve/openai_schema.py, metrics.py)."""

from __future__ import annotations

import base64
import io
import os

import av
import numpy as np
import PIL.Image
import pytest

from llava_jax.config import VideoProcessorConfig
from llava_jax.data.video import decode_frames, preprocess_frames
from llava_jax.serve import openai_schema as schema
from llava_jax.serve.metrics import Histogram, Metrics
from tests._seeds import fresh_seed


def _png(size=(5, 4)) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((size[1], size[0], 3), 7, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def video_bytes(frames: np.ndarray, rate: int = 4) -> bytes:
    """uint8 [F, H, W, 3] frames as an MPEG-4 video in an MP4 container (lossy, H and W even)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def empty_video_bytes() -> bytes:
    """An AVI with a video stream and no frame in it."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def random_frames(seed: int, count: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    """uint8 [count, H, W, 3]: smooth random colour fields (that a lossy codec keeps recognisable)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 3, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, size[0] // 3, axis=1), size[1] // 4, axis=2)


def _convert(messages: list[dict], *, system_prompt: bool = True, max_images: int = 4, max_videos: int = 1):
    request = schema.parse_request({"messages": messages})
    return schema.conversation(request.messages, system_prompt=system_prompt, max_images=max_images,
                               max_videos=max_videos)


def test_messages_become_llava_records_with_images_in_place_and_order():
    records, urls, videos = _convert([
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [_image("data:image/png;base64,QQ=="), {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "these?"},
                                     _image("data:image/png;base64,Qg=="), _image("data:image/png;base64,Qw==")]},
    ])
    assert records == [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat?"},  # generate's "<image>\nTEXT" for [image, text]
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "And\nthese?<image>\n<image>\n"},
    ]
    assert urls == [("messages[1].content[0].image_url", "data:image/png;base64,QQ=="),
                    ("messages[3].content[2].image_url", "data:image/png;base64,Qg=="),
                    ("messages[3].content[3].image_url", "data:image/png;base64,Qw==")]
    assert videos == []


def test_video_parts_become_video_markers_in_place():
    records, images, videos = _convert([
        {"role": "user", "content": [_video("data:video/mp4;base64,QQ=="), {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "A ball rolls."},
        {"role": "user", "content": [{"type": "text", "text": "And here"}, _image("data:image/png;base64,Qg=="),
                                     _video("data:video/webm;base64,Qw=="), _image("data:image/png;base64,RA==")]},
    ], max_videos=2)
    assert records == [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A ball rolls."},
                       {"from": "human", "value": "And here<image>\n<video>\n<image>\n"}]
    assert videos == [("messages[0].content[0].video_url", "data:video/mp4;base64,QQ=="),
                      ("messages[2].content[2].video_url", "data:video/webm;base64,Qw==")]
    assert [param for param, _ in images] == ["messages[2].content[1].image_url", "messages[2].content[3].image_url"]


@pytest.mark.parametrize("messages, kw, param", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], {"system_prompt": False},
     "messages[0].role"),  # the plain template has no system prompt
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}], {},
     "messages[1].role"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], {}, "messages[0].role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], {}, "messages"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [_image(_png())]},
      {"role": "user", "content": "q"}], {}, "messages[1].content[0]"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"},
      {"role": "user", "content": "q"}], {}, "messages[1].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "<image> here"}]}], {}, "messages[0].content[0]"),
    ([{"role": "user", "content": [_image(_png()), _image(_png())]}], {"max_images": 1}, "messages"),
    ([{"role": "user", "content": [_video("data:video/mp4;base64,QQ=="), _video("data:video/mp4;base64,QQ==")]}],
     {"max_videos": 1}, "messages"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [_video("data:video/mp4;base64,QQ==")]},
      {"role": "user", "content": "q"}], {}, "messages[1].content[0]"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "see <video>"},
      {"role": "user", "content": "q"}], {}, "messages[1].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a <video> here"}]}], {}, "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": "data:video/mp4;base64,QQ=="}]}], {},
     "messages[0].content[0].video_url"),  # a bare string where vLLM's schema has {"url": ...}
])
def test_conversations_that_cannot_be_rendered_are_400s_naming_the_field(messages, kw, param):
    with pytest.raises(schema.ApiError) as e:
        _convert(messages, **kw)
    assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_data_urls_decode_and_everything_else_is_refused():
    image = schema.decode_image(_png((5, 4)), "p")
    assert image.mode == "RGB" and image.size == (5, 4)
    rgba = io.BytesIO()
    PIL.Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(rgba, format="PNG")
    url = "data:image/png;name=x.png;base64," + base64.b64encode(rgba.getvalue()).decode()
    assert schema.decode_image(url, "p").getpixel((0, 0)) == (255, 255, 255)  # alpha over white, as training
    not_an_image = "data:image/png;base64," + base64.b64encode(b"GIF8").decode()
    for url, code in [("https://example.com/a.png", "image_url_not_supported"),
                      ("HTTP://x/a.png", "image_url_not_supported"), ("file:///etc/passwd", None),
                      ("data:image/png,abc", None), ("data:image/png;base64,@@", None), (not_an_image, None)]:
        with pytest.raises(schema.ApiError) as e:
            schema.decode_image(url, "messages[0].content[0].image_url")
        assert (e.value.status, e.value.param, e.value.code) == (400, "messages[0].content[0].image_url", code), url


ONEVISION_FRAMES = VideoProcessorConfig.onevision(size=28)


def test_video_data_urls_decode_as_decode_frames_then_preprocess(tmp_path, monkeypatch):
    """The served frames equal `decode_frames` + `preprocess_frames` on the same file: `num_frames` sampled, or
    all of a shorter video; the temporary file is gone afterwards."""
    monkeypatch.setattr(schema.tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    data = video_bytes(random_frames(fresh_seed(), 7))
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    for asked, kept in ((3, 3), (7, 7), (20, 7)):
        got = schema.decode_video(data_url(data), "p", ONEVISION_FRAMES, asked)
        frames, info = decode_frames(path, kept)
        assert got.shape == (kept, 28, 28, 3) and info.total_frames == 7
        np.testing.assert_array_equal(got, preprocess_frames(frames, ONEVISION_FRAMES))
    assert os.listdir(tmp_path / "tmp") == []
    # A container's own MIME types, and none, are fine; the bytes decide.
    for mime in ("video/x-matroska", "application/octet-stream"):
        assert schema.decode_video(data_url(data, mime), "p", ONEVISION_FRAMES, 2).shape[0] == 2
    assert schema.decode_video("data:;base64," + data_url(data).split(",")[1], "p", ONEVISION_FRAMES, 2).shape[0] == 2


def test_bad_videos_are_400s_naming_the_part(tmp_path, monkeypatch):
    monkeypatch.setattr(schema.tempfile, "tempdir", str(tmp_path))
    good = data_url(video_bytes(random_frames(fresh_seed(), 3)))
    param = "messages[0].content[1].video_url"
    cases = [
        ("https://example.com/v.mp4", ONEVISION_FRAMES, "video_url_not_supported", "does not fetch"),
        ("data:video/mp4;base64,@@", ONEVISION_FRAMES, None, "invalid base64"),
        ("data:video/mp4,abc", ONEVISION_FRAMES, None, "expected a base64 data URL"),
        (data_url(b"certainly not a video" * 40), ONEVISION_FRAMES, None, "not a readable video"),
        (data_url(empty_video_bytes(), "video/avi"), ONEVISION_FRAMES, None, "has no frames"),
        (_png(), ONEVISION_FRAMES, None, "expected a video data URL"),
        (good, None, None, "this model takes no video"),
    ]
    for url, cfg, code, message in cases:
        with pytest.raises(schema.ApiError) as e:
            schema.decode_video(url, param, cfg, 4)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code), (url[:40], e.value.message)
        assert message in e.value.message and e.value.message.startswith(param), e.value.message
        assert str(tmp_path) not in e.value.message  # the temporary file's name is not the client's business
    monkeypatch.setattr(schema, "MAX_FRAME_PIXELS", 32 * 24 - 1)
    with pytest.raises(schema.ApiError, match="the video's frames have 768 pixels"):
        schema.decode_video(good, param, ONEVISION_FRAMES, 2)
    assert os.listdir(tmp_path) == []


def test_parameters_defaults_and_ranges():
    ok = [{"role": "user", "content": "q"}]
    r = schema.parse_request({"messages": ok})
    # OpenAI's defaults (not the LLaVA demo's 0.2 / 0.7); no token limit: the context's room.
    assert (r.temperature, r.top_p, r.top_k, r.token_limit, r.stop_strings, r.n, r.stream) == \
        (1.0, 1.0, 0, None, (), 1, False)
    r = schema.parse_request({"messages": ok, "max_tokens": 5, "max_completion_tokens": 7, "stop": "x",
                              "user": "ignored", "frequency_penalty": 0})
    assert (r.token_limit, r.stop_strings) == (7, ("x",))
    assert schema.parse_request({"messages": ok, "stop": ["a", "", "b"]}).stop_strings == ("a", "b")
    for field, value in [("temperature", 2.01), ("top_p", 1.5), ("top_k", -1), ("max_completion_tokens", 0),
                         ("seed", 2**63), ("n", 0), ("stream_options", {"include_usage": "maybe"})]:
        with pytest.raises(schema.ApiError) as e:
            schema.parse_request({"messages": ok, field: value})
        assert e.value.status == 400 and e.value.param.split(".")[0] == field, (field, e.value.message)
        assert e.value.message.startswith(field), e.value.message
    with pytest.raises(schema.ApiError) as e:
        schema.parse_request(["not", "an", "object"])
    assert e.value.param is None


def test_prometheus_text():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("t") == ['t_bucket{le="0.1"} 2', 't_bucket{le="1.0"} 3', 't_bucket{le="+Inf"} 4',
                            "t_sum 3.65", "t_count 4"]
    m = Metrics()
    m.count_request("/health", 200)
    m.count_request("/health", 200)
    text = m.render({"queued": 3, "busy": 2, "max_batch": 8, "compiles": 5})
    assert 'llava_jax_requests_total{route="/health",status="200"} 2\n' in text
    assert "llava_jax_queue_length 3\n" in text and "llava_jax_busy_slots 2\n" in text
    for line in text.splitlines():  # every sample is `name{labels} value`, every family typed
        assert line.startswith("# ") or len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0
    assert text.count("# TYPE") == text.count("# HELP") == 9


@pytest.mark.parametrize("flag", ["--max-videos", "--num-frames"])  # the second: generate's, checked here too
def test_video_flags_must_be_positive(flag, capsys):
    from llava_jax.serve.__main__ import parse_args

    assert parse_args(["--model-path", "m", flag, "3"]).__dict__[flag[2:].replace("-", "_")] == 3
    with pytest.raises(SystemExit) as e:
        parse_args(["--model-path", "m", flag, "0"])
    assert e.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err
