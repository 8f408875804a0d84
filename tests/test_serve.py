"""`python -m llava_jax.serve` as a subprocess on a tiny model directory, driven by the official `openai`
client and by raw HTTP: answers equal `python -m llava_jax.generate`'s, streams join to the answer,
every bad request is a 4xx with OpenAI's error object, concurrent and abandoned requests are answered
exactly as alone, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import numpy as np
import openai
import PIL.Image
import pytest

from llava_jax.data.templates import render_prompt
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.serve.app import STATIC_DIR, _static_file
from llava_jax.serve.openai_schema import ApiError
from tests._inference import IMAGE_TOKEN, NUM_IMAGE_TOKENS, make_model_dir, write_image
from tests._seeds import fresh_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"
QUESTION = "What is in the picture?"
SERVER_FLAGS = ("--api-key", KEY, "--max-batch", "4", "--max-images", "2", "--max-body-mb", "1")
# Every test talks to a server subprocess (its start, model load and compilation: about 15 s on 2 cores, once
# for the module); the longer tests say their own time.
pytestmark = [pytest.mark.slow(seconds=5), pytest.mark.same_worker("server")]


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m llava_jax.serve` subprocess; its log goes to a file (a pipe nobody reads would block it)."""

    def __init__(self, model_dir: str, log_path: str, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "llava_jax.serve", "--model-path", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--conv-mode", "vicuna_v1", "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image_message(path: str, text: str) -> dict:
    """The issue's request shape: one user message of [image part, text part]."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                        {"type": "text", "text": text}]}


def make_served_model(tmp_path_factory) -> tuple[str, list[str]]:
    """The served tiny model's directory (named llava-tiny: the model's id) and four images of different sizes."""
    d = str(tmp_path_factory.mktemp("llava-tiny", numbered=False))
    make_model_dir(d, seed=5)
    images = [write_image(os.path.join(d, f"img{i}.png"), seed=i, size=(40 + 7 * i, 30 + 3 * i)) for i in range(4)]
    return d, images


@pytest.fixture(scope="module")
def model_dir(served_model):
    return served_model


@pytest.fixture(scope="module")
def server(served):
    """The worker's server (tests/conftest.py), shared with tests/test_serve_browser.py: one start, not two."""
    return served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server: Server, body, *, key: str | None = KEY, stream: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=120)


def sse_events(text: str) -> list:
    """`data: ...` lines of an event stream, JSON-decoded ("[DONE]" kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metrics(server: Server) -> dict[str, float]:
    """The /metrics samples by their name with labels, e.g. 'llava_jax_busy_slots' or '..._bucket{le="+Inf"}'."""
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.slow(seconds=30)  # the module's server starts here, and generate runs beside it
def test_greedy_answer_equals_generate(model_dir, server, client):
    """The issue's interface check: the openai client's greedy answer is `generate --temperature 0`'s."""
    d, images = model_dir
    cmd = [sys.executable, "-m", "llava_jax.generate", "--model-path", d, "--image-file", images[0], "--prompt",
           f"<image>\n{QUESTION}", "--conv-mode", "vicuna_v1", "--temperature", "0", "--max-new-tokens", "12",
           "--json"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout)
    answer = client.chat.completions.create(model=os.path.basename(d), messages=[image_message(images[0], QUESTION)],
                                            temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == {"eos": "stop", "length": "length"}[expected["finish_reason"]]
    assert answer.usage.prompt_tokens == len(expected["prompt_ids"])
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    assert answer.usage.total_tokens == len(expected["prompt_ids"]) + len(expected["token_ids"])
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == "llava-tiny"
    assert abs(answer.created - time.time()) < 600


def test_stream_joins_to_the_answer(model_dir, server, client):
    """Streamed deltas join to the non-streamed answer; the role first, the finish reason, usage, [DONE]."""
    d, images = model_dir
    tok = Tokenizer.from_pretrained(d)
    messages = [{"role": "system", "content": "Answer briefly."}, image_message(images[1], "Describe it."),
                {"role": "assistant", "content": "A square."}, image_message(images[2], "And this one?")]
    whole = client.chat.completions.create(model="llava-tiny", messages=messages, temperature=0, max_tokens=20)
    # The prompt is the LLaVA conversation the messages map to: the system text replaces the template's.
    conv = [{"from": "system", "value": "Answer briefly."}, {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A square."}, {"from": "human", "value": "<image>\nAnd this one?"}]
    ids = render_prompt(conv, "vicuna_v1", tok, image_token_index=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS)
    assert whole.usage.prompt_tokens == len(ids)
    r = post(server, {"model": "llava-tiny", "messages": messages, "temperature": 0, "max_tokens": 20,
                      "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, final, usage = chunks
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == whole.choices[0].message.content
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert final["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    # The openai client reads the same stream.
    stream = client.chat.completions.create(model="llava-tiny", messages=messages, temperature=0, max_tokens=20,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content


def _not_an_image() -> str:
    return "data:image/png;base64," + base64.b64encode(b"certainly not a png").decode()


def _big_image_url() -> str:
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(noise).save(buf, format="PNG")  # ~1.5 MB: over the fixture's --max-body-mb 1
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _huge_image_url() -> str:
    """A PNG of a few kilobytes that would decode to over PIL.Image.MAX_IMAGE_PIXELS pixels."""
    side = int(PIL.Image.MAX_IMAGE_PIXELS ** 0.5) + 10
    buf = io.BytesIO()
    PIL.Image.new("1", (side, side)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_requests_get_openai_errors(model_dir, server):
    """Each bad request gets its status, OpenAI's error object and the offending param; the server stays healthy."""
    d, images = model_dir
    ok = [{"role": "user", "content": "Hello"}]

    def body(**kw):
        return {"model": "llava-tiny", "messages": ok, **kw}

    def image(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "?"}]}]

    long_text = " ".join(["describe the small red car near the tree"] * 40)  # beyond the 256-token context
    cases = [
        (b"{not json", 400, None, None),
        (b"[1, 2]", 400, None, None),
        ({"model": "llava-tiny"}, 400, "messages", None),
        (body(messages=[]), 400, "messages", None),
        (body(messages=image("data:image/png;base64,@@@not base64@@@")), 400, "messages[0].content[0].image_url",
         None),
        (body(messages=image(_not_an_image())), 400, "messages[0].content[0].image_url", None),
        (body(messages=image(_huge_image_url())), 400, "messages[0].content[0].image_url", None),
        (body(messages=image("https://example.com/cat.png")), 400, "messages[0].content[0].image_url",
         "image_url_not_supported"),
        (body(messages=[image_message(images[0], "a"), {"role": "assistant", "content": "b"},
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(p)}}
                                                     for p in images[1:3]]}]), 400, "messages", None),
        (body(messages=[{"role": "user", "content": long_text}]), 400, "messages", "context_length_exceeded"),
        (body(model="gpt-4o"), 404, "model", "model_not_found"),
        (body(temperature=2.5), 400, "temperature", None),
        (body(temperature=-1), 400, "temperature", None),
        (body(top_p=0), 400, "top_p", None),
        (body(max_tokens=0), 400, "max_tokens", None),
        (body(n=2), 400, "n", None),
        (body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
        (body(stream="sometimes"), 400, "stream", None),
        (body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400, "messages",
         None),
        (body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400,
         "messages[1].role", None),
        (body(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                        {"role": "user", "content": "c"}]), 400, "messages[1].role", None),
        (body(messages=[{"role": "tool", "content": "a"}]), 400, "messages[0].role", None),
        (body(messages=[{"role": "user", "content": "<image>\nWhat?"}]), 400, "messages[0].content", None),
        (body(messages=image(_big_image_url())), 413, None, None),
    ]
    for request, status, param, code in cases:
        r = post(server, request)
        where = request if isinstance(request, bytes) else json.dumps(request)[:200]
        assert r.status_code == status, (where, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert (error["param"], error["code"]) == (param, code), (where, error)
        assert error["type"] == "invalid_request_error", error
    # Unknown routes and methods answer with an error object too.
    r = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    r = post(server, body(temperature=0, max_tokens=3))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key_and_models(model_dir, server):
    """/v1 routes need the key (401 with an error object without it or with a wrong one); /health does not."""
    url = f"{server.url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(url, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
    r = post(server, {"messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["llava-tiny"]  # the model directory's name
    models = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["llava-tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_seeded_sampling_repeats(server, client):
    """temperature > 0 with a seed gives the same answer again; another seed another answer."""
    def ask(seed):
        answer = client.chat.completions.create(model="llava-tiny", messages=[{"role": "user", "content": "Hi"}],
                                                temperature=1.0, top_p=0.95, max_tokens=8, seed=seed)
        return answer.choices[0].message.content

    first = ask(7)
    assert ask(7) == first
    assert ask(8) != first


def test_web_page_route(server, tmp_path):
    """`/` serves llava_jax/serve_static/index.html when installed, else a 404 saying so; `/static/...` never
    leaves that folder."""
    r = httpx.get(f"{server.url}/", timeout=30)
    if os.path.isfile(os.path.join(STATIC_DIR, "index.html")):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    else:
        assert r.status_code == 404 and "serve_static" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/static/..%2F..%2Fsetup.py", timeout=30)
    assert r.status_code == 404
    (tmp_path / "index.html").write_text("<html>hello</html>")
    (tmp_path / "app.js").write_text("// js")
    assert _static_file(str(tmp_path), "index.html").path == str(tmp_path / "index.html")
    assert _static_file(str(tmp_path), "app.js").path == str(tmp_path / "app.js")
    for bad in ("../index.html", "missing.css", "/etc/passwd", ""):
        with pytest.raises(ApiError) as e:
            _static_file(str(tmp_path), bad)
        assert e.value.status == 404


def test_metrics_count_requests_and_tokens(model_dir, server):
    """/metrics parses as Prometheus text, and a completion moves its counters and histograms."""
    before = metrics(server)
    r = post(server, {"messages": [{"role": "user", "content": "Count me."}], "temperature": 0, "max_tokens": 5})
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = metrics(server)
    done = 'llava_jax_requests_total{route="/v1/chat/completions",status="200"}'
    assert after[done] == before.get(done, 0) + 1
    assert after["llava_jax_generated_tokens_total"] - before["llava_jax_generated_tokens_total"] == \
        usage["completion_tokens"]
    assert after["llava_jax_prompt_tokens_total"] - before["llava_jax_prompt_tokens_total"] == usage["prompt_tokens"]
    for hist in ("llava_jax_time_to_first_token_seconds", "llava_jax_request_latency_seconds"):
        assert after[f"{hist}_count"] == before[f"{hist}_count"] + 1
        assert after[f'{hist}_bucket{{le="+Inf"}}'] == after[f"{hist}_count"]
        buckets = [v for k, v in after.items() if k.startswith(f"{hist}_bucket")]
        assert buckets == sorted(buckets)  # cumulative
        assert after[f"{hist}_sum"] > before[f"{hist}_sum"]
    assert after["llava_jax_busy_slots"] == 0 and after["llava_jax_queue_length"] == 0
    assert after["llava_jax_max_slots"] == 4


def _requests(images: list[str], count: int, seed: int) -> list[dict]:
    """Different images, texts and lengths; every other one streamed."""
    rng = random.Random(seed)
    words = "what is in the picture describe colour shape where small large tell me more".split()
    out = []
    for i in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        content = [{"type": "text", "text": text}]
        if rng.random() < 0.8:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(rng.choice(images))}})
        out.append({"messages": [{"role": "user", "content": content}], "temperature": 0,
                    "max_tokens": rng.randint(2, 10), "stream": i % 2 == 1})
    return out


async def _ask(client: httpx.AsyncClient, body: dict, cancel_after: int | None = None,
               started: asyncio.Event | None = None) -> tuple[str, str] | None:
    """(text, finish_reason) of one request; with `cancel_after`, a streamed request is dropped after that many
    events (None returned); `started` is set at a stream's first event."""
    if not body["stream"]:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish, seen = "", None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            seen += 1
            if started is not None:
                started.set()
            if cancel_after is not None and seen > cancel_after:
                return None  # leaving the block closes the connection mid-stream
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            choice = json.loads(payload)["choices"][0]
            text += choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
    return text, finish


@pytest.mark.slow(seconds=15)
def test_concurrent_and_abandoned_requests_match_sequential(model_dir, server):
    """24 concurrent requests (half streamed) answer exactly as one at a time; then 200 with random client
    disconnects: every finished one is still exact, none is stuck, nothing recompiles, and the slots and
    queue empty."""
    _, images = model_dir
    seed = fresh_seed()
    requests = _requests(images, 24, seed)

    async def run():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
            sequential = [await _ask(client, {**b, "stream": False}) for b in requests]
            concurrent = await asyncio.gather(*(_ask(client, b) for b in requests))
            assert concurrent == sequential
            rng = random.Random(seed)
            compiles = []
            for _ in range(2):  # two rounds of 100
                picks = [rng.randrange(len(requests)) for _ in range(100)]
                cancels = [rng.choice([None, 0, 1, 2, 3]) if requests[k]["stream"] else None for k in picks]
                results = await asyncio.wait_for(
                    asyncio.gather(*(_ask(client, requests[k], c) for k, c in zip(picks, cancels))), timeout=600)
                for k, c, result in zip(picks, cancels, results):
                    if result is not None:
                        assert result == sequential[k], (k, c)
                assert sum(r is None for r in results) > 0  # some really were abandoned
                compiles.append(metrics(server)["llava_jax_compiles_total"])
            # Once the first round has shown the server every shape (and a cancellation), nothing compiles.
            assert compiles[1] == compiles[0]
            return sequential

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while True:  # a cancelled request frees its slot at the engine's next step
        m = metrics(server)
        if m["llava_jax_busy_slots"] == 0 and m["llava_jax_queue_length"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    r = post(server, {**requests[0], "stream": False})
    assert r.status_code == 200


def test_disconnect_cancels_the_request(model_dir, server):
    """A client that leaves, streamed or not, frees its slot long before its answer would have ended."""
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    answer = post(server, body).json()
    full = answer["usage"]["completion_tokens"]
    # No max_tokens: up to the end of the tiny model's 256-token context (this prompt never meets EOS).
    assert answer["usage"]["total_tokens"] == 256 and answer["choices"][0]["finish_reason"] == "length"
    assert full > 100

    async def abandon(stream: bool) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
            started = asyncio.Event()
            task = asyncio.ensure_future(_ask(client, {**body, "stream": stream}, started=started))
            if stream:
                await started.wait()
            else:  # decoding: a long answer takes a fraction of a second more
                while (await client.get("/metrics")).text.count("llava_jax_busy_slots 0"):
                    assert not task.done(), "answered before it was seen decoding"
                    await asyncio.sleep(0.005)
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    for stream in (True, False):
        before = metrics(server)["llava_jax_generated_tokens_total"]
        asyncio.run(abandon(stream))
        deadline = time.monotonic() + 30
        while metrics(server)["llava_jax_busy_slots"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert metrics(server)["llava_jax_generated_tokens_total"] - before < full, stream
    # The non-streamed one is counted as nginx's 499, "client closed request".
    closed = 'llava_jax_requests_total{route="/v1/chat/completions",status="499"}'
    while metrics(server).get(closed, 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow(seconds=8)
def test_bad_start_exits_2_with_one_line(model_dir):
    """A model directory that is not one, or a port in use, is one line and exit status 2 (before any loading)."""
    d, _ = model_dir

    def start(path: str, port: int) -> str:
        cmd = [sys.executable, "-m", "llava_jax.serve", "--model-path", path, "--port", str(port)]
        r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        return r.stderr

    assert "missing" in start(os.path.join(d, "missing"), _free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "cannot listen on" in start(d, taken.getsockname()[1])


@pytest.mark.slow(seconds=12)  # a server of its own (the module's programs, from the compilation cache)
def test_sigterm_drains_then_exits_zero(model_dir, server, tmp_path):
    """SIGTERM with four requests decoding and eight waiting, one of them streaming: all twelve finish in full,
    /health and new requests get 503 meanwhile, and the process exits 0."""
    d, images = model_dir
    body = {"messages": [image_message(images[3], "Tell me a long story about it.")], "temperature": 0}
    whole = post(server, body).json()  # the reference, from the module's server
    assert whole["usage"]["completion_tokens"] > 100, whole  # to the context's end: the drain takes a while
    # The module server's flags (its programs, from the compilation cache), but a host round trip per token:
    # a drain of seconds, not a fraction of one.
    s = Server(d, str(tmp_path / "server.log"), *SERVER_FLAGS, "--steps-per-call", "1")

    async def run():
        async with httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            async def until(predicate, within: float = 300.0) -> None:
                deadline = time.monotonic() + within  # a failure, not a hang, if the state never comes
                while not predicate(text := (await c.get("/metrics")).text):
                    assert time.monotonic() < deadline, f"metrics never reached the state waited for:\n{text}"
                    await asyncio.sleep(0.01)

            waiting = [asyncio.ensure_future(_ask(c, {**body, "stream": False})) for _ in range(11)]
            await until(lambda m: "llava_jax_busy_slots 4" in m and "llava_jax_queue_length 7" in m)
            started = asyncio.Event()
            stream = asyncio.ensure_future(_ask(c, {**body, "stream": True}, started=started))
            await started.wait()  # its response has begun (the role chunk); it waits for a slot
            await until(lambda m: "llava_jax_queue_length 8" in m)
            s.proc.send_signal(signal.SIGTERM)
            # The drain (three rounds of decoding) has begun once /health says so.
            while (health := await c.get("/health")).status_code == 200:
                await asyncio.sleep(0.005)
            refused = await c.post("/v1/chat/completions", json=body)
            return await stream, [await w for w in waiting], refused, health

    try:
        streamed, answered, refused, health = asyncio.run(run())
        expected = (whole["choices"][0]["message"]["content"], whole["choices"][0]["finish_reason"])
        assert streamed == expected and answered == [expected] * 11
        assert refused.status_code == 503 and refused.json()["error"]["message"]
        assert health.status_code == 503
        assert s.proc.wait(60) == 0, s.tail()
    finally:
        s.stop()
