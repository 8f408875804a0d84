"""Where training records come from: one interface over LLaVA JSON, packed shards and TFDS.

    data spec                                   source
    llava_v1_5_mix665k.json / .jsonl (+ folder)  JsonSource: records + loose image files
    a directory holding manifest.json            PackedSource: `python -m llava_jax.data.pack` output
    tfds:NAME[/CONFIG][:VERSION][@SPLIT]         TfdsSource: a TFDS dataset in ArrayRecord format

Each may be local or on GCS (`gs://`, through etils.epath / fsspec). A source holds records in
a fixed order; `source[i]` is an `Example`: the LLaVA record (as records.py validates it),
one opener per image returning the decoded PIL image (and, where that is cheap, one returning its size
from the file's header alone, which packing plans with), and for a record with a `video` one opener
returning its sampled frames (decoded with PyAV, data/video.py). The pipeline plans, renders and
preprocesses Examples the same way whatever their source, so the same records in the same order
give the same batches, token ids, labels and pixels from every source. Sources hold images as they
were (encoded bytes), not preprocessed: one packed or TFDS dataset trains LLaVA-1.5 and LLaVA-NeXT
(anyres) models alike, the pipeline cutting each image by its size. Videos likewise: their file's bytes,
the frames sampled when read, so that any `num_frames` reads the same dataset.

Packed shards: the format `pack.py` writes, described in `packed_format.py` (ArrayRecord shards of
one record per chunk, `manifest.json`, `index.npz`). array_record's open-source reader opens local
files only; for remote shards (gs://) records are read by byte range through the index.

TFDS: `tfds.data_source` reads ArrayRecord datasets with numpy only; TensorFlow is never imported
(building one needs only tensorflow-datasets when the images are given as encoded bytes, as
`tfds_builder.py` does). The expected features are those `tfds_builder.LlavaRecords` writes:
`id`, `conversations` (JSON text), `image` (the original paths) and `images` (encoded bytes, or
decoded uint8 arrays as tfds.features.Image gives them); `video` (the original path, "" for none) and
`videos` (its file's bytes, none or one) when the dataset has them.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np
import PIL.Image

from llava_jax import anyres
from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data import video as video_lib
from llava_jax.data.packed_format import (INDEX, MANIFEST, DataSourceError, decode_example, physical_range,
                                          read_image_bytes, read_manifest, record_stats, strip_block_headers)
from llava_jax.data.records import Record, is_remote

logger = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"


# (num_frames, sampling) -> uint8 [F, H, W, 3]: a video's frames sampled uniformly (video.decode_frames).
VideoOpener = Callable[[int, str], np.ndarray]


@dataclasses.dataclass
class Example:
    """One record, a way to open each of its images (in `image` field order) and its video's frames (or None).

    `sizes`: one callable an image giving its (height, width) from the header alone, without decoding (PIL
    opens lazily: tens of microseconds against milliseconds for the pixels), or None where even that costs
    a request an image (loose files on gs://). The decoded image has that size: packing plans each anyres
    image's exact token count with it (pipeline.planned_sizes).
    """

    record: Record
    images: list[Callable[[], PIL.Image.Image]]
    sizes: list[Callable[[], tuple[int, int]]] | None = None
    video: VideoOpener | None = None


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

    def lengths(self, image_tokens: int | anyres.AnyresConfig) -> np.ndarray:
        """Signed length estimates [N] (the planner's convention: negative for text-only records).

        Like the original's `modality_lengths`: words of all turns plus the image tokens, `image_tokens`
        an image (or a geometry's `max_tokens`: what its largest image takes).
        """
        words, images, has_image = self.record_stats()
        if isinstance(image_tokens, anyres.AnyresConfig):
            # An anyres image's exact count needs its size, i.e. opening every image of the data set
            # (665K files, remote ones a request each) before the first step, for an estimate that only
            # orders samples inside a window (words already stand in for tokens). Every image counts as
            # the largest; truncation, which must be exact, counts each image as it is loaded.
            image_tokens = image_tokens.max_tokens
        return (words + image_tokens * images) * np.where(has_image, 1, -1)


def _stats_arrays(rows: Sequence[tuple[int, int, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray(rows, np.int64).reshape(-1, 3)
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(bool)


def _image_from_bytes(data: bytes, name: str) -> Callable[[], PIL.Image.Image]:
    return lambda: image_lib.load_image(io.BytesIO(data), name=name)


def _video_from_file(path: str) -> VideoOpener:
    return lambda num_frames, sampling: video_lib.decode_frames(path, num_frames, sampling)[0]


def _video_from_bytes(data: bytes, name: str) -> VideoOpener:
    """The frames of a video held as its file's bytes (packed and TFDS sources); errors name `name`."""

    def frames(num_frames: int, sampling: str) -> np.ndarray:
        # video.decode_frames reads a path; a temporary file costs one local write a sample.
        with tempfile.NamedTemporaryFile(suffix=os.path.splitext(name)[1]) as f:
            f.write(data)
            f.flush()
            try:
                return video_lib.decode_frames(f.name, num_frames, sampling)[0]
            except video_lib.VideoError as e:
                raise video_lib.VideoError(str(e).replace(repr(f.name), repr(name))) from None

    return frames


def header_size(file: str | os.PathLike | BinaryIO) -> tuple[int, int]:
    """(height, width) of an image file (a path or an open binary file) from its header; pixels not decoded."""
    with PIL.Image.open(file) as img:
        width, height = img.size
    return height, width


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
                video = records_lib.record_video(record)
                for rel in records_lib.record_images(record) + ([video] if video is not None else []):
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
        rels = records_lib.record_images(record)
        sizes = None if is_remote(self.image_folder) else [
            lambda rel=rel: header_size(records_lib.resolve_image_path(self.image_folder, rel)) for rel in rels]
        video = records_lib.record_video(record)
        return Example(record, [self._opener(rel) for rel in rels], sizes,
                       None if video is None else self._video_opener(video))

    def _opener(self, rel: str) -> Callable[[], PIL.Image.Image]:
        if is_remote(self.image_folder):
            return lambda: image_lib.load_image(io.BytesIO(read_image_bytes(self.image_folder, rel)),
                                                name=f"{self.image_folder.rstrip('/')}/{rel}")
        return lambda: image_lib.load_image(records_lib.resolve_image_path(self.image_folder, rel))

    def _video_opener(self, rel: str) -> VideoOpener:
        """A video inside the folder, as images are (`read_image_bytes`'s checks); PyAV reads gs:// itself."""
        if is_remote(self.image_folder):
            records_lib.check_relative_image_path(rel)
            return _video_from_file(f"{self.image_folder.rstrip('/')}/{os.path.normpath(rel)}")

        def frames(num_frames: int, sampling: str) -> np.ndarray:
            return _video_from_file(records_lib.resolve_image_path(self.image_folder, rel))(num_frames, sampling)

        return frames

    def record_stats(self):
        return _stats_arrays([record_stats(r) for r in self.records])


# ----------------------------------------------------------------------------- packed shards


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
        manifest = read_manifest(self.directory)
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
        video = records_lib.record_video(record)
        if len(paths) + (video is not None) != len(images):
            raise DataSourceError(f"{self.directory}: record {index} names {len(paths)} images"
                                  f"{' and a video' if video is not None else ''}, holds {len(images)} files")
        return Example(record, [_image_from_bytes(b, f"{self.directory}[{index}]:{p}") for b, p in zip(images, paths)],
                       [lambda b=b: header_size(io.BytesIO(b)) for b in images[:len(paths)]],
                       None if video is None else _video_from_bytes(images[-1], f"{self.directory}[{index}]:{video}"))


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
            # Registers the builder of our own datasets; lazy, as it imports tensorflow-datasets (optional).
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
        videos = list(ex.get("videos", ()))
        if videos:
            record["video"] = text(ex.get("video", b"")) or "video"
            images.append(videos[0])
        return record, images

    def __getitem__(self, index: int) -> Example:
        try:
            record, images = self._record(index)
        except (ValueError, KeyError, TypeError) as e:
            raise DataSourceError(f"{self.name}: record {index} is not a LLaVA record: {e}") from e
        problem = records_lib.validate_record(record)
        if problem is not None:
            raise DataSourceError(f"{self.name}: record {index}: {problem}")
        video = None
        if "video" in record:
            video = _video_from_bytes(bytes(images.pop()), f"{self.name}[{index}]:{record['video']}")
        openers, sizes = [], []
        for data, path in zip(images, records_lib.record_images(record)):
            where = f"{self.name}[{index}]:{path}"
            if isinstance(data, bytes):
                openers.append(_image_from_bytes(data, where))
                sizes.append(lambda b=data: header_size(io.BytesIO(b)))
            else:  # decoded by tfds.features.Image: uint8 [H, W, C]
                array = np.asarray(data)
                openers.append(lambda a=array: image_lib.to_rgb(PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)))
                sizes.append(lambda a=array: (int(a.shape[0]), int(a.shape[1])))
        return Example(record, openers, sizes, video)

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
