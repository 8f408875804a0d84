"""Where training records come from: one interface over LLaVA JSON, packed shards and TFDS.

    data spec                                   source
    llava_v1_5_mix665k.json / .jsonl (+ folder)  JsonSource: records + loose image files
    a directory holding manifest.json            PackedSource: `python -m llava_jax.data.pack` output
    tfds:NAME[/CONFIG][:VERSION][@SPLIT]         TfdsSource: a TFDS dataset in ArrayRecord format

Each may be local or on GCS (`gs://`, through etils.epath / fsspec). A source holds records in
a fixed order; `source[i]` is an `Example`: the LLaVA record (as records.py validates it) and
one opener per image returning the decoded PIL image. The pipeline plans, renders and
preprocesses Examples the same way whatever their source, so the same records in the same order
give the same batches, token ids, labels and pixels from every source.

Packed shards (format written by pack.py): ArrayRecord files, one record per chunk, uncompressed
(images are JPEG/PNG already), each record one `encode_example` payload:

    b"LJR1" | uint32 LE header length | header JSON {"record": {...}, "image_sizes": [n, ...]}
    | the images' original file bytes, concatenated

`manifest.json` names the shards with their sizes, record counts and sha256; `index.npz` holds
per record what the planner needs (words, image count) and where its payload lies in its shard,
so that opening a packed dataset reads two small files, not the shards. array_record's
open-source reader opens local files only; for remote shards (gs://) records are read by byte
range through that index (riegeli block headers, 24 bytes every 64 KiB, are skipped). No pickle
anywhere: a shard is data, never code.

TFDS: `tfds.data_source` reads ArrayRecord datasets with numpy only; TensorFlow is never imported
(building one needs only tensorflow-datasets when the images are given as encoded bytes, as
`tfds_builder.py` does). The expected features are those `tfds_builder.LlavaRecords` writes:
`id`, `conversations` (JSON text), `image` (the original paths) and `images` (encoded bytes, or
decoded uint8 arrays as tfds.features.Image gives them).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image

from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data.records import Record, is_remote

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.npz"
FORMAT = "llava_jax.packed/1"
MAGIC = b"LJR1"
TFDS_PREFIX = "tfds:"
# riegeli (ArrayRecord's container): a 24-byte block header starts every 64 KiB of the file.
BLOCK_SIZE, BLOCK_HEADER = 1 << 16, 24


class DataSourceError(ValueError):
    """A data source that cannot be read as given (names the file or dataset and the cause)."""


@dataclasses.dataclass
class Example:
    """One record and a way to open each of its images (in `image` field order)."""

    record: Record
    images: list[Callable[[], PIL.Image.Image]]


class Source:
    """A random-access sequence of Examples. Subclasses are picklable (Grain sends them to workers)."""

    name: str  # shown in messages: the file, directory or dataset

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Example:
        raise NotImplementedError

    def record_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(words int64 [N], images int64 [N], has_image bool [N]): what the planner needs, per record."""
        raise NotImplementedError

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        """Signed length estimates [N] (the planner's convention: negative for text-only records).

        Like the original's `modality_lengths`: words of all turns plus the image tokens.
        """
        words, images, has_image = self.record_stats()
        return (words + num_image_tokens * images) * np.where(has_image, 1, -1)


def record_stats(record: Record) -> tuple[int, int, bool]:
    """(words of all turns, number of images, has an `image` field) of one record."""
    words = sum(len(turn["value"].split()) for turn in record["conversations"])
    return words, len(records_lib.record_images(record)), "image" in record


def _stats_arrays(rows: Sequence[tuple[int, int, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray(rows, np.int64).reshape(-1, 3)
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(bool)


def _image_from_bytes(data: bytes, name: str) -> Callable[[], PIL.Image.Image]:
    return lambda: image_lib.load_image(io.BytesIO(data), name=name)


# ----------------------------------------------------------------------------- JSON + image folder


class JsonSource(Source):
    """LLaVA `.json`/`.jsonl` file(s) (concatenated) plus loose image files under `image_folder`."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_folder: str | os.PathLike):
        self.paths = [os.fspath(p) for p in paths]
        self.name = self.paths[0] if len(self.paths) == 1 else ",".join(self.paths)
        self.image_folder = os.fspath(image_folder)
        self.records, self._starts, lines = [], [], []
        for path in self.paths:
            self._starts.append((len(self.records), path))
            for record, index, line in records_lib.load_located_records(path):
                for rel in records_lib.record_images(record):
                    try:
                        records_lib.check_relative_image_path(rel)
                    except records_lib.ImagePathError as e:
                        raise records_lib.RecordError(path, index, record["id"], str(e), line=line) from None
                self.records.append(record)
                lines.append(-1 if line is None else line)
        if not self.records:
            raise ValueError(f"no records in {self.paths}")
        self._lines = np.asarray(lines, np.int32)  # each record's .jsonl line (-1: none), for messages

    def locate(self, index: int) -> str:
        """`FILE: record N (line L, id 'X')` for record `index` of the concatenated files."""
        start, path = self._starts[bisect.bisect_right([s for s, _ in self._starts], index) - 1]
        line = int(self._lines[index])
        return records_lib.record_location(path, index - start, None if line < 0 else line, self.records[index]["id"])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        return Example(record, [self._opener(rel) for rel in records_lib.record_images(record)])

    def _opener(self, rel: str) -> Callable[[], PIL.Image.Image]:
        if is_remote(self.image_folder):
            return lambda: image_lib.load_image(io.BytesIO(read_image_bytes(self.image_folder, rel)),
                                                name=f"{self.image_folder.rstrip('/')}/{rel}")
        return lambda: image_lib.load_image(records_lib.resolve_image_path(self.image_folder, rel))

    def record_stats(self):
        return _stats_arrays([record_stats(r) for r in self.records])


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


# ----------------------------------------------------------------------------- packed shards


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


def _read_manifest(directory: str) -> dict[str, Any]:
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


def is_packed(path: str | os.PathLike) -> bool:
    """True if `path` is a directory holding a packed dataset's manifest."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if not is_remote(path) and not os.path.isdir(path):
        return False
    return (epath.Path(path) / MANIFEST).exists()


class PackedSource(Source):
    """Records packed by `python -m llava_jax.data.pack` into ArrayRecord shards (local or gs://).

    Local shards are read with array_record's reader; remote ones (or any, with byte_ranges=True)
    by byte range through the index.
    """

    def __init__(self, directory: str | os.PathLike, byte_ranges: bool | None = None):
        from etils import epath  # pylint: disable=g-import-not-at-top

        self.directory = os.fspath(directory).rstrip("/")
        self.byte_ranges = is_remote(self.directory) if byte_ranges is None else byte_ranges
        self.name = self.directory
        manifest = _read_manifest(self.directory)
        self.files = [f"{self.directory}/{s['file']}" for s in manifest["shards"]]
        counts = [int(s["num_records"]) for s in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for shard, file in zip(manifest["shards"], self.files):
            try:
                size = epath.Path(file).stat().length
            except FileNotFoundError:
                raise DataSourceError(f"{file}: missing; {MANIFEST} lists it with {shard['bytes']} bytes") from None
            if size != shard["bytes"]:
                raise DataSourceError(f"{file}: {size} bytes, but {MANIFEST} says {shard['bytes']}: the shard is "
                                      "truncated or was changed after packing (re-run pack into a new directory, or "
                                      "`python -m llava_jax.data.pack --verify` to check every checksum)")
        with epath.Path(self.directory, INDEX).open("rb") as f:
            index = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
        self.words, self.num_images = index["words"], index["num_images"]
        self.has_image, self.offset, self.length = index["has_image"], index["offset"], index["length"]
        if len(self.words) != self.starts[-1]:
            raise DataSourceError(f"{self.directory}/{INDEX}: {len(self.words)} records, {MANIFEST} says "
                                  f"{self.starts[-1]}")
        self._init_readers()

    def _init_readers(self):
        self._lock = threading.Lock()
        self._readers: dict[int, Any] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock")
        state.pop("_readers")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_readers()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def record_stats(self):
        return self.words.astype(np.int64), self.num_images.astype(np.int64), self.has_image.astype(bool)

    def _reader(self, shard: int):
        with self._lock:
            reader = self._readers.get(shard)
            if reader is None:
                from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

                try:
                    # Random access: no readahead, no thread pool of its own (Grain's threads read).
                    reader = array_record_module.ArrayRecordReader(
                        self.files[shard], "readahead_buffer_size:0,max_parallelism:0")
                except Exception as e:  # pylint: disable=broad-except
                    raise DataSourceError(f"{self.files[shard]}: cannot open as ArrayRecord: {e}") from e
                self._readers[shard] = reader
            return reader

    def payload(self, index: int) -> bytes:
        """The packed bytes of record `index` (see `encode_example`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        shard = bisect.bisect_right(self.starts, index) - 1
        local = index - int(self.starts[shard])
        file = self.files[shard]
        try:
            if not self.byte_ranges:
                return self._reader(shard).read([local])[0]
            begin, end = physical_range(int(self.offset[index]), int(self.length[index]))
            import fsspec  # pylint: disable=g-import-not-at-top

            fs, path = fsspec.core.url_to_fs(file)
            return strip_block_headers(fs.cat_file(path, start=begin, end=end), begin)
        except DataSourceError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise DataSourceError(f"{file}: cannot read record {local} (record {index} of {self.directory}): "
                                  f"{type(e).__name__}: {e}") from e

    def __getitem__(self, index: int) -> Example:
        payload = self.payload(index)
        try:
            record, images = decode_example(payload)
        except (ValueError, KeyError, TypeError) as e:
            raise DataSourceError(f"{self.directory}: record {index} is corrupt: {e}") from e
        problem = records_lib.validate_record(record)
        if problem is not None:
            raise DataSourceError(f"{self.directory}: record {index}: {problem}")
        paths = records_lib.record_images(record)
        if len(paths) != len(images):
            raise DataSourceError(f"{self.directory}: record {index} names {len(paths)} images, holds {len(images)}")
        return Example(record, [_image_from_bytes(b, f"{self.directory}[{index}]:{p}") for b, p in zip(images, paths)])


# ----------------------------------------------------------------------------- TFDS


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataSourceError("a tfds: data source needs tensorflow-datasets: pip install 'llava_jax[tfds]' "
                              "(TensorFlow itself is not needed)") from None
    return tfds


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG][:VERSION][@SPLIT]` -> (TFDS name, split); the split defaults to train."""
    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.partition("@")
    if not name:
        raise DataSourceError(f"{spec!r}: expected tfds:NAME[/CONFIG][:VERSION][@SPLIT]")
    return name, split or "train"


class TfdsSource(Source):
    """A TFDS dataset prepared in ArrayRecord format, read through `tfds.data_source` (no TensorFlow)."""

    def __init__(self, spec: str, data_dir: str | os.PathLike | None = None):
        tfds = _import_tfds()
        name, split = parse_tfds_spec(spec)
        if name.split("/")[0].split(":")[0] == "llava_records":
            from llava_jax.data import tfds_builder  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
        self.name = f"{TFDS_PREFIX}{name}@{split}"
        try:
            self.source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir) if data_dir else None,
                                           download=False)
        except Exception as e:  # pylint: disable=broad-except
            raise DataSourceError(f"{self.name}: cannot open the TFDS data source (data_dir {data_dir}): "
                                  f"{type(e).__name__}: {e}") from e
        features = set(self.source.dataset_info.features.keys())
        missing = {"id", "conversations", "images"} - features
        if missing:
            raise DataSourceError(f"{self.name}: features {sorted(features)} lack {sorted(missing)}; a LLaVA TFDS "
                                  "dataset has id, conversations (JSON), image (paths) and images (encoded bytes)")
        self._stats = None
        metadata = self.source.dataset_info.metadata or {}
        stats = metadata.get("record_stats", {}).get(split)
        if stats is not None and len(stats.get("words", ())) == len(self.source):
            self._stats = (np.asarray(stats["words"], np.int64), np.asarray(stats["num_images"], np.int64),
                           np.asarray(stats["has_image"], bool))

    def __len__(self) -> int:
        return len(self.source)

    def _record(self, index: int) -> tuple[Record, list[Any]]:
        ex = self.source[index]
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        record: Record = {"id": text(ex["id"]), "conversations": json.loads(text(ex["conversations"]))}
        paths = [text(p) for p in ex.get("image", [])]
        images = list(ex["images"])
        if paths or images:
            record["image"] = paths if paths else [f"image{k}" for k in range(len(images))]
        return record, images

    def __getitem__(self, index: int) -> Example:
        try:
            record, images = self._record(index)
        except (ValueError, KeyError, TypeError) as e:
            raise DataSourceError(f"{self.name}: record {index} is not a LLaVA record: {e}") from e
        problem = records_lib.validate_record(record)
        if problem is not None:
            raise DataSourceError(f"{self.name}: record {index}: {problem}")
        openers = []
        for data, path in zip(images, records_lib.record_images(record)):
            where = f"{self.name}[{index}]:{path}"
            if isinstance(data, bytes):
                openers.append(_image_from_bytes(data, where))
            else:  # decoded by tfds.features.Image: uint8 [H, W, C]
                array = np.asarray(data)
                openers.append(lambda a=array: image_lib.to_rgb(PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)))
        return Example(record, openers)

    def record_stats(self):
        if self._stats is None:
            logger.warning("data: %s has no record_stats metadata: reading all %d records once to plan", self.name,
                           len(self))
            self._stats = _stats_arrays([record_stats(self._record(i)[0]) for i in range(len(self))])
        return self._stats


# ----------------------------------------------------------------------------- opening by name


def open_source(data: str | os.PathLike | Sequence[str | os.PathLike] | Source, image_folder: str | os.PathLike | None,
                *, tfds_data_dir: str | os.PathLike | None = None) -> Source:
    """The source a stage's `data` names: .json/.jsonl file(s), a packed directory, or `tfds:...`."""
    if isinstance(data, Source):
        return data
    if not isinstance(data, (str, os.PathLike)):
        paths = list(data)
        if len(paths) == 1:
            return open_source(paths[0], image_folder, tfds_data_dir=tfds_data_dir)
        return JsonSource(paths, _need_folder(image_folder, paths))
    data = os.fspath(data)
    if data.startswith(TFDS_PREFIX):
        return TfdsSource(data, tfds_data_dir)
    if data.endswith((".json", ".jsonl")):
        return JsonSource([data], _need_folder(image_folder, data))
    if is_packed(data):
        return PackedSource(data)
    raise DataSourceError(f"{data}: not a .json/.jsonl data file, a packed directory (no {MANIFEST}) nor a "
                          f"{TFDS_PREFIX}NAME dataset")


def _need_folder(image_folder, data) -> str:
    if image_folder is None:
        raise DataSourceError(f"{data}: JSON data needs an image folder")
    return os.fspath(image_folder)
