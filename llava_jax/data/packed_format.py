"""The packed record format: what `pack.py` and `tfds_builder.py` write and `sources.py` reads.

A packed directory (written by pack.py) holds ArrayRecord shards, one record per chunk, uncompressed
(images are JPEG/PNG already), each record one `encode_example` payload:

    b"LJR1" | uint32 LE header length | header JSON {"record": {...}, "image_sizes": [n, ...]}
    | the images' original file bytes, concatenated [| the video's original file bytes]

A record with a `video` keeps its file's bytes after its images' (its header's last size): the frames are
sampled and decoded when training reads them, so one packed dataset serves any `num_frames`, and a
compressed video is far smaller than its decoded frames.

`manifest.json` names the shards with their sizes, record counts and sha256; `index.npz` holds
per record what the planner needs (`record_stats`: words, image count) and where its payload lies in
its shard, so that opening a packed dataset reads two small files, not the shards. Remote shards are
read by byte range through that index, skipping riegeli's block headers (24 bytes every 64 KiB).
No pickle anywhere: a shard is data, never code.

The input side is shared too: both writers (ArrayRecord shards and the TFDS builder) take the
same valid records (`load_input`) and the same checked image bytes (`read_example`).
"""

from __future__ import annotations

import io
import json
import logging
import struct
from collections.abc import Sequence
from typing import Any

from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data import video as video_lib
from llava_jax.data.video import VideoError  # noqa: F401  # the writers skip a record with an unreadable video
from llava_jax.data.records import Record, is_remote

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.npz"
FORMAT = "llava_jax.packed/1"
MAGIC = b"LJR1"
# riegeli (ArrayRecord's container): a 24-byte block header starts every 64 KiB of the file.
BLOCK_SIZE, BLOCK_HEADER = 1 << 16, 24


class DataSourceError(ValueError):
    """A data source that cannot be read as given (names the file or dataset and the cause)."""


def record_stats(record: Record) -> tuple[int, int, bool]:
    """(words of all turns, number of images, has an `image` or `video` field) of one record.

    A video counts as visual (the planner's modality, as the original's `modality_lengths`) but not as an image.
    """
    words = sum(len(turn["value"].split()) for turn in record["conversations"])
    return words, len(records_lib.record_images(record)), "image" in record or "video" in record


# ----------------------------------------------------------------------------- the input of a payload


def read_image_bytes(image_folder: str, rel: str) -> bytes:
    """The bytes of image `rel` inside `image_folder` (local or gs://); never outside the folder.

    Local folders go through `records.resolve_image_path` (which also refuses symbolic links that
    leave the folder); remote ones through the lexical check (object stores have no links).
    """
    if is_remote(image_folder):
        from etils import epath  # pylint: disable=g-import-not-at-top

        records_lib.check_relative_image_path(rel)
        return (epath.Path(image_folder) / rel).read_bytes()
    with open(records_lib.resolve_image_path(image_folder, rel), "rb") as f:
        return f.read()


def read_example(record: records_lib.Record, image_folder: str) -> list[bytes]:
    """The encoded bytes of each of `record`'s images, each checked to decode as the loader will, then its
    video's file bytes (when it has one; checked to hold a video stream: its frames are decoded in training).

    Raises ImagePathError / ImageError / VideoError / OSError naming the file on any problem.
    """
    out = []
    for rel in records_lib.record_images(record):
        data = read_image_bytes(image_folder, rel)
        image_lib.load_image(io.BytesIO(data), name=f"{image_folder.rstrip('/')}/{rel}")
        out.append(data)
    video = records_lib.record_video(record)
    if video is not None:
        data = read_image_bytes(image_folder, video)  # the path checked as an image's
        where = f"{image_folder.rstrip('/')}/{video}" if is_remote(image_folder) else \
            records_lib.resolve_image_path(image_folder, video)
        video_lib.decode_frames(where, 1)  # counts its frames: a file without a readable video stream fails here
        out.append(data)
    return out


def load_input(data_path: str) -> tuple[list[tuple[int, records_lib.Record]], list[dict[str, Any]], int]:
    """([(input index, valid record)], [skipped: {index, id, reason}], number of input records)."""
    errors: list[records_lib.RecordError] = []
    valid = records_lib.load_records(data_path, on_error=errors.append)
    bad = {e.index for e in errors}
    total = len(valid) + len(errors)
    indices = [i for i in range(total) if i not in bad]
    skipped = [{"index": e.index, "id": e.record_id, "reason": e.problem} for e in errors]
    for e in errors:
        logger.warning("pack: skipped %s", e)
    return list(zip(indices, valid)), skipped, total


# ----------------------------------------------------------------------------- payloads and shards


def encode_example(record: Record, images: Sequence[bytes]) -> bytes:
    """One packed payload: the record and its images' encoded bytes (see the module docstring)."""
    header = json.dumps({"record": record, "image_sizes": [len(b) for b in images]},
                        ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *images])


def decode_example(payload: bytes) -> tuple[Record, list[bytes]]:
    """Inverse of `encode_example`; raises ValueError on anything that is not one."""
    if payload[:4] != MAGIC or len(payload) < 8:
        raise ValueError(f"not a packed LLaVA record (starts with {payload[:8]!r})")
    (n,) = struct.unpack("<I", payload[4:8])
    header = json.loads(payload[8 : 8 + n].decode("utf-8"))
    sizes = header["image_sizes"]
    if 8 + n + sum(sizes) != len(payload):
        raise ValueError(f"packed record of {len(payload)} bytes, its header accounts for {8 + n + sum(sizes)}")
    images, pos = [], 8 + n
    for size in sizes:
        images.append(payload[pos : pos + size])
        pos += size
    return header["record"], images


def physical_range(start: int, length: int) -> tuple[int, int]:
    """File byte range [begin, end) holding logical bytes [start, start + length) of a riegeli file.

    Logical positions count the file's bytes without its block headers (24 bytes at every
    multiple of 64 KiB, the first at 0).
    """
    usable = BLOCK_SIZE - BLOCK_HEADER

    def phys(logical):
        return (logical // usable) * BLOCK_SIZE + BLOCK_HEADER + logical % usable

    return phys(start), phys(start + length - 1) + 1


def strip_block_headers(data: bytes, begin: int) -> bytes:
    """`data` read from file offset `begin`, without the riegeli block headers inside it."""
    parts, pos = [], begin
    end = begin + len(data)
    while pos < end:
        block_start = pos - pos % BLOCK_SIZE
        if pos < block_start + BLOCK_HEADER:  # inside a block header: skip it
            pos = block_start + BLOCK_HEADER
            continue
        stop = min(end, block_start + BLOCK_SIZE)
        parts.append(data[pos - begin : stop - begin])
        pos = stop
    return b"".join(parts)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the packed dataset in `directory`; DataSourceError if there is none or it is not ours."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    path = epath.Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataSourceError(f"{path}: no manifest: not a packed dataset, or its packing has not finished "
                              "(run `python -m llava_jax.data.pack` again to complete it)") from None
    except json.JSONDecodeError as e:
        raise DataSourceError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataSourceError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
