"""LLaVA's JSON data format: reading, validating and resolving image paths.

A record, as in `blip_laion_cc_sbu_558k.json` (stage 1) and `llava_v1_5_mix665k.json` (stage 2):

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",        # optional; a str or a list of str
     "video": "clips/v_123.mp4",                        # optional (LLaVA-Video-178K, LLaVA-OneVision)
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

A record with a `video` marks it `<video>` in a human turn, or, as LLaVA-Video-178K writes it, with
the `<image>` marker when it has no `image` field: the original (LLaVA-NeXT's train.py) hands the model
the video's frames for that marker. `render_conversations` turns such an `<image>` into `<video>`.

Files are either `.json` (one list of records) or `.jsonl` (one record per line). Every record is
validated when the file is read, so that a malformed record is reported once, up front, with the
file, its index and its id, instead of failing a worker hours into training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from llava_jax import paths

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
# Role names in the "from" field (LLaVA writes human/gpt); the same set the templates accept.
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}

Record = dict[str, Any]


def record_location(path: str, index: int, line: int | None = None, record_id: Any = None) -> str:
    """How every message names a record: `PATH: record N (line L, id 'X')`.

    N counts the file's records from 0 (a .json list's index, the n-th record of a .jsonl); L is
    the 1-based line of a .jsonl file (blank lines are skipped, so L can differ from N + 1).
    """
    details = ([f"line {line}"] if line is not None else []) + ([f"id {record_id!r}"] if record_id is not None else [])
    return f"{path}: record {index}" + (f" ({', '.join(details)})" if details else "")


class RecordError(ValueError):
    """A record that does not follow LLaVA's data format (names the file, record index, line and id)."""

    def __init__(self, path: str, index: int, record_id: Any, problem: str, line: int | None = None):
        self.path, self.index, self.record_id, self.problem, self.line = path, index, record_id, problem, line
        super().__init__(f"{record_location(path, index, line, record_id)}: {problem}")


class DataFileError(ValueError):
    """A data file that cannot be read as records at all: not JSON, not a list, an unknown kind of file.

    The message names the file and, for JSON that does not parse, the line and column.
    """


class ImagePathError(ValueError):
    """An image path that is absolute or escapes the image folder."""


def record_images(record: Record) -> list[str]:
    """Returns the record's image paths as a list (empty for a text-only record)."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def record_video(record: Record) -> str | None:
    """The record's video path, or None."""
    return record.get("video")


def _video_as_image_marker(record: Record) -> bool:
    """Whether the record's `<image>` marker stands for its video (LLaVA-Video-178K: a video, no images, and
    no `<video>` marker)."""
    return (record.get("video") is not None and record.get("image") is None and
            not any(VIDEO_MARKER in turn["value"] for turn in record["conversations"]))


def render_conversations(record: Record) -> list[dict]:
    """The record's turns as the renderer takes them: a video written as `<image>` (LLaVA-Video-178K) becomes
    `<video>`, which the templates expand to the video's tokens."""
    if not _video_as_image_marker(record):
        return record["conversations"]
    return [{**turn, "value": turn["value"].replace(IMAGE_MARKER, VIDEO_MARKER)} for turn in record["conversations"]]


def validate_record(record: Any) -> str | None:
    """Returns what is wrong with one record, or None if it is valid.

    Checks the fields LLaVA's loader relies on: `id` (str or int), optional `image` (non-empty str
    or non-empty list of them), `conversations` (a list of {"from", "value": str} turns: an optional
    system turn, an optional opening gpt turn (dropped by the templates, as by the original), then
    human/gpt alternating with at least one gpt answer), and that the number of `<image>` markers,
    all in human turns, equals the number of images; an optional `video` (a non-empty path) has exactly
    one `<video>` marker, or one `<image>` marker when the record has no images (the module docstring).
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if "id" not in record:
        return "missing field 'id'"
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        return f"field 'id' must be a string or an integer, found {type(record['id']).__name__}"
    image = record.get("image")
    if image is not None:
        images = [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not images:
            return f"field 'image' must be a path or a non-empty list of paths, found {image!r}"
        for path in images:
            if not isinstance(path, str) or not path:
                return f"field 'image' must hold non-empty strings, found {path!r}"
    video = record.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        return f"field 'video' must be a non-empty path, found {video!r}"
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return "field 'conversations' must be a non-empty list of {'from', 'value'} turns"
    markers, video_markers, roles = 0, 0, []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{j}] must be an object with 'from' and 'value', found {turn!r:.80}"
        if turn["from"] not in ROLES:
            return f"conversations[{j}].from is {turn['from']!r}; expected one of {sorted(ROLES)}"
        if not isinstance(turn["value"], str):
            return f"conversations[{j}].value must be a string, found {type(turn['value']).__name__}"
        role = ROLES[turn["from"]]
        count, videos = turn["value"].count(IMAGE_MARKER), turn["value"].count(VIDEO_MARKER)
        if (count or videos) and role != USER:
            return (f"conversations[{j}] is a {turn['from']} turn with an {IMAGE_MARKER if count else VIDEO_MARKER} "
                    "marker; markers belong in human turns")
        markers += count
        video_markers += videos
        roles.append(role)
    # As the templates (and the original) read a conversation: an optional system turn, an
    # opening answer that is dropped, then strictly alternating human/gpt turns.
    start = 1 if roles[0] == SYSTEM else 0
    start += 1 if roles[start:start + 1] == [ASSISTANT] else 0
    for j in range(start, len(roles)):
        expected = USER if (j - start) % 2 == 0 else ASSISTANT
        if roles[j] != expected:
            return (f"conversations[{j}].from is {convs[j]['from']!r}; expected "
                    f"{'human' if expected == USER else 'gpt'} (turns alternate human, gpt, ...)")
    if ASSISTANT not in roles[start:]:
        return "conversations has no gpt turn after a human turn: nothing to train on"
    num_images = len(record_images(record))
    if video is not None and image is None and not video_markers:  # LLaVA-Video-178K: <image> is the video
        if markers != 1:
            return (f"found {markers} {IMAGE_MARKER} marker(s) in a record with a video and no images; the video "
                    f"needs exactly one marker ({VIDEO_MARKER}, or {IMAGE_MARKER} as LLaVA-Video-178K writes it)")
        return None
    if video_markers != (video is not None):
        return (f"found {video_markers} {VIDEO_MARKER} marker(s) in the conversation but "
                f"{'a video' if video is not None else 'no video'} in field 'video'; a video needs exactly one marker")
    if markers != num_images:
        return (f"found {markers} {IMAGE_MARKER} marker(s) in the conversation but {num_images} image(s) "
                "in field 'image'; each image needs exactly one marker")
    return None


is_remote = paths.is_remote  # gs://bucket/...: read through etils.epath (llava_jax/paths.py)


def read_raw(path: str) -> Iterator[tuple[int, int | None, Any]]:
    """Yields (index, line or None, parsed JSON value) for each record of a .json or .jsonl file (local or gs://).

    A .jsonl line that is not JSON raises RecordError naming the record and the line; a .json file
    that is not JSON, or not a list, raises DataFileError naming the file (and the line and column).
    """
    if path.endswith(".jsonl"):
        with paths.open(path, "r", encoding="utf-8") as f:
            index = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(path, index, None, f"not valid JSON: {e}", line=line_no) from None
                yield index, line_no, value
                index += 1
    elif path.endswith(".json"):
        with paths.open(path, "r", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise DataFileError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
        for index, value in enumerate(data):
            yield index, None, value
    else:
        raise DataFileError(f"{path}: unknown data file type; expected a .json list or a .jsonl file")


def load_records(path: str | os.PathLike,
                 on_error: Callable[[RecordError], None] | None = None) -> list[Record]:
    """Reads and validates all records of a LLaVA `.json` or `.jsonl` data file.

    Args:
      path: the data file.
      on_error: without it, the first malformed record raises `RecordError`; with it, each
        malformed record is passed to `on_error` and left out (the inspect CLI reports them all).

    Returns:
      The valid records, in file order.
    """
    return [record for record, _, _ in load_located_records(path, on_error)]


def load_located_records(path: str | os.PathLike, on_error: Callable[[RecordError], None] | None = None
                         ) -> list[tuple[Record, int, int | None]]:
    """`load_records`, each valid record with its index in the file and its line (.jsonl) for messages."""
    path = os.fspath(path)
    out = []
    for index, line, record in read_raw(path):
        problem = validate_record(record)
        if problem is not None:
            record_id = record.get("id") if isinstance(record, dict) else None
            error = RecordError(path, index, record_id, problem, line=line)
            if on_error is None:
                raise error
            on_error(error)
            continue
        out.append((record, index, line))
    return out


def check_relative_image_path(rel: str) -> None:
    """Raises ImagePathError if `rel` is absolute or lexically escapes its folder (`..`)."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or os.path.splitdrive(rel)[0]:
        raise ImagePathError(f"image path {rel!r} is absolute; image paths must be relative to --image-folder")
    normal = os.path.normpath(rel)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise ImagePathError(f"image path {rel!r} escapes the image folder with '..'")


def resolve_image_path(image_folder: str | os.PathLike, rel: str) -> str:
    """Returns the real path of image `rel` inside `image_folder`.

    Raises ImagePathError if `rel` is absolute, or if it leaves the folder through `..` or through a
    symbolic link pointing outside it: a data file must not read arbitrary files of the machine.
    The file itself need not exist (a missing image is the loader's concern).
    """
    check_relative_image_path(rel)
    if paths.is_remote(image_folder):  # object storage has no symbolic links: the lexical check is the whole check
        return os.path.join(os.fspath(image_folder).rstrip("/"), os.path.normpath(rel))
    root = os.path.realpath(os.fspath(image_folder))
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root:
        raise ImagePathError(f"image path {rel!r} resolves to {real}, outside the image folder {root} "
                             "(through a symbolic link)")
    return real
