"""OpenAI's chat-completions request as pydantic models, and its translation to a LLaVA conversation.

Only what the server honours is modelled; other fields a client may send (`user`, `logit_bias`,
`frequency_penalty`, ...) are ignored, as a lenient OpenAI-compatible server does. Every refusal is an
`ApiError`: an HTTP status and OpenAI's error object, whose `param` names the offending field
(`temperature`, `messages[2].content[0].image_url`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Annotated, Any, Literal

import PIL.Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llava_jax.data.image import load_image
from llava_jax.data.templates import IMAGE_MARKER

MAX_STOP_STRINGS = 4  # OpenAI's limit


class ApiError(Exception):
    """A request refused with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, OpenAI's shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; the image processor decides here


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """`POST /v1/chat/completions`. Defaults are OpenAI's (temperature 1, top_p 1); `top_k` is an extension."""

    model: str | None = None  # None: the served model
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported; got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings; got {len(stop)}")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def token_limit(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name) or else `max_tokens`; None: the context's room."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _param(loc: tuple) -> str:
    """Pydantic's error location as OpenAI names a field: ("messages", 0, "content") -> messages[0].content.

    The union branches pydantic tried ("str", "list[tagged-union[...]]") are not fields, and a tagged
    union repeats the tag before the field of the same name ("image_url", "image_url"): both dropped.
    """
    out, last = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "str" and "[" not in part and part != last:
            out += f".{part}" if out else part
        last = part
    return out


def _worst(errors: list[dict]) -> dict:
    """The error to report: for a union (content: a string or a list of parts), the deepest of its branches'."""
    first = errors[0]
    prefix = tuple(first["loc"][:-1])
    return max((e for e in errors if tuple(e["loc"][: len(prefix)]) == prefix), key=lambda e: len(e["loc"]))


def parse_request(body: Any) -> ChatRequest:
    """The decoded JSON body -> ChatRequest; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {type(body).__name__}")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        err = _worst(e.errors())
        param = _param(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param or None) from None


def _text(content: str | list[Part], where: str, what: str) -> str:
    """A message whose content must be text: its string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, ImagePart):
            raise ApiError(400, f"{where}.content[{j}]: {what} messages take text only; images go in user messages",
                           f"{where}.content[{j}]")
    return "\n".join(part.text for part in content)


def conversation(messages: list[Message], *, system_prompt: bool, max_images: int
                 ) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """OpenAI messages -> (LLaVA records `[{"from": "system" | "human" | "gpt", "value"}]`, image URLs).

    An optional first system (or developer) message replaces the template's system prompt (refused
    when the template has none: `system_prompt` False); then user and assistant turns alternate,
    starting and ending with a user turn. Each image part of a user turn becomes `<image>\\n` at its
    place; text parts are joined by newlines. The URLs come back as (param, url) in conversation
    order, the order `Pipeline.prompt` takes the images in.
    """
    records, urls = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, f"{where}: a {msg.role} message may only come first", f"{where}.role")
            if not system_prompt:
                raise ApiError(400, f"{where}: this model's conversation template has no system prompt; "
                               "leave the system message out", f"{where}.role")
            records.append({"from": "system", "value": _text(msg.content, where, msg.role)})
            continue
        expected = "user" if len(records) == 0 or records[-1]["from"] in ("system", "gpt") else "assistant"
        if msg.role != expected:
            raise ApiError(400, f"{where}: expected a {expected} message (after an optional system message, "
                           f"user and assistant messages alternate); got {msg.role}", f"{where}.role")
        if msg.role == "assistant":
            text = _text(msg.content, where, "assistant")
            if IMAGE_MARKER in text:
                raise ApiError(400, f"{where}.content: {IMAGE_MARKER!r} may not appear in an assistant message",
                               f"{where}.content")
            records.append({"from": "gpt", "value": text})
            continue
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        pieces: list[str] = []
        for j, part in enumerate(parts):
            param = f"{where}.content" if isinstance(msg.content, str) else f"{where}.content[{j}]"
            if isinstance(part, ImagePart):
                urls.append((f"{param}.image_url", part.image_url.url))
                pieces.append(f"{IMAGE_MARKER}\n")
            else:
                if IMAGE_MARKER in part.text:
                    raise ApiError(400, f"{param}: the text contains {IMAGE_MARKER!r}; send each image as an "
                                   "image_url part where it belongs", param)
                # Text after text is a new line; text after an image follows its "<image>\n".
                pieces.append(("\n" if pieces and not pieces[-1].endswith("\n") else "") + part.text)
        records.append({"from": "human", "value": "".join(pieces)})
    if not records or records[-1]["from"] != "human":
        raise ApiError(400, "the last message must be a user message (the one to answer)", "messages")
    if len(urls) > max_images:
        raise ApiError(400, f"the conversation has {len(urls)} images; this server takes at most {max_images} "
                       "a request (--max-images)", "messages")
    return records, urls


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def decode_image(url: str, param: str) -> PIL.Image.Image:
    """A `data:image/...;base64,...` URL -> an RGB image (`data.image.load_image`). The server never fetches
    http(s) URLs for a client; bytes that are not a (safe-sized) image are a 400 naming `param`."""
    if re.match(r"https?://", url, re.I):
        raise ApiError(400, f"{param}: this server does not fetch image URLs; send the image inline as a "
                       "data URL (data:image/png;base64,...)", param, "image_url_not_supported")
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(400, f"{param}: expected a base64 data URL (data:image/png;base64,...); got "
                       f"{url[:40]!r}", param)
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 ({e})", param) from None
    try:
        # The header first: PIL only warns between MAX_IMAGE_PIXELS and twice that, and would decode it.
        with PIL.Image.open(io.BytesIO(data)) as img:
            pixels = img.width * img.height
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise ApiError(400, f"{param}: not a readable image ({type(e).__name__}: {e})", param) from None
    if PIL.Image.MAX_IMAGE_PIXELS and pixels > PIL.Image.MAX_IMAGE_PIXELS:
        raise ApiError(400, f"{param}: the image has {pixels} pixels; the limit is {PIL.Image.MAX_IMAGE_PIXELS}",
                       param)
    try:
        return load_image(io.BytesIO(data), name=param)
    except ValueError as e:  # ImageError
        raise ApiError(400, f"{param}: not a readable image ({str(e).split(': ', 1)[-1]})", param) from None
