"""The HTTP layer: an OpenAI-compatible chat-completions API over a `SlotEngine`, as a FastAPI app.

    app = create_app(pipe, slots, model_name="llava-v1.5-7b", api_key=None)

Routes:
  GET  /                      the web chat page (`llava_jax/serve_static/index.html`), /static/... its files
  GET  /health                200 {"status": "ok"} while serving; 503 while draining (SIGTERM)
  GET  /metrics               Prometheus text (`metrics.py`): requests by status, tokens, queue length, busy
                              slots, time-to-first-token and latency histograms
  GET  /v1/models             the one served model
  POST /v1/chat/completions   OpenAI's schema (`openai_schema.py`), streamed as server-sent events or not

A request's life: the body is read (at most `max_body_bytes`, else 413) and validated; its messages
become a LLaVA conversation whose image and video parts (`data:` URLs only) are decoded and preprocessed
(a video: `num_frames` frames sampled uniformly, `pipe.video_config`'s steps), and the prompt rendered
and checked, on a worker thread (the event loop keeps streaming other answers
meanwhile); `slots.submit` queues it; the engine thread hands each token to a listener that puts it on
the request's asyncio queue (`loop.call_soon_threadsafe`). A client that disconnects, streamed or
not, cancels its request, which frees its slot at the engine's next step (a non-streamed one is counted
as status 499, nginx's "client closed request").

Choices where OpenAI's API and LLaVA meet:
  * Sampling defaults are OpenAI's (temperature 1, top_p 1), not the LLaVA demo's (0.2, 0.7): the
    schema is OpenAI's, so a client gets what it would get there. temperature 0 is greedy decoding.
  * `max_tokens` (or `max_completion_tokens`) absent: up to the end of the context, as OpenAI;
    beyond the context's room it is cut to it (finish_reason "length").
  * A first system (or developer) message replaces the template's system prompt; with a template that
    has none (`plain`) it is a 400.
  * `seed` absent: a fresh random seed per request; `seed` given: a sampled answer is reproducible.
  * `model` may be omitted (the served model); another name is a 404 `model_not_found`.
  * With an API key, the `/v1` routes need `Authorization: Bearer KEY`; `/`, `/health` and `/metrics`
    stay open (load balancers and Prometheus scrape without it; they show counts, never content).
Every refusal is OpenAI's error object with the status that fits (400, 401, 404, 413, 503); an
unexpected failure is a 500 with one, and the server stays up either way.

This module knows nothing of JAX: it talks to the engine through `Pipeline` (prompts, sampling
settings) and `SlotEngine` (submit, cancel, stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.inference.engine import Completion, Delta, InputError, Prompt
from llava_jax.inference.pipeline import Pipeline
from llava_jax.inference.sampling import SamplingParams
from llava_jax.inference.slots import Finished, Handle, SlotEngine
from llava_jax.serve import openai_schema as schema
from llava_jax.serve.metrics import Metrics

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve_static")
MAX_BODY_BYTES = 20 * 2**20
MAX_IMAGES = 4
MAX_VIDEOS = 1
OWNER = "llava_jax"
# OpenAI reports "stop" for both a natural end and a stop sequence.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
CLIENT_CLOSED = 499
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions")


class _Disconnected(Exception):
    """The client went away before its answer was complete."""


def create_app(
    pipe: Pipeline,
    slots: SlotEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_images: int = MAX_IMAGES,
    max_videos: int = MAX_VIDEOS,
    num_frames: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    static_dir: str = STATIC_DIR,
) -> FastAPI:
    """The FastAPI app serving `pipe`'s model through the started, warmed-up `slots` (module docstring).

    A video's frames are preprocessed as `pipe.video_config` says (None: the model takes no video, and a video
    part is a 400); `num_frames` frames are sampled from each (default `pipe.video_config.num_frames`).

    `app.state.draining = True` (set by the server on SIGTERM) makes `/health` and new completions 503.
    """
    app = FastAPI(title="llava_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.metrics = metrics = Metrics()
    created = int(time.time())
    system_prompt = pipe.template.style != "plain"  # the plain (stage-1) template renders no system text
    video_config = pipe.video_config
    frames = num_frames or (video_config.num_frames if video_config is not None else 0)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(schema.ApiError)
    async def api_error(request: Request, e: schema.ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods get OpenAI's error object too.
        return JSONResponse(schema.ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        body = schema.ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Constant-time comparison: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise schema.ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise schema.ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                                  "model", "model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(slots.stats()), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": OWNER}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        check_model(name)
        return model_card()

    @app.get("/")
    async def page() -> FileResponse:
        return _static_file(static_dir, "index.html")

    @app.get("/static/{path:path}")
    async def static(path: str) -> FileResponse:
        return _static_file(static_dir, path)

    def build(req: schema.ChatRequest) -> tuple[Prompt, SamplingParams]:
        """Messages -> checked Prompt and its SamplingParams (on a worker thread: image and video decoding is slow)."""
        records, image_urls, video_urls = schema.conversation(req.messages, system_prompt=system_prompt,
                                                              max_images=max_images, max_videos=max_videos)
        videos = [schema.decode_video(url, param, video_config, frames) for param, url in video_urls]
        images = pipe.preprocess([schema.decode_image(url, param) for param, url in image_urls])
        seed = (req.seed if req.seed is not None else secrets.randbits(32)) % 2**32
        try:
            prompt = pipe.prompt(records, images, seed=seed, videos=videos)
        except InputError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise schema.ApiError(400, str(e), "messages", code) from None
        room = pipe.engine.max_context - len(prompt.ids)
        limit = room if req.token_limit is None else min(req.token_limit, room)
        params = pipe.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                               max_new_tokens=limit, seed=seed, stop_strings=req.stop_strings)
        return prompt, params

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        authorize(request)
        if app.state.draining:
            raise schema.ApiError(503, "the server is shutting down", kind="server_error")
        body = await _read_json(request, max_body_bytes)
        req = schema.parse_request(body)
        check_model(req.model)
        loop = asyncio.get_running_loop()
        prompt, params = await loop.run_in_executor(None, build, req)
        reply = _Reply(req, request, model_name, metrics, arrived)

        def listener(event: Delta | Finished) -> None:  # on the engine's thread: hand over, never block
            try:
                loop.call_soon_threadsafe(reply.on_event, event)
            except RuntimeError:  # the event loop has closed (a forced exit): nobody is waiting
                pass

        try:
            handle = slots.submit(prompt, params, listener=listener)
        except InputError as e:
            raise schema.ApiError(400, str(e), "messages") from None
        except ValueError as e:
            raise schema.ApiError(400, str(e)) from None
        except RuntimeError as e:  # "shutting down"
            raise schema.ApiError(503, f"the server cannot take requests: {e}", kind="server_error") from None
        reply.handle = handle
        if req.stream:
            return StreamingResponse(reply.chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            completion = await reply.complete()
        except _Disconnected:  # nobody reads this; nginx's "client closed request" in the logs and metrics
            return Response(status_code=CLIENT_CLOSED)
        if completion.finish_reason == "cancelled":
            raise schema.ApiError(503, "the request was cancelled: the server is shutting down", kind="server_error")
        return JSONResponse(reply.response(completion))

    return app


class _CountRequests:
    """ASGI middleware: every HTTP request into `Metrics.requests` by route and status (a stream counts its 200
    when it ends; an exception that escapes every handler counts as 500)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.metrics.count_request(path if path in ROUTES else "other", status)


def _static_file(folder: str, path: str) -> FileResponse:
    """A file of the web page's folder; a path leaving the folder, or a missing file, is a 404."""
    root = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
        hint = " (the web page is not installed: llava_jax/serve_static/ is missing)" if not os.path.isdir(root) else ""
        raise schema.ApiError(404, f"no such file: {path}{hint}")
    return FileResponse(full)


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 beyond `limit` bytes (checked as it arrives), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise schema.ApiError(413, f"the request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise schema.ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise schema.ApiError(400, f"the request body is not valid JSON: {e}") from None


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """One request's events from the engine, as an OpenAI response or a stream of chunks."""

    def __init__(self, req: schema.ChatRequest, request: Request, model_name: str, metrics: Metrics,
                 arrived: float):
        self.req, self.request, self.model_name, self.metrics, self.arrived = req, request, model_name, metrics, arrived
        self.handle: Handle | None = None  # set once submitted
        self.events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.first_token = True

    def on_event(self, event: Delta | Finished) -> None:
        """The engine's event, on the event loop: into the metrics (even if the client has left), then the queue."""
        now = time.monotonic()
        if isinstance(event, Finished):
            self.metrics.prompt_tokens += len(event.completion.prompt_ids)
            self.metrics.generated_tokens += len(event.completion.token_ids)
            if event.completion.finish_reason != "cancelled":
                self.metrics.latency.observe(now - self.arrived)
        elif self.first_token:
            self.first_token = False
            self.metrics.ttft.observe(now - self.arrived)
        self.events.put_nowait(event)

    async def _events(self) -> AsyncIterator[Delta | Finished]:
        """The engine's events until `Finished`; raises _Disconnected (after cancelling) if the client leaves."""
        gone = asyncio.ensure_future(_wait_disconnect(self.request))
        get: asyncio.Future | None = None
        finished = False
        try:
            while True:
                get = asyncio.ensure_future(self.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    raise _Disconnected()
                event = get.result()
                if isinstance(event, Finished):
                    finished = True
                    yield event
                    return
                yield event
        finally:
            gone.cancel()
            if get is not None:
                get.cancel()
            if not finished:  # disconnected, or the stream's task was cancelled by Starlette
                self.handle.cancel()

    async def complete(self) -> Completion:
        """Wait for the whole answer (non-streamed); raises _Disconnected if the client leaves first."""
        async with contextlib.aclosing(self._events()) as events:  # closed now, not when collected
            async for event in events:
                if isinstance(event, Finished):
                    return event.completion
        raise AssertionError("the engine's events ended without Finished")

    def usage(self, completion: Completion) -> dict[str, int]:
        """OpenAI's usage: prompt tokens (images expanded, as the model sees them) and generated tokens."""
        prompt, generated = len(completion.prompt_ids), len(completion.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def response(self, completion: Completion) -> dict[str, Any]:
        """The `chat.completion` object."""
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": FINISH_REASONS[completion.finish_reason]}],
            "usage": self.usage(completion),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    @property
    def _include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: the role, content deltas, the finish reason, usage if asked, `[DONE]`."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async with contextlib.aclosing(self._events()) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        if event.text:
                            yield self._chunk({"content": event.text})
                        continue
                    completion = event.completion
                    if completion.finish_reason == "cancelled":
                        error = schema.ApiError(503, "the request was cancelled: the server is shutting down",
                                                kind="server_error")
                        yield f"data: {json.dumps(error.body())}\n\n"
                    else:
                        yield self._chunk({}, FINISH_REASONS[completion.finish_reason])
                        if self._include_usage:
                            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                     "model": self.model_name, "choices": [], "usage": self.usage(completion)}
                            yield f"data: {json.dumps(usage)}\n\n"
                    yield "data: [DONE]\n\n"
        except _Disconnected:
            return
