"""OpenAI's chat-completions request as pydantic models, and its translation to a LLaVA conversation.

Only what the server honours is modelled; other fields a client may send (`user`, `logit_bias`,
`frequency_penalty`, ...) are ignored, as a lenient OpenAI-compatible server does. Every refusal is an
`ApiError`: an HTTP status and OpenAI's error object, whose `param` names the offending field
(`temperature`, `messages[2].content[0].image_url`).

Media come as content parts with inline `data:` URLs: `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}` (OpenAI's) and `{"type": "video_url", "video_url": {"url":
"data:video/mp4;base64,..."}}` (vLLM's spelling of a video part; any container and codec PyAV decodes).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
from typing import Annotated, Any, Literal

import numpy as np
import PIL.Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llava_jax.config import VideoProcessorConfig
from llava_jax.data.image import load_image
from llava_jax.data.templates import IMAGE_MARKER, VIDEO_MARKER
from llava_jax.data.video import VideoError, decode_frames, preprocess_frames

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


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
MEDIA = {"image_url": IMAGE_MARKER, "video_url": VIDEO_MARKER}  # each media part becomes its marker


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
        if not isinstance(part, TextPart):
            raise ApiError(400, f"{where}.content[{j}]: {what} messages take text only; images and videos go in "
                           "user messages", f"{where}.content[{j}]")
    return "\n".join(part.text for part in content)


def _marker_in(text: str) -> str | None:
    """The first media marker (`<image>`, `<video>`) a text holds, if any."""
    return next((m for m in MEDIA.values() if m in text), None)


def conversation(messages: list[Message], *, system_prompt: bool, max_images: int, max_videos: int
                 ) -> tuple[list[dict[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """OpenAI messages -> (LLaVA records `[{"from": "system" | "human" | "gpt", "value"}]`, image URLs, video URLs).

    An optional first system (or developer) message replaces the template's system prompt (refused
    when the template has none: `system_prompt` False); then user and assistant turns alternate,
    starting and ending with a user turn. Each image part of a user turn becomes `<image>\\n` at its
    place, each video part `<video>\\n`; text parts are joined by newlines. The URLs come back as
    (param, url) in conversation order, the order `Pipeline.prompt` takes the images (videos) in.
    More than `max_images` images or `max_videos` videos is a 400.
    """
    records: list[dict[str, str]] = []
    urls: dict[str, list[tuple[str, str]]] = {"image_url": [], "video_url": []}
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
            if marker := _marker_in(text):
                raise ApiError(400, f"{where}.content: {marker!r} may not appear in an assistant message",
                               f"{where}.content")
            records.append({"from": "gpt", "value": text})
            continue
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        pieces: list[str] = []
        for j, part in enumerate(parts):
            param = f"{where}.content" if isinstance(msg.content, str) else f"{where}.content[{j}]"
            if isinstance(part, TextPart):
                if marker := _marker_in(part.text):
                    kind = "image_url" if marker == IMAGE_MARKER else "video_url"
                    raise ApiError(400, f"{param}: the text contains {marker!r}; send each {kind.split('_')[0]} as a "
                                   f"{kind} part where it belongs", param)
                # Text after text is a new line; text after an image follows its "<image>\n".
                pieces.append(("\n" if pieces and not pieces[-1].endswith("\n") else "") + part.text)
            else:
                urls[part.type].append((f"{param}.{part.type}", getattr(part, part.type).url))
                pieces.append(f"{MEDIA[part.type]}\n")
        records.append({"from": "human", "value": "".join(pieces)})
    if not records or records[-1]["from"] != "human":
        raise ApiError(400, "the last message must be a user message (the one to answer)", "messages")
    for kind, limit, flag in (("image_url", max_images, "--max-images"), ("video_url", max_videos, "--max-videos")):
        found = len(urls[kind])
        if found > limit:
            what = kind.split("_")[0]
            raise ApiError(400, f"the conversation has {found} {what}{'s' * (found != 1)}; this server takes at most "
                           f"{limit} a request ({flag})", "messages")
    return records, urls["image_url"], urls["video_url"]


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


MAX_FRAME_PIXELS = 3840 * 2160  # a video frame larger than 4K is refused before decoding: the kept frames stay bounded


def _inline_bytes(url: str, param: str, kind: str, example: str) -> tuple[str | None, bytes]:
    """A `data:MIME;base64,...` URL -> (its MIME type or None, its bytes); anything else is a 400 naming `param`.
    The server never fetches an http(s) URL for a client (`{kind}_url_not_supported`)."""
    if re.match(r"https?://", url, re.I):
        raise ApiError(400, f"{param}: this server does not fetch {kind} URLs; send the {kind} inline as a "
                       f"data URL ({example})", param, f"{kind}_url_not_supported")
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(400, f"{param}: expected a base64 data URL ({example}); got {url[:40]!r}", param)
    try:
        return match["mime"], base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 ({e})", param) from None


def decode_image(url: str, param: str) -> PIL.Image.Image:
    """A `data:image/...;base64,...` URL -> an RGB image (`data.image.load_image`). The server never fetches
    http(s) URLs for a client; bytes that are not a (safe-sized) image are a 400 naming `param`."""
    _, data = _inline_bytes(url, param, "image", "data:image/png;base64,...")
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


def decode_video(url: str, param: str, cfg: VideoProcessorConfig | None, num_frames: int) -> np.ndarray:
    """A `data:video/...;base64,...` URL -> its frames preprocessed for the model: float32 [F, s, s, 3].

    `num_frames` frames sampled uniformly (`data.video.decode_frames`, transformers' sampling), or every frame
    of a video that has fewer (as vLLM); then `preprocess_frames` with the model's video settings `cfg` (None:
    the model takes no video, a 400). The bytes go to a private temporary file for PyAV, removed at once.
    Bytes that are not a decodable video, a video without frames and frames over 4K are 400s naming `param`.
    """
    if cfg is None:
        raise ApiError(400, f"{param}: this model takes no video (its config has no video token or pooling); "
                       "send images, or serve a LLaVA-OneVision or LLaVA-NeXT-Video model", param)
    mime, data = _inline_bytes(url, param, "video", "data:video/mp4;base64,...")
    if mime and not (mime.lower().startswith("video/") or mime.lower() == "application/octet-stream"):
        raise ApiError(400, f"{param}: expected a video data URL (data:video/mp4;base64,...); got {mime}", param)
    fd, path = tempfile.mkstemp(prefix="llava_jax_video_")  # mode 0600: other users cannot read it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        pixels = _frame_pixels(path)
        if pixels > MAX_FRAME_PIXELS:
            raise ApiError(400, f"{param}: the video's frames have {pixels} pixels; the limit is {MAX_FRAME_PIXELS} "
                           "(3840 x 2160)", param)
        frames = _sample_frames(path, num_frames)
    except VideoError as e:
        reason = str(e).replace(f" {path!r}", "")  # the temporary file's name means nothing to the client
        raise ApiError(400, f"{param}: not a readable video ({reason})", param) from None
    finally:
        os.remove(path)
    return preprocess_frames(frames, cfg)


def _frame_pixels(path: str) -> int:
    """Width x height of the video stream as its header says (0 when unreadable: decoding will say why)."""
    import av  # a heavy import, only when a video comes

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.width or 0) * int(stream.codec_context.height or 0)
    except (av.error.FFmpegError, IndexError, OSError, ValueError):
        return 0


def _sample_frames(path: str, num_frames: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: `num_frames` frames sampled uniformly, or all frames of a shorter video."""
    try:
        return decode_frames(path, num_frames)[0]
    except VideoError as first:
        try:
            _, info = decode_frames(path, 1)  # readable at all? and how many frames it has
        except VideoError:
            raise first from None
        if info.total_frames >= num_frames:
            raise first from None
        return decode_frames(path, info.total_frames)[0]
