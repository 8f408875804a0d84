"""The Grain input pipeline: LLaVA records -> static-shape training batches.

    a source (sources.py: LLaVA JSON + image folder, packed ArrayRecord shards, or a TFDS dataset)
    -> per-epoch seeded plan of batches (shuffle; optionally grouped by modality and length)
    -> this process's rows -> render (templates.render: token ids + labels) -> load the images and
    resize/crop them to uint8 (image.preprocess_uint8) -> pad into a batch -> [multiprocess
    prefetch] -> normalise the pixels (image.normalize: together the same function inference
    uses, image.preprocess) -> stats and problem reports

Workers hand uint8 pixels to the consuming process, which normalises them through a 256-entry
table (exact: the same bits as normalising each pixel): a quarter of the bytes to copy between
processes, and cheaper than the float64 rescale each worker did before.

A batch is a dict of numpy arrays, every shape static:

    input_ids       int32   [B, T]   right-padded with tokenizer.pad_id
    labels          int32   [B, T]   HF convention: not shifted, IGNORE_INDEX (-100) where ignored
    attention_mask  int32   [B, T]   1 real token, 0 padding
    pixel_values    float32 [B, I, H, W, 3]  row b's images in the order of their placeholder runs;
                                             zeros where absent
    image_mask      bool    [B, I]   which images (anyres: tiles) are real
    image_index     int32   [B, T]   only when asked for (LLaVA-NeXT models): see below

T is `max_length`, or the smallest of `length_buckets` that fits the batch's longest row. I is
`max_images_per_sample`.

LLaVA-NeXT (anyres `geometry`): each image becomes its base and tiles (`anyres.layout`), its
`<image>` that image's own `num_tokens` image ids. `pixel_values` then holds tile slots, I =
`max_images_per_sample * geometry.max_patches` (static, as transformers pads every image to
max_patches), each row's images' tiles in placeholder order and zero (after normalisation too)
in unused slots; `image_mask` says which slots hold a real tile, and `image_index[b, t]` names
the row of row b's feature table (`anyres.table_index`: the tiles' features, then the newline)
that image token t takes (0 elsewhere). The flat geometry (LLaVA-1.5) gives exactly the batches
of `num_image_tokens=geometry.tile_tokens`.

Many images and video (LLaVA-OneVision, LLaVA-NeXT-Video; a geometry with `untiled_multi` / `video`). A record's
`image` may list several images, its `<image>` markers taking them in order; OneVision's rule leaves each image of
a record with several untiled (`anyres.tiled_images`: its base and one newline), as its train.py does. A record's
`video` (LLaVA-Video-178K's format: its `<image>` marker, or a `<video>` one, stands for it, records.py) is decoded
with PyAV, `num_frames` frames sampled uniformly (`frame_sampling`, data/video.py), each preprocessed to one tile
(`video_cfg`; normalised as transformers' video processors do, `video.normalization_table`) and expanded
to `geometry.video_tokens(num_frames)` tokens of `video_token_index`. A row's tile slots hold its images' tiles, then its videos' frames (I gains `num_frames`
slots unpacked), as `models.llava.place_images` lays them out. A geometry whose tokens mix feature rows
(`weighted`: anyres_max downscaling, OneVision's bilinear frame pooling) gives

    image_index     int32   [B, T, 4]  up to 4 feature-table rows each image or video token sums
    image_weight    float32 [B, T, 4]  their weights (`anyres.table_sources`; the model takes the pair)

A missing or unreadable video skips its sample like a bad image (problem kind "video").

Packing (`packing=True`): each row holds several samples end to end, first-fit by tokens and images
(`pack_rows`), and the batch gains

    segment_ids     int32   [B, T]   1, 2, ... the row's samples in order; 0 on padding
    positions       int32   [B, T]   each token's position in its own sample (0 at its start)

T is `row_length` (default `max_length`, each sample's truncation length; or a bucket), I is
`images_per_row` (x max_patches for anyres) and a row's images are
its samples' images in placeholder order, one feature table a row for `image_index`. The packing is
planned before the first batch from each record's rendered length (`planned_sizes`: one render of every
record's text; each anyres image counted exactly from its size in the file's header, or at the largest
count where the size cannot be read cheaply), so rows never overflow when the images are loaded, and the
plan below then shuffles and batches packed rows instead of records. Grain's
FirstFitPackIterDataset (grain 0.2.x) would carry the pixels (any N-D feature with its own length) and
resume (its state replays the parent from the last packed batch), but it packs the stream as it comes:
each process would yield a data-dependent number of batches (multi-host steps out of lock-step, no
epoch length for the LR schedule before the epoch is read), rows would mix epochs, and the anyres
image_index, relative to a row's images, would need rebuilding after it anyway.

Why a plan of batches rather than a filter after loading: every process then yields the same
number of batches per epoch (multi-host steps stay in lock-step), the epoch length is known in
advance (for the LR schedule), and the iterator state is one index, so resuming is exact. The
price: a sample that turns out to be unusable (missing or corrupt image, nothing left to supervise
after truncation) leaves an empty row in its batch, all labels -100 and attention_mask 0, which
the loss ignores; the last batch of an epoch (of each modality, when grouping) is also padded
with empty rows so that every record is seen exactly once per epoch. Empty rows are counted. A
batch can even be all empty (every sample in it skipped, or a shard's share of a short last global
batch): the loss must divide by max(1, supervised tokens).

Usage (the data may also be a packed directory or "tfds:NAME@split", see sources.py):
    ds = make_dataset("llava_v1_5_mix665k.json", "data/", tokenizer, "vicuna_v1", image_cfg,
                      num_image_tokens=576, image_token_index=32000, max_length=2048, batch_size=16)
    # LLaVA-NeXT: geometry=model_config.geometry in place of num_image_tokens, image_cfg with its pinpoints
    it = iter(ds)                      # a DataIterator; ds.batches_per_epoch steps per epoch
    batch = next(it)
    it.stats.metrics()                 # {"data/samples": ..., "data/skipped_image": ...}
    state = it.get_state()             # JSON-able: the training checkpoint saves it with ocp.args.JsonSave
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from llava_jax import anyres
from llava_jax.config import VideoProcessorConfig
from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data import sources as sources_lib
from llava_jax.data import templates
from llava_jax.data import video as video_lib

logger = logging.getLogger(__name__)

# Global batches per length-sorting window when grouping by length (the original sorts within one
# global batch; a wider window makes length buckets fit better and is still well mixed).
LENGTH_GROUP_WINDOW = 16
# Problem kinds. Records skipped for these reasons are counted in DataStats.
IMAGE, VIDEO, EMPTY, TOO_MANY_IMAGES, ERROR = "image", "video", "empty", "too_many_images", "error"
MAX_REPORTED_IDS = 100


class DataError(RuntimeError):
    """A sample that cannot be used, raised in strict mode (names the file, record and cause)."""


# ----------------------------------------------------------------------------- planning


def _to_shards(order: np.ndarray, batch_size: int, shard_count: int) -> np.ndarray:
    """Record indices (-1 padded) -> plan [G, S, B]: global batch g, shard s, row b.

    Shard s takes every S-th entry of each global batch, so the padding of a short last batch is
    spread evenly over the shards and length-sorted runs give every shard similar lengths.
    """
    per_global = batch_size * shard_count
    num = max(1, math.ceil(len(order) / per_global))
    padded = np.full(num * per_global, -1, np.int64)
    padded[: len(order)] = order
    return padded.reshape(num, batch_size, shard_count).transpose(0, 2, 1)


def epoch_plan(lengths: np.ndarray, *, batch_size: int, shard_count: int, seed: int, epoch: int,
               shuffle: bool = True, group_by_modality_length: bool = False) -> np.ndarray:
    """The batches of one epoch for all shards: int64 [G, S, B] record indices, -1 = empty row.

    Every record appears exactly once. `lengths` follows the original's modality_lengths
    convention: positive for samples with images, negative for text-only ones.

    With `group_by_modality_length`, a global batch holds only image or only text samples
    (each modality's last batch is padded with empty rows instead of mixing, as the original
    does), samples are sorted by length inside windows of LENGTH_GROUP_WINDOW global batches,
    and the order of the batches is shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if not group_by_modality_length:
        order = rng.permutation(n) if shuffle else np.arange(n)
        return _to_shards(order, batch_size, shard_count)
    per_global = batch_size * shard_count
    window = per_global * LENGTH_GROUP_WINDOW
    parts = []
    for members in (np.flatnonzero(lengths > 0), np.flatnonzero(lengths <= 0)):
        if len(members) == 0:
            continue
        if shuffle:
            members = rng.permutation(members)
        size = np.abs(lengths[members])
        # Longest first inside each window; stable, so ties keep the shuffled order.
        order = np.concatenate([members[i : i + window][np.argsort(-size[i : i + window], kind="stable")]
                                for i in range(0, len(members), window)])
        parts.append(_to_shards(order, batch_size, shard_count))
    plan = np.concatenate(parts)
    return plan[rng.permutation(len(plan))] if shuffle else plan


def num_global_batches(lengths: np.ndarray, *, batch_size: int, shard_count: int,
                       group_by_modality_length: bool) -> int:
    """Batches per epoch (the same for every shard); equals len(epoch_plan(...))."""
    per_global = batch_size * shard_count
    if not group_by_modality_length:
        return max(1, math.ceil(len(lengths) / per_global))
    n_image = int(np.sum(lengths > 0))
    return max(1, math.ceil(n_image / per_global) + math.ceil((len(lengths) - n_image) / per_global))


# ----------------------------------------------------------------------------- packing

# Rows a first-fit packer keeps open: a sample goes to the first open row it fits, and the fullest row
# closes when a new one would exceed this. The cost is linear in it; 64 fills about 96% of a long-tailed
# mix's tokens (tests/test_data_packing.py), 665K records in about 3 s.
PACK_OPEN_ROWS = 64
# Threads reading records (and anyres image headers) for the packing plan, and records a thread pool's chunk.
PLAN_READ_THREADS, PLAN_CHUNK = 16, 1024


def video_images(geometry: anyres.AnyresConfig, num_frames: int) -> int:
    """Image slots (of `max_patches` tiles each) a video of `num_frames` frames counts as when packing."""
    return math.ceil(num_frames / geometry.max_patches) if num_frames else 0


def planned_sizes(source: sources_lib.Source, tokenizer: Any, template: str, geometry: anyres.AnyresConfig, *,
                  image_token_index: int, max_length: int, max_images: int, num_frames: int = 0,
                  video_token_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 [N], images int64 [N]): upper bounds of each record's rendered row, for packing.

    Tokens are the rendered length before truncation, capped at `max_length`: exact for LLaVA-1.5 images and
    for anyres ones whose size the source reads from the file's header (`Example.sizes`: local files, packed
    and TFDS records; `anyres.layout(geometry, size).num_tokens`, as the loader counts the decoded image); an
    upper bound for an anyres image whose size it cannot read cheaply (loose files on gs://: a request an
    image) or whose header is unreadable: the geometry's largest, `max_tokens`. Images are all the record's
    images (truncation may keep fewer). A record that will be skipped (more than `max_images` images, nothing
    to render, unreadable) plans as (0, 0). Costs one render of every record's text (packed and TFDS sources
    read each record's payload) and, for anyres, one header read an image (tens to a few hundred microseconds
    a local PNG or JPEG, 1-3% of decoding it: BENCHMARKS.md, "Packing"), the reads in PLAN_READ_THREADS
    threads ahead of the renders. OneVision's untiled images (a record with several) count their exact
    `tile_tokens + 1`, no header read; a video counts `geometry.video_tokens(num_frames)` tokens and
    `video_images` images (its frames' slots).
    """
    chosen = templates.get_template(template)
    n = len(source)
    tokens, images = np.zeros(n, np.int64), np.zeros(n, np.int64)

    def read(index: int) -> tuple[records_lib.Record, int | list[int]] | None:
        try:
            example = source[index]
            count = len(records_lib.record_images(example.record))
            if count > max_images:
                return None
            if geometry.merge == "flat":
                per_image = geometry.tile_tokens
            elif not anyres.tiled_images(geometry, count):  # OneVision: a base and a newline, whatever the size
                per_image = anyres.layout(geometry, (geometry.tile_size,) * 2, tiled=False).num_tokens
            else:
                per_image = [_planned_image_tokens(geometry, example, k) for k in range(count)]
            return example.record, per_image
        except Exception:  # pylint: disable=broad-except  # the loader meets it again and reports it
            return None

    # Threads read the records and image headers (waiting on a disk, or a request a record from a packed
    # source on gs://) a chunk ahead of the renders, which hold the GIL.
    with concurrent.futures.ThreadPoolExecutor(PLAN_READ_THREADS) as pool:
        pending = pool.map(read, range(0, min(n, PLAN_CHUNK)))
        for start in range(0, n, PLAN_CHUNK):
            current, after = pending, range(start + PLAN_CHUNK, min(n, start + 2 * PLAN_CHUNK))
            pending = pool.map(read, after)
            for index, item in zip(range(start, min(n, start + PLAN_CHUNK)), current):
                if item is None:
                    continue
                record, per_image = item
                video = records_lib.record_video(record) is not None
                try:
                    rendered = templates.render(records_lib.render_conversations(record), chosen, tokenizer,
                                                image_token_index=image_token_index, num_image_tokens=per_image,
                                                video_token_index=video_token_index,
                                                num_video_tokens=[geometry.video_tokens(num_frames)] if video else ())
                except Exception:  # pylint: disable=broad-except  # the loader meets it again and reports it
                    continue
                tokens[index] = min(len(rendered.input_ids), max_length)
                images[index] = len(records_lib.record_images(record)) + (video_images(geometry, num_frames)
                                                                           if video else 0)
    return tokens, images


def _planned_image_tokens(geometry: anyres.AnyresConfig, example: sources_lib.Example, k: int) -> int:
    """Image k's token count from its header's size, or the geometry's largest where that is not to be had."""
    if example.sizes is None:
        return geometry.max_tokens
    try:
        return anyres.layout(geometry, example.sizes[k]()).num_tokens
    except Exception:  # pylint: disable=broad-except  # unreadable: the loader skips it; the bound is safe anyway
        return geometry.max_tokens


def pack_rows(tokens: np.ndarray, images: np.ndarray, order: np.ndarray, *, max_length: int, max_images: int,
              open_rows: int = PACK_OPEN_ROWS) -> list[np.ndarray]:
    """First-fit packing of records `order` (sizes `tokens`, `images`) into rows of `max_length` tokens and
    `max_images` images; rows in the order they close, each its record indices in placement order.

    A record goes to the first of the `open_rows` open rows with room for both its tokens and its images;
    none has room: a new row opens, and the fullest closes if there are more than `open_rows`. The rows
    still open at the end are the emptiest: their records are packed again, largest first, into fewer.
    """
    if np.any(tokens[order] > max_length) or np.any(images[order] > max_images):
        raise ValueError(f"a record is larger than a row of {max_length} tokens and {max_images} images")
    closed, still_open = _first_fit(tokens, images, order, max_length, max_images, open_rows)
    rest = np.asarray([r for row in still_open for r in row], np.int64)
    rest = rest[np.argsort(-tokens[rest], kind="stable")]
    tail, last = _first_fit(tokens, images, rest, max_length, max_images, max(1, len(still_open)))
    return closed + tail + last


def _first_fit(tokens, images, order, max_length: int, max_images: int,
               open_rows: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(closed rows, rows still open) of first-fit packing with `open_rows` open rows (pack_rows)."""
    free_t = np.zeros(open_rows, np.int64)  # the open rows' room, in the order they opened
    free_i = np.zeros(open_rows, np.int64)
    members: list[list[int]] = []  # records of the open rows, in the order they opened
    closed: list[np.ndarray] = []
    for r in order:
        t, i = tokens[r], images[r]
        n = len(members)
        fits = np.flatnonzero((free_t[:n] >= t) & (free_i[:n] >= i))
        if len(fits):
            k = int(fits[0])
        else:
            if n == open_rows:  # the fullest row closes: the others may still take a record
                j = int(np.argmin(free_t))
                closed.append(np.asarray(members.pop(j), np.int64))
                free_t[j:-1], free_i[j:-1] = free_t[j + 1:].copy(), free_i[j + 1:].copy()
            k = len(members)
            members.append([])
            free_t[k], free_i[k] = max_length, max_images
        members[k].append(int(r))
        free_t[k] -= t
        free_i[k] -= i
    return closed, [np.asarray(m, np.int64) for m in members]


def images_per_row(geometry: anyres.AnyresConfig, max_length: int, max_images_per_sample: int,
                   max_images_per_row: int | None) -> int:
    """Images a packed row holds at most (its image slots: that many, x `max_patches` tiles for anyres).

    Default (None or 0): as many images of the largest count as `max_length` tokens hold (`tile_tokens` an
    image, anyres `max_tokens`), so that LLaVA-1.5 images never limit a row before tokens do. Anyres images
    are planned at their exact counts, most below `max_tokens`: there the default can fill a row's image slots
    before its tokens, and a larger value packs tighter at the price of more (mostly empty) slots through the
    vision tower, whose batch is static.
    """
    per_image = geometry.tile_tokens if geometry.merge == "flat" else geometry.max_tokens
    if not max_images_per_row:
        return max(max_images_per_sample, max_length // per_image)
    if max_images_per_row < max_images_per_sample:
        raise ValueError(f"max_images_per_row={max_images_per_row} is less than max_images_per_sample="
                         f"{max_images_per_sample}: a row must hold the largest sample")
    return max_images_per_row


def plan_packing(source: sources_lib.Source, tokenizer: Any, template: str, geometry: anyres.AnyresConfig, *,
                 image_token_index: int, max_length: int, max_images_per_sample: int, images_per_row: int, seed: int,
                 shuffle: bool, num_frames: int = 0, video_token_index: int | None = None,
                 row_length: int | None = None,
                 sizes: tuple[np.ndarray, np.ndarray] | None = None) -> tuple["PackedRows", np.ndarray]:
    """(the rows, the planned tokens [N]): `make_dataset(..., packing=True)`'s packing of `source` (and what
    bench/packing.py measures): `planned_sizes` (each record truncated at `max_length`; or `sizes`, what it
    returned for these arguments before), then `pack_rows` into rows of `row_length` tokens (default
    `max_length`) over a seeded order of the records."""
    tokens, counts = sizes or planned_sizes(
        source, tokenizer, template, geometry, image_token_index=image_token_index, max_length=max_length,
        max_images=max_images_per_sample, num_frames=num_frames, video_token_index=video_token_index)
    # One packing for every epoch (each epoch shuffles the rows): the epoch length is then known before
    # the first step (the LR schedule) and the same on every process (all plan the same rows), and the
    # iterator state stays one index. Samples in a row never see each other, so a fixed packing only
    # decides which samples share a batch.
    # A stream of its own: the epoch plans draw from [seed, epoch].
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(source)) if shuffle else np.arange(len(source))
    rows = pack_rows(tokens, counts, order, max_length=row_length or max_length, max_images=images_per_row)
    return PackedRows.of(rows), tokens


def bucket_list(length_buckets: Sequence[int] | None, max_length: int) -> list[int]:
    """The allowed values of T: `length_buckets` below `max_length`, sorted, and `max_length`."""
    return sorted({int(b) for b in length_buckets or () if b < max_length} | {max_length})


def bucket_length(buckets: Sequence[int], longest: int) -> int:
    """A batch's T: the smallest of `bucket_list`'s buckets that holds its longest row."""
    return buckets[bisect.bisect_left(buckets, longest)]


@dataclasses.dataclass
class PackedRows:
    """Records packed into rows: row r holds records `flat[offsets[r]:offsets[r + 1]]` (CSR: cheap to pickle)."""

    flat: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [R + 1]

    @classmethod
    def of(cls, rows: Sequence[np.ndarray]) -> "PackedRows":
        """From a list of rows of record indices."""
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.flat[self.offsets[row]:self.offsets[row + 1]]


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class DataStats:
    """What the pipeline delivered and what it had to leave out, for logs and metrics.

    Counts are exact and survive checkpoint/restore (they are part of the iterator state).
    `problems` keeps the first MAX_REPORTED_IDS (id, kind, message) reports; every report is also
    logged as a warning when its batch is consumed.
    """

    batches: int = 0
    samples: int = 0
    empty_rows: int = 0  # all rows without a sample, including those of skipped samples
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[list[str]] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Records skipped so far, all kinds."""
        return sum(self.skipped.values())

    def add_batch(self, num_samples: int, num_rows: int, empty_rows: int | None = None) -> None:
        """Accounts one batch of `num_rows` rows holding `num_samples` samples (packed rows: several a row, and
        `empty_rows` rows without any; unpacked: one a row, the rest empty)."""
        self.batches += 1
        self.samples += num_samples
        self.empty_rows += num_rows - num_samples if empty_rows is None else empty_rows

    def add_problem(self, record_id: str, kind: str, message: str) -> None:
        """Accounts one skipped record."""
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if len(self.problems) < MAX_REPORTED_IDS:
            self.problems.append([record_id, kind, message])

    def metrics(self) -> dict[str, int]:
        """Flat counters, for the train loop's metrics."""
        out = {"data/batches": self.batches, "data/samples": self.samples, "data/empty_rows": self.empty_rows,
               "data/skipped": self.num_skipped}
        out.update({f"data/skipped_{kind}": n for kind, n in sorted(self.skipped.items())})
        return out

    def summary(self) -> str:
        """One human-readable paragraph."""
        text = f"{self.samples} samples in {self.batches} batches"
        if self.empty_rows:
            text += (f", {self.empty_rows} rows left empty (the loss ignores them: each epoch's last batch is "
                     "filled up to the batch size, and a skipped sample leaves its row empty)")
        text += f"; skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items())) + ")"
        if self.problems:
            shown = "; ".join(f"{i} [{k}] {m}" for i, k, m in self.problems[:10])
            more = self.num_skipped - min(10, len(self.problems))
            text += f": {shown}" + (f"; and {more} more" if more > 0 else "")
        return text

    def state(self) -> dict[str, Any]:
        """JSON-serialisable copy (goes into the iterator state)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "DataStats":
        """Inverse of `state`."""
        return cls(**{k: v for k, v in state.items()})


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass
class _Sample:
    record_id: str
    input_ids: np.ndarray  # int32 [T_i]
    labels: np.ndarray  # int32 [T_i]
    pixel_values: np.ndarray  # uint8 [n, H, W, 3] images (anyres: tiles), normalised by the consuming process
    sizes: list[tuple[int, int]]  # (height, width) of each kept image (anyres only: their layouts' key)
    videos: list[np.ndarray] = dataclasses.field(default_factory=list)  # uint8 [F, H, W, 3] each kept video
    tiled: bool = True  # whether its images are tiled (OneVision: not when the record has several)


@dataclasses.dataclass
class _Problem:
    record_id: str
    kind: str
    message: str


_EMPTY_ROW = None  # a row of the plan that holds no record


class _RowLoader:
    """map_with_index transform: global row index -> _Sample | _Problem | None (empty row); with `packed`
    rows, a list of the row's _Sample | _Problem (None for an empty row).

    Plain picklable object: Grain sends it to its worker processes.
    """

    def __init__(self, source, lengths, *, tokenizer, template_name, image_cfg,
                 num_image_tokens, geometry, image_token_index, max_length, max_images, batch_size, shard_index,
                 shard_count, seed, shuffle, group_by_modality_length, strict, packed: PackedRows | None = None,
                 video_cfg=None, num_frames: int = 0, frame_sampling: str = "transformers",
                 video_token_index: int | None = None):
        self.source, self.packed = source, packed
        self.video_cfg, self.num_frames, self.frame_sampling = video_cfg, num_frames, frame_sampling
        self.video_token_index = video_token_index
        # Packed: the plan shuffles and batches the rows (all the same "length"), not the records.
        self.lengths = lengths if packed is None else np.ones(len(packed), np.int64)
        self.tokenizer, self.template_name, self.image_cfg = tokenizer, template_name, image_cfg
        self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
        self.geometry = geometry  # an anyres AnyresConfig, or None: every image num_image_tokens
        self.max_length, self.max_images = max_length, max_images
        self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
        self.seed, self.shuffle, self.group = seed, shuffle, group_by_modality_length
        self.strict = strict
        self.rows_per_epoch = batch_size * num_global_batches(
            self.lengths, batch_size=batch_size, shard_count=shard_count, group_by_modality_length=self.group)
        self._init_cache()

    def _init_cache(self):
        self._lock = threading.Lock()
        self._plans: dict[int, np.ndarray] = {}
        self._template = templates.get_template(self.template_name)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_plans", "_template"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def _plan(self, epoch: int) -> np.ndarray:
        """This shard's rows of epoch `epoch`: [G, B]. Cached: read threads share it."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = epoch_plan(self.lengths, batch_size=self.batch_size, shard_count=self.shard_count,
                                  seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                  group_by_modality_length=self.group)[:, self.shard_index]
                self._plans = {epoch: plan, **{e: p for e, p in self._plans.items() if e == epoch - 1}}
            return plan

    def record_index(self, row: int) -> int:
        """Record index of a global row index (packed: index of a packed row; -1 for an empty row)."""
        epoch, r = divmod(row, self.rows_per_epoch)
        return int(self._plan(epoch)[r // self.batch_size, r % self.batch_size])

    def __call__(self, row: int, _: Any) -> _Sample | _Problem | list[_Sample | _Problem] | None:
        index = self.record_index(row)
        if index < 0:
            return _EMPTY_ROW
        if self.packed is not None:
            return [self._sample(int(i)) for i in self.packed[index]]
        return self._sample(index)

    def _sample(self, index: int) -> _Sample | _Problem:
        record = None
        try:
            example = self.source[index]
            record = example.record
            return self._load(example)
        except MemoryError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            kind = getattr(e, "kind", ERROR)
            record_id = record["id"] if record is not None else f"#{index}"
            locate = getattr(self.source, "locate", None)  # JSON files know each record's file and line
            where = (locate(index) if locate and record is not None
                     else f"{self.source.name}: record {index} (id {record_id!r})")
            if self.strict and kind != EMPTY:
                raise DataError(f"{where}: {e}") from e
            # Never crash a worker: the problem travels with the batch and is reported by the
            # consuming process (counts stay exact with any number of workers).
            message = str(e) if isinstance(e, _Skip) else f"{type(e).__name__}: {e}"
            return _Problem(str(record_id), kind, message)

    def _load(self, example: sources_lib.Example) -> _Sample:
        record = example.record
        images = records_lib.record_images(record)
        if len(images) > self.max_images:
            raise _Skip(TOO_MANY_IMAGES, f"{len(images)} images, more than max_images_per_sample="
                        f"{self.max_images}")
        if example.video is not None and not self.num_frames:
            raise _Skip(VIDEO, "a video record, but this pipeline takes no video (num_frames=0: the model's "
                        "geometry has no video pooling)")
        if self.geometry is not None:
            return self._load_anyres(example)
        rendered = self._render(record, self.num_image_tokens)
        # Truncation may drop whole images from the end, never part of one.
        pixels = np.zeros((rendered.num_images, self.image_cfg.crop_size, self.image_cfg.crop_size, 3), np.uint8)
        for k in range(rendered.num_images):
            pixels[k] = self._pixels(_image_problem(example.images[k]))
        return _Sample(str(record["id"]), np.asarray(rendered.input_ids, np.int32),
                       np.asarray(rendered.labels, np.int32), pixels, [])

    def _load_anyres(self, example: sources_lib.Example) -> _Sample:
        # An image's token count depends on its size: every image is opened before rendering, so that
        # truncation (which drops whole images from the end) counts each one exactly.
        opened = [_image_problem(open_image) for open_image in example.images]
        sizes = [(im.height, im.width) for im in opened]
        # OneVision tiles a lone image only; the record's images decide, as its train.py's `len(image_file) > 1`.
        tiled = anyres.tiled_images(self.geometry, len(opened))
        frames = []
        if example.video is not None:
            frames = [_video_problem(lambda: video_lib.preprocess_frames_uint8(
                example.video(self.num_frames, self.frame_sampling), self.video_cfg))]
        rendered = self._render(example.record, [anyres.layout(self.geometry, s, tiled).num_tokens for s in sizes],
                                [self.geometry.video_tokens(len(f)) for f in frames])
        kept = opened[:rendered.num_images]
        c = self.image_cfg.crop_size
        tiles = [self._pixels(im, tiled) for im in kept]
        pixels = np.concatenate(tiles) if tiles else np.zeros((0, c, c, 3), np.uint8)
        return _Sample(str(example.record["id"]), np.asarray(rendered.input_ids, np.int32),
                       np.asarray(rendered.labels, np.int32), pixels, sizes[:rendered.num_images],
                       frames[:rendered.num_videos], tiled)

    def _render(self, record, num_image_tokens, num_video_tokens=()) -> templates.RenderedSample:
        try:
            return templates.render(records_lib.render_conversations(record), self._template, self.tokenizer,
                                    image_token_index=self.image_token_index,
                                    num_image_tokens=num_image_tokens, max_length=self.max_length,
                                    video_token_index=self.video_token_index, num_video_tokens=num_video_tokens)
        except templates.EmptySampleError as e:
            raise _Skip(EMPTY, str(e)) from e

    def _pixels(self, image, tiled: bool = True) -> np.ndarray:
        """uint8 [crop, crop, 3] of a PIL image (anyres: its [P, crop, crop, 3] base and tiles; untiled: [1, ...])."""
        return _image_problem(lambda: image_lib.preprocess_uint8(image, self.image_cfg, tiled))


def _image_problem(fn):
    """fn(), an unreadable image (missing, corrupt, a path outside the folder) made a skipped sample."""
    try:
        return fn()
    except (records_lib.ImagePathError, image_lib.ImageError, OSError) as e:
        raise _Skip(IMAGE, str(e)) from e


def _video_problem(fn):
    """fn(), an unreadable video (missing, corrupt, too few frames, a path outside the folder) made a skipped
    sample."""
    try:
        return fn()
    except (records_lib.ImagePathError, video_lib.VideoError, OSError) as e:
        raise _Skip(VIDEO, str(e)) from e


class _Skip(Exception):
    """Internal: why a sample is skipped (kind is one of the problem kinds)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _row_sources(geometry: anyres.AnyresConfig, row: Sequence[_Sample], slots: int,
                 crop: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weights) [n, CORNERS] of a batch row's image tokens then video tokens (`anyres.table_sources`)."""
    # Flat images have no size that matters: one tile each.
    sizes = [size for s in row for size in (s.sizes or [(crop, crop)] * len(s.pixel_values))]
    # A packed OneVision row's samples tile their own images (a lone image tiled, several untiled).
    tiled = [s.tiled for s in row for _ in (s.sizes or s.pixel_values)]
    return anyres.table_sources(geometry, sizes, slots, tiled=tiled, videos=[len(v) for s in row for v in s.videos])


class _Collate:
    """batch_fn: B rows -> one static-shape batch (plus private keys for the stats).

    `slots` image slots a row (max_images, or max_images * max_patches tile slots for anyres, plus the video
    frames'); with a `geometry` (given when the batch carries image_index) each row's image and video tokens get
    their table rows (and weights, `image_weight`, for a weighted geometry). `packed`: rows are lists of samples,
    laid end to end, and the batch gains segment_ids and positions.
    """

    def __init__(self, *, pad_id: int, max_length: int, buckets: Sequence[int], slots: int, crop_size: int,
                 image_token_index: int, geometry: anyres.AnyresConfig | None, packed: bool = False,
                 video_token_index: int | None = None):
        self.pad_id, self.max_length, self.buckets = pad_id, max_length, list(buckets)
        self.slots, self.crop_size = slots, crop_size
        self.image_token_index, self.geometry = image_token_index, geometry
        # -1 matches no token: no video placeholders without a video token.
        self.video_token_index = -1 if video_token_index is None else video_token_index
        self.packed = packed

    def __call__(self, rows: Sequence[Any]) -> dict[str, Any]:
        items = [row if self.packed else [row] for row in rows]  # each row: its items, in order
        items = [[x for x in row or () if x is not None] for row in items]
        samples = [[x for x in row if isinstance(x, _Sample)] for row in items]
        longest = max([sum(len(s.input_ids) for s in row) for row in samples], default=1)
        if longest > self.max_length:  # the packer's sizes are upper bounds: a bug, never the data
            raise RuntimeError(f"a packed row of {longest} tokens, more than its {self.max_length}")
        t = bucket_length(self.buckets, longest) if self.buckets else self.max_length
        b, c = len(rows), self.crop_size
        batch = {
            "input_ids": np.full((b, t), self.pad_id, np.int32),
            "labels": np.full((b, t), templates.IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "pixel_values": np.zeros((b, self.slots, c, c, 3), np.uint8),  # normalised by DataIterator
            "image_mask": np.zeros((b, self.slots), bool),
            "_frame_mask": np.zeros((b, self.slots), bool),  # video frames' slots: their own normalisation
        }
        weighted = self.geometry is not None and self.geometry.weighted
        if weighted:
            batch["image_index"] = np.zeros((b, t, anyres.CORNERS), np.int32)
            batch["image_weight"] = np.zeros((b, t, anyres.CORNERS), np.float32)
        elif self.geometry is not None:
            batch["image_index"] = np.zeros((b, t), np.int32)
        if self.packed:
            batch["segment_ids"] = np.zeros((b, t), np.int32)
            batch["positions"] = np.zeros((b, t), np.int32)
        for i, row in enumerate(samples):
            at = 0
            # The row's images' tiles, then its videos' frames (place_images' layout), whichever samples hold them.
            tiles = [s.pixel_values for s in row] + [v for s in row for v in s.videos]
            used = sum(len(x) for x in tiles)
            if used > self.slots:
                raise RuntimeError(f"a packed row of {used} image slots, more than {self.slots}")
            if tiles:
                batch["pixel_values"][i, :used] = np.concatenate(tiles)
                batch["image_mask"][i, :used] = True
                batch["_frame_mask"][i, sum(len(s.pixel_values) for s in row):used] = True
            for k, s in enumerate(row):
                n = len(s.input_ids)
                batch["input_ids"][i, at:at + n] = s.input_ids
                batch["labels"][i, at:at + n] = s.labels
                batch["attention_mask"][i, at:at + n] = 1
                if self.packed:
                    batch["segment_ids"][i, at:at + n] = k + 1
                    batch["positions"][i, at:at + n] = np.arange(n)
                at += n
            if self.geometry is not None and row:
                # One feature table a row: image tokens in placeholder order, then video tokens (table_sources).
                ids = batch["input_ids"][i, :at]
                media = np.concatenate([np.flatnonzero(ids == self.image_token_index),
                                        np.flatnonzero(ids == self.video_token_index)])
                rows_, weights = _row_sources(self.geometry, row, self.slots, c)
                if weighted:
                    batch["image_index"][i, media], batch["image_weight"][i, media] = rows_, weights
                else:
                    batch["image_index"][i, media] = rows_[:, 0]
        batch["_num_samples"] = np.int32(sum(len(row) for row in samples))
        batch["_empty_rows"] = np.int32(sum(not row for row in samples))
        batch["_problems"] = [(x.record_id, x.kind, x.message) for row in items for x in row
                              if isinstance(x, _Problem)]
        ids = [[s.record_id for s in row] for row in samples]
        batch["_ids"] = ids if self.packed else [row[0] if row else None for row in ids]
        return batch


# ----------------------------------------------------------------------------- dataset / iterator


class DataIterator(grain.DatasetIterator):
    """The pipeline's iterator: yields the batches, keeps DataStats, saves/restores exactly.

    Its state (`get_state`, JSON-serialisable) holds Grain's position and the stats; the training
    checkpoint saves it as JSON beside the train state (train/checkpoint.py):

        ckpt.save(step, args=ocp.args.Composite(..., data=ocp.args.JsonSave(it.get_state())))

    and `set_state` puts a fresh iterator back at that position on resume.
    """

    def __init__(self, parent: grain.DatasetIterator, batches_per_epoch: int,
                 image_cfg: image_lib.ImageProcessorConfig | None = None, video_cfg: VideoProcessorConfig | None = None):
        super().__init__(parent)
        self.stats = DataStats()
        self.batches_per_epoch = batches_per_epoch
        # None: leave pixel_values uint8 (for a consumer that normalises on device).
        self._table = None if image_cfg is None else image_lib.normalization_table(image_cfg)
        # Frames as transformers' video processors normalise them (fused in float32: an ulp from the images' table
        # on some levels), as inference's load_video does.
        self._frame_table = (None if image_cfg is None or video_cfg is None
                             else video_lib.normalization_table(video_cfg))
        # Record id of each row of the last batch (None for an empty row; packed: a list a row, of its
        # segments' ids in order): which samples a step saw.
        self.last_record_ids: list[str | None] = []
        self._summarised = False

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._parent)
        except StopIteration:
            if not self._summarised:
                logger.info("data: end of data: %s", self.stats.summary())
                self._summarised = True
            raise
        num_samples, problems = int(batch.pop("_num_samples")), batch.pop("_problems")
        empty_rows = int(batch.pop("_empty_rows"))
        self.last_record_ids = batch.pop("_ids")
        frames = batch.pop("_frame_mask")
        for record_id, kind, message in problems:
            self.stats.add_problem(record_id, kind, message)
            # Each one by id while they are few, then a reminder now and then; all are counted.
            if self.stats.num_skipped <= MAX_REPORTED_IDS:
                logger.warning("data: skipped record %s (%s): %s", record_id, kind, message)
            elif self.stats.num_skipped % 1000 == 0:
                logger.warning("data: %d records skipped so far: %s", self.stats.num_skipped, self.stats.skipped)
        self.stats.add_batch(num_samples, len(batch["input_ids"]), empty_rows)
        if self._table is not None:  # real images normalised, absent ones stay zeros
            pixels, out = batch["pixel_values"], np.zeros(batch["pixel_values"].shape, np.float32)
            for b, i in zip(*np.nonzero(batch["image_mask"])):  # image by image: stays in cache, 2x faster
                table = self._frame_table if frames[b, i] else self._table
                image_lib.normalize(pixels[b, i], None, table, out=out[b, i])
            batch["pixel_values"] = out
        if self.stats.batches % self.batches_per_epoch == 0:
            logger.info("data: epoch %d done: %s", self.stats.batches // self.batches_per_epoch,
                        self.stats.summary())
        return batch

    def get_state(self) -> dict[str, Any]:
        """Grain position plus stats; JSON-serialisable."""
        return {"grain": self._parent.get_state(), "stats": self.stats.state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes exactly where `state` was taken."""
        self._parent.set_state(state["grain"])
        self.stats = DataStats.from_state(state["stats"])


class LlavaIterDataset(grain.IterDataset):
    """The pipeline as a Grain IterDataset; iterating it gives a DataIterator.

    Attributes:
      batches_per_epoch: batches each process yields per epoch (the same on every process).
      num_records: records in the source, all shards together.
      source: the sources.Source read.
    """

    def __init__(self, parent: grain.IterDataset, *, batches_per_epoch: int, num_records: int,
                 source: sources_lib.Source | None = None, image_cfg: image_lib.ImageProcessorConfig | None = None,
                 video_cfg: VideoProcessorConfig | None = None):
        super().__init__(parent)
        self.batches_per_epoch, self.num_records = batches_per_epoch, num_records
        self.source, self.image_cfg, self.video_cfg = source, image_cfg, video_cfg

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__(), self.batches_per_epoch, self.image_cfg, self.video_cfg)

    def __str__(self) -> str:
        return f"LlavaIterDataset(batches_per_epoch={self.batches_per_epoch})"


def _allow_unparsed_absl_flags() -> None:
    # Grain 0.2.18's mp_prefetch reads an absl flag, which raises UnparsedFlagAccessError in a
    # program that does not run absl.app (google/grain#1355, fixed after 0.2.18). Under absl.app
    # the flags are parsed already and this does nothing.
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    # LLaMA's sentencepiece has no pad piece (-1); the original LLaVA pads with unk (0).
    return int(pad) if pad is not None and pad >= 0 else 0


def _geometry(num_image_tokens: int | None, geometry: anyres.AnyresConfig | None,
              image_cfg: image_lib.ImageProcessorConfig) -> anyres.AnyresConfig:
    """The pipeline's geometry from make_dataset's arguments (exactly one of the two), checked against image_cfg."""
    if (num_image_tokens is None) == (geometry is None):
        raise ValueError("make_dataset takes exactly one of num_image_tokens (LLaVA-1.5) and geometry; found "
                         f"{num_image_tokens!r} and {geometry!r}")
    if geometry is None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1; found {num_image_tokens}")
        # Only the count matters to a one-tile layout: num_image_tokens vectors a tile.
        return anyres.AnyresConfig.flat(image_cfg.crop_size, 1, num_image_tokens - 1)
    want = image_cfg.anyres_config(geometry.grid, geometry.extra_tokens)
    same = (want.tile_size, want.resolutions()) == (geometry.tile_size, geometry.resolutions())
    if geometry.merge != "flat" and not same:
        raise ValueError(f"the image settings cut tiles of {want.tile_size} px from pinpoints {want.resolutions()} "
                         f"(height, width), the model's geometry {geometry.tile_size} px from {geometry.resolutions()}")
    if geometry.merge == "flat" and image_cfg.is_anyres:
        raise ValueError("a flat (LLaVA-1.5) geometry needs image settings without grid_pinpoints")
    if geometry.untiled_multi and not image_cfg.onevision:
        raise ValueError("a OneVision geometry (several images of a record untiled) needs OneVision image settings "
                         "(ImageProcessorConfig.onevision)")
    return geometry


def video_settings(image_cfg: image_lib.ImageProcessorConfig, geometry: anyres.AnyresConfig,
                   num_frames: int) -> VideoProcessorConfig:
    """The frames' settings a model's images imply: OneVision's (`bilinear` pooling: resized to a tile, no crop) or
    NeXT-Video's (shortest side to the images' size, centre crop), normalised as the images, `num_frames` frames."""
    return VideoProcessorConfig.from_image_processor(image_cfg, geometry.video, num_frames)


def _check_video(geometry: anyres.AnyresConfig, image_cfg: image_lib.ImageProcessorConfig,
                 video_cfg: VideoProcessorConfig | None, num_frames: int, video_token_index: int | None,
                 frame_sampling: str) -> VideoProcessorConfig | None:
    """make_dataset's video settings, checked: frames fill tile slots normalised as the images are."""
    if frame_sampling not in video_lib.SAMPLINGS:
        raise ValueError(f"frame_sampling {frame_sampling!r} is not one of {video_lib.SAMPLINGS}")
    if not num_frames:
        return None
    if num_frames < 0 or not geometry.video or video_token_index is None:
        raise ValueError(f"num_frames={num_frames} needs a geometry with video pooling (found "
                         f"{geometry.video or 'none'}) and a video_token_index (found {video_token_index})")
    video_cfg = video_cfg or video_settings(image_cfg, geometry, num_frames)
    if video_cfg.frame_size != image_cfg.crop_size:
        raise ValueError(f"video frames of {video_cfg.frame_size} px cannot fill tile slots of "
                         f"{image_cfg.crop_size} px")
    norm = lambda c: (c.mean, c.std, c.rescale_factor)  # noqa: E731
    if norm(video_cfg) != norm(image_cfg):
        raise ValueError(f"video frames normalised with mean, std, rescale {norm(video_cfg)}, the images with "
                         f"{norm(image_cfg)}: a batch's slots are normalised alike")
    return video_cfg


def make_dataset(data_path: str | os.PathLike | Sequence[str | os.PathLike] | sources_lib.Source,
                 image_folder: str | os.PathLike | None, tokenizer: Any, template: str,
                 image_cfg: image_lib.ImageProcessorConfig, *,
                 num_image_tokens: int | None = None, geometry: anyres.AnyresConfig | None = None,
                 image_index: bool | None = None, image_token_index: int, max_length: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 length_buckets: Sequence[int] | None = None, group_by_modality_length: bool = False,
                 max_images_per_sample: int = 1, worker_count: int = 0, read_threads: int = 4,
                 strict: bool = False, tfds_data_dir: str | os.PathLike | None = None,
                 normalize_pixels: bool = True, packing: bool = False,
                 max_images_per_row: int | None = None, num_frames: int = 0,
                 video_token_index: int | None = None, video_cfg: VideoProcessorConfig | None = None,
                 frame_sampling: str = "transformers", row_length: int | None = None) -> LlavaIterDataset:
    """Builds the training input pipeline (see the module docstring).

    Args:
      data_path: the records: a .json/.jsonl data file or several (concatenated), a directory
        packed by `python -m llava_jax.data.pack`, `tfds:NAME[/CONFIG][:VERSION][@SPLIT]`, or a
        sources.Source; local or gs://.
      image_folder: root of the records' relative image paths (JSON data only; packed and TFDS
        data carry their images).
      tokenizer: a llava_jax.data.tokenizer.Tokenizer (picklable: sent to worker processes).
      template: conversation template name (`plain` for stage 1, `vicuna_v1` for stage 2, ...).
      image_cfg: the image processor settings (the same as inference).
      num_image_tokens: tokens each image expands to (576 for ViT-L/14-336); or give `geometry`.
      geometry: how images become tiles and tokens (`LlavaConfig.geometry`); the flat one (LLaVA-1.5) is
        `num_image_tokens=geometry.tile_tokens`, an anyres one (LLaVA-NeXT) tiles each image (module
        docstring) and needs `image_cfg` with the same tile size and pinpoints.
      image_index: add `image_index` [B, T] (an anyres model needs it; default: for an anyres geometry).
      image_token_index: id of the image placeholder token (32000 in HF LLaVA).
      max_length: truncation length, after image expansion; also T unless `length_buckets`.
      batch_size: rows per batch on this process.
      seed: seeds the shuffle (a different order each epoch, the same for the same seed).
      shuffle: False keeps file order (still sharded and batched the same way).
      num_epochs: None repeats forever.
      shard_index, shard_count: this process's shard; default jax.process_index()/process_count().
      length_buckets: optional allowed values of T; a batch is padded to the smallest that fits
        (max_length is always allowed).
      group_by_modality_length: batches hold only image or only text samples, of similar lengths.
      max_images_per_sample: images a row holds at most; records with more are skipped and counted.
      worker_count: processes preparing batches in parallel (0: in this process, with threads).
      read_threads: threads preparing batches in each process.
      strict: raise DataError on a missing/corrupt image (default: skip, count and report).
      tfds_data_dir: TFDS data directory for `tfds:` data (default: TFDS's own, $TFDS_DATA_DIR).
      normalize_pixels: False leaves `pixel_values` uint8 [B, I, H, W, 3] (resized and cropped,
        not normalised, zero in unused slots) for a consumer that normalises on device with
        image.normalization_table (and zeroes the slots `image_mask` leaves out).
      packing: several samples a row (module docstring, "Packing"): rows of `row_length` tokens, and
        `segment_ids`, `positions` [B, T]; not with group_by_modality_length.
      row_length: packing only: a packed row's tokens, T (default and at least `max_length`). Each sample is
        still truncated at `max_length` (the model's context; positions restart at each sample), so longer
        rows only let more samples share one: a row of 2048 holds two typical LLaVA-1.5 samples (650-1,100
        tokens) and is about 85% real, a row of 8192 about 97% (BENCHMARKS.md, "Packing").
      max_images_per_row: packed rows' images at most (I = that x max_patches); default: `images_per_row`.
      num_frames: frames sampled from each record's video (0: no videos; a video record is skipped and counted);
        needs a geometry with video pooling and `video_token_index`. Unpacked rows gain that many tile slots.
      video_token_index: id of the video placeholder token (`LlavaConfig.video_token_index`).
      video_cfg: how frames are preprocessed (default `video_settings`: the model's tile, the images' mean/std).
      frame_sampling: "transformers" (uniform, transformers' processors) or "original" (data/video.py).

    Returns:
      A LlavaIterDataset; `iter()` gives a DataIterator whose `.stats` are the DataStats.
    """
    source = sources_lib.open_source(data_path, image_folder, tfds_data_dir=tfds_data_dir)
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=g-import-not-at-top  # only here: worker processes need no jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), found {shard_index}")
    if batch_size < 1 or max_length < 1 or max_images_per_sample < 1:
        raise ValueError(f"batch_size, max_length and max_images_per_sample must be >= 1; found "
                         f"{batch_size}, {max_length}, {max_images_per_sample}")
    if packing and group_by_modality_length:
        raise ValueError("packing and group_by_modality_length exclude each other: packed rows are full whatever "
                         "their samples' lengths; turn one off")
    if row_length is not None and (not packing or row_length < max_length):
        raise ValueError(f"row_length={row_length}: a packed row's length, for packing=True and at least "
                         f"max_length={max_length}")
    row_length = row_length or max_length
    buckets = bucket_list(length_buckets, row_length)
    geometry = _geometry(num_image_tokens, geometry, image_cfg)
    video_cfg = _check_video(geometry, image_cfg, video_cfg, num_frames, video_token_index, frame_sampling)
    images = max_images_per_sample
    packed = None
    if packing:
        # A video's frames count as images of max_patches slots each: a row must hold the largest sample.
        images = images_per_row(geometry, row_length, max_images_per_sample + video_images(geometry, num_frames),
                                max_images_per_row)
        packed, _ = plan_packing(source, tokenizer, template, geometry, image_token_index=image_token_index,
                                 max_length=max_length, max_images_per_sample=max_images_per_sample,
                                 images_per_row=images, seed=seed, shuffle=shuffle, num_frames=num_frames,
                                 video_token_index=video_token_index, row_length=row_length)
    tiled = geometry.merge != "flat"
    lengths = source.lengths(geometry)
    too_many = int(np.sum(source.record_stats()[1] > max_images_per_sample))
    if too_many:
        logger.warning("data: %d records have more than max_images_per_sample=%d images; they will be "
                       "skipped", too_many, max_images_per_sample)
    loader = _RowLoader(
        source, lengths, tokenizer=tokenizer, template_name=template, image_cfg=image_cfg,
        num_image_tokens=geometry.tile_tokens, geometry=geometry if tiled else None,
        image_token_index=image_token_index, max_length=max_length, max_images=max_images_per_sample,
        batch_size=batch_size, shard_index=shard_index, shard_count=shard_count, seed=seed, shuffle=shuffle,
        group_by_modality_length=group_by_modality_length, strict=strict, packed=packed,
        video_cfg=video_cfg, num_frames=num_frames, frame_sampling=frame_sampling, video_token_index=video_token_index)
    collate = _Collate(pad_id=_pad_id(tokenizer), max_length=row_length, buckets=buckets,
                       # Packed: a row's samples may each tile a lone image; unpacked: one sample's worst case.
                       slots=images * geometry.max_patches if packing else
                       anyres.image_slots(geometry, images) + num_frames,
                       crop_size=image_cfg.crop_size, image_token_index=image_token_index,
                       geometry=geometry if (tiled if image_index is None else image_index) else None, packed=packing,
                       video_token_index=video_token_index)
    ds = grain.MapDataset.range(loader.rows_per_epoch).repeat(num_epochs)
    ds = ds.map_with_index(loader).batch(batch_size, batch_fn=collate)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
    if worker_count > 0:
        _allow_unparsed_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return LlavaIterDataset(it, batches_per_epoch=loader.rows_per_epoch // batch_size, num_records=len(source),
                            source=source, image_cfg=image_cfg if normalize_pixels else None, video_cfg=video_cfg)
