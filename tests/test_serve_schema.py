"""The server's request layer without a server: OpenAI messages to LLaVA conversations, image URLs, parameters,
and the Prometheus text (llava_jax/serve/openai_schema.py, metrics.py)."""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

from llava_jax.serve import openai_schema as schema
from llava_jax.serve.metrics import Histogram, Metrics


def _png(size=(5, 4)) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((size[1], size[0], 3), 7, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _convert(messages: list[dict], *, system_prompt: bool = True, max_images: int = 4):
    request = schema.parse_request({"messages": messages})
    return schema.conversation(request.messages, system_prompt=system_prompt, max_images=max_images)


def test_messages_become_llava_records_with_images_in_place_and_order():
    records, urls = _convert([
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
