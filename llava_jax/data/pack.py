"""Pack LLaVA records and their images into ArrayRecord shards (local or gs://), or a TFDS dataset.

    python -m llava_jax.data.pack --data-path llava_v1_5_mix665k.json --image-folder data \\
        --output gs://bucket/mix665k_packed [--shards 163] [--workers 8]
    python -m llava_jax.data.pack --verify gs://bucket/mix665k_packed
    python -m llava_jax.data.pack --data-path X.json --image-folder I --output ~/tensorflow_datasets \\
        --format tfds --name mix665k            # then data "tfds:llava_records/mix665k"

A training stage then names the output directory as its `data`. Each record keeps its images'
original file bytes (no re-encoding), so training reads exactly the pixels it would read from the
loose files. Records keep the file's order; shard s holds a contiguous range of them.

Safe to kill at any moment and to run again with the same arguments: each shard is written to a
temporary file and renamed (or, on GCS, uploaded as one object) when complete, then its summary
(`<shard>.json`) is written; a re-run skips the shards whose summary and file agree and redoes the
others. `manifest.json` (counts, skipped records, shards with sizes and sha256) is written last:
a directory without it is an unfinished packing, which readers refuse.

Bad records (malformed JSON records, missing / unreadable / corrupt images, image paths leaving
the folder) are reported by index and id, skipped, and listed in the manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from llava_jax import paths
from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data import packed_format
from llava_jax.data.records import is_remote

logger = logging.getLogger("llava_jax.data.pack")

RECORDS_PER_SHARD = 4096
PLAN = ".pack.json"  # what is being packed: a re-run must pack the same thing
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: random access; images are compressed


class PackError(ValueError):
    """The output directory holds something else, or a shard does not read back as written."""


# ----------------------------------------------------------------------------- reading the input


def file_sha256(path: str) -> str:
    """sha256 hex digest of a local or remote file, read in 16 MiB pieces."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def _write_text(path: str, text: str) -> None:
    """Writes a whole file atomically (`paths.atomic_write`; a name the crash test can intercept)."""
    paths.atomic_write(path, text)


def _chunk_offsets(path: str, lengths: Sequence[int]) -> list[int]:
    """Logical offsets of the payloads of an uncompressed, one-record-per-chunk ArrayRecord file.

    Walks riegeli's chunk headers (40 bytes: hashes, data size, type, record count, decoded size)
    over the file's logical bytes; simple chunks ('r') hold: compression type 0, the varint size
    of the sizes, the varint record size, then the record.
    """

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    offsets = []
    with open(path, "rb") as f:
        def read(logical: int, n: int) -> bytes:
            begin, end = packed_format.physical_range(logical, n)
            f.seek(begin)
            return packed_format.strip_block_headers(f.read(end - begin), begin)

        pos = 0
        while len(offsets) < len(lengths):
            header = read(pos, 40)
            if len(header) < 40:
                raise PackError(f"{path}: ended after {len(offsets)} of {len(lengths)} records")
            data_size, = struct.unpack_from("<Q", header, 8)
            chunk_type, num_records = header[24:25], int.from_bytes(header[25:32], "little")
            decoded_size, = struct.unpack_from("<Q", header, 32)
            if chunk_type == b"r" and num_records:
                if num_records != 1:
                    raise PackError(f"{path}: a chunk of {num_records} records; expected one per chunk")
                head = read(pos + 40, min(data_size, 32))
                if head[0] != 0:
                    raise PackError(f"{path}: compressed chunk; expected {WRITER_OPTIONS}")
                _, p = varint(head, 1)
                size, p = varint(head, p)
                if size != lengths[len(offsets)] or decoded_size != size:
                    raise PackError(f"{path}: record {len(offsets)} is {size} bytes, {lengths[len(offsets)]} were written")
                offsets.append(pos + 40 + p)
            pos += 40 + data_size
    return offsets


def _pack_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Writes one shard and its summary; returns the summary (runs in a worker process)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    out, name, image_folder = job["output"], job["file"], job["image_folder"]
    final = f"{out}/{name}"
    tmp_dir = job["tmp_dir"] if is_remote(out) else out
    local = os.path.join(tmp_dir, f".{name}.tmp-{os.getpid()}")
    skipped, stats, lengths, payloads_sha = [], [], [], hashlib.sha256()
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    try:
        for index, record in job["records"]:
            try:
                images = packed_format.read_example(record, image_folder)
            except (records_lib.ImagePathError, image_lib.ImageError, packed_format.VideoError, OSError) as e:
                skipped.append({"index": index, "id": record["id"], "reason": str(e)})
                logger.warning("pack: skipped record %d (id %r): %s", index, record["id"], e)
                continue
            payload = packed_format.encode_example(record, images)
            writer.write(payload)
            payloads_sha.update(hashlib.sha256(payload).digest())
            lengths.append(len(payload))
            stats.append(packed_format.record_stats(record))
    finally:
        writer.close()
    offsets = _chunk_offsets(local, lengths)
    # Read every record back through the byte-range path remote readers use: it must give the
    # bytes written (and the local ArrayRecord reader must agree on the count).
    check = hashlib.sha256()
    with open(local, "rb") as f:
        for off, n in zip(offsets, lengths):
            begin, end = packed_format.physical_range(off, n)
            f.seek(begin)
            check.update(hashlib.sha256(packed_format.strip_block_headers(f.read(end - begin), begin)).digest())
    reader = array_record_module.ArrayRecordReader(local)
    count = reader.num_records()
    reader.close()
    if check.digest() != payloads_sha.digest() or count != len(lengths):
        raise PackError(f"{final}: does not read back as written ({count} records of {len(lengths)})")
    summary = {"file": name, "bytes": os.path.getsize(local), "sha256": file_sha256(local),
               "num_records": len(lengths), "input_range": job["input_range"], "skipped": skipped,
               "words": [s[0] for s in stats], "num_images": [s[1] for s in stats],
               "has_image": [bool(s[2]) for s in stats], "offset": offsets, "length": lengths}
    paths.publish(local, final)
    _write_text(f"{final}.json", json.dumps(summary))
    return summary


def _done_summary(output: str, name: str) -> dict[str, Any] | None:
    """A finished shard's summary, or None if it must be (re)written."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    side, shard = epath.Path(f"{output}/{name}.json"), epath.Path(f"{output}/{name}")
    try:
        summary = json.loads(side.read_text())
        return summary if shard.stat().length == summary["bytes"] else None
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def pack(data_path: str | os.PathLike, image_folder: str | os.PathLike, output: str | os.PathLike, *,
         num_shards: int | None = None, workers: int = 1, tmp_dir: str | None = None) -> dict[str, Any]:
    """Packs a LLaVA data file and its images into `output` (see the module docstring).

    Args:
      data_path: LLaVA .json / .jsonl records (local or gs://).
      image_folder: root of their relative image paths (local or gs://).
      output: directory for the shards and manifest (local or gs://); created if needed.
      num_shards: number of shards (default: one per RECORDS_PER_SHARD records).
      workers: processes writing shards in parallel.
      tmp_dir: local directory for shards on their way to a gs:// output (default: the system's).

    Returns:
      The manifest (also written to output/manifest.json).
    """
    from etils import epath  # pylint: disable=g-import-not-at-top

    data_path, image_folder = os.fspath(data_path), os.fspath(image_folder)
    output = os.fspath(output).rstrip("/")
    records, skipped, total = packed_format.load_input(data_path)
    if not records:
        raise PackError(f"{data_path}: no valid records to pack")
    num_shards = num_shards or max(1, math.ceil(len(records) / RECORDS_PER_SHARD))
    num_shards = min(num_shards, len(records))
    plan = {"format": packed_format.FORMAT, "data_path": data_path, "data_sha256": file_sha256(data_path),
            "image_folder": image_folder, "num_shards": num_shards}
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads((out / PLAN).read_text())
    except FileNotFoundError:
        previous = None
    if previous is not None and previous != plan:
        changed = sorted(k for k in plan if plan[k] != previous.get(k))
        raise PackError(f"{output}: holds a packing of other input ({', '.join(changed)} differ); pack into a new "
                        "directory or delete it")
    if previous is None:
        if (out / packed_format.MANIFEST).exists():
            raise PackError(f"{output}: already holds a packed dataset from another run; use a new directory")
        _write_text(f"{output}/{PLAN}", json.dumps(plan, indent=1))
    if not is_remote(output):
        for stale in out.glob(".*.tmp-*"):  # left by a killed run
            stale.unlink()

    bounds = [round(s * len(records) / num_shards) for s in range(num_shards + 1)]
    jobs, summaries = [], {}
    for s in range(num_shards):
        name = f"records-{s:05d}-of-{num_shards:05d}.array_record"
        done = _done_summary(output, name)
        if done is not None:
            summaries[s] = done
            continue
        part = records[bounds[s] : bounds[s + 1]]
        jobs.append((s, {"output": output, "file": name, "image_folder": image_folder, "records": part,
                         "input_range": [part[0][0], part[-1][0] + 1], "tmp_dir": tmp_dir or tempfile.gettempdir()}))
    if summaries:
        logger.info("pack: %d of %d shards already complete in %s", len(summaries), num_shards, output)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_pack_shard, job): s for s, job in jobs}
            for future in concurrent.futures.as_completed(futures):
                summaries[futures[future]] = _log_shard(future.result(), len(summaries) + 1, num_shards)
    else:
        for s, job in jobs:
            summaries[s] = _log_shard(_pack_shard(job), len(summaries) + 1, num_shards)

    ordered = [summaries[s] for s in range(num_shards)]
    index = {k: np.asarray([v for s in ordered for v in s[k]], dtype) for k, dtype in
             (("words", np.int32), ("num_images", np.int32), ("has_image", bool), ("offset", np.int64),
              ("length", np.int64))}
    buf = io.BytesIO()
    np.savez(buf, **index)
    local_index = os.path.join(tmp_dir or tempfile.gettempdir(), f".index-{os.getpid()}.npz")
    with open(local_index, "wb") as f:
        f.write(buf.getvalue())
    paths.publish(local_index, f"{output}/{packed_format.INDEX}")
    skipped = sorted(skipped + [x for s in ordered for x in s["skipped"]], key=lambda x: x["index"])
    manifest = {
        "format": packed_format.FORMAT, "data_path": data_path, "data_sha256": plan["data_sha256"],
        "image_folder": image_folder, "num_input_records": total, "num_records": int(sum(s["num_records"] for s in ordered)),
        "num_skipped": len(skipped), "skipped": skipped,
        "shards": [{k: s[k] for k in ("file", "bytes", "sha256", "num_records", "input_range")} for s in ordered],
        "index": {"file": packed_format.INDEX, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
    }
    _write_text(f"{output}/{packed_format.MANIFEST}", json.dumps(manifest, indent=1))
    logger.info("pack: %d records in %d shards in %s; %d skipped", manifest["num_records"], num_shards, output,
                len(skipped))
    return manifest


def _log_shard(summary: dict[str, Any], done: int, total: int) -> dict[str, Any]:
    logger.info("pack: shard %s done (%d/%d): %d records, %d skipped, %.1f MB", summary["file"], done, total,
                summary["num_records"], len(summary["skipped"]), summary["bytes"] / 1e6)
    return summary


def verify(directory: str | os.PathLike) -> list[str]:
    """Checks every shard's size and sha256 and the index against the manifest; returns the problems."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    directory = os.fspath(directory).rstrip("/")
    manifest = packed_format.read_manifest(directory)
    problems = []
    for shard in manifest["shards"]:
        path = f"{directory}/{shard['file']}"
        if not epath.Path(path).exists():
            problems.append(f"{path}: missing")
        elif (size := epath.Path(path).stat().length) != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {shard['bytes']} (truncated or changed)")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt or changed)")
    index = f"{directory}/{manifest['index']['file']}"
    if not epath.Path(index).exists() or file_sha256(index) != manifest["index"]["sha256"]:
        problems.append(f"{index}: missing or its sha256 differs from the manifest")
    return problems


def verify_source(directory: str | os.PathLike, data_path: str | os.PathLike) -> bool:
    """True if `directory` holds a complete packing of `data_path` as it is now (same sha256)."""
    try:
        manifest = packed_format.read_manifest(os.fspath(directory))
    except packed_format.DataSourceError:
        return False
    return manifest["data_sha256"] == file_sha256(os.fspath(data_path))


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit code."""
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(prog="python -m llava_jax.data.pack", description=first, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", help="LLaVA .json / .jsonl records (local or gs://)")
    p.add_argument("--image-folder", help="root of the records' image paths (local or gs://)")
    p.add_argument("--output", help="output directory (local or gs://); for --format tfds, the TFDS data_dir")
    p.add_argument("--shards", type=int, default=None, help=f"number of shards (default: one per {RECORDS_PER_SHARD} records)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--format", choices=["arrayrecord", "tfds"], default="arrayrecord",
                   help="arrayrecord: our packed shards; tfds: a TFDS dataset llava_records/NAME (ArrayRecord files)")
    p.add_argument("--name", default=None, help="--format tfds: the dataset's config name (default: the data file's stem)")
    p.add_argument("--verify", metavar="DIR", default=None, help="check a packed directory's sizes and checksums, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.verify:
            problems = verify(args.verify)
            for line in problems:
                print(line, file=sys.stderr)
            print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 2 if problems else 0
        if not (args.data_path and args.image_folder and args.output):
            p.error("--data-path, --image-folder and --output are required (or --verify DIR)")
        if args.format == "tfds":
            # Lazy: tfds_builder imports tensorflow-datasets, an optional dependency packing needs not.
            from llava_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

            name = args.name or os.path.splitext(os.path.basename(args.data_path))[0].replace("-", "_").lower()
            info = tfds_builder.build(args.data_path, args.image_folder, args.output, name)
            print(f"tfds:llava_records/{name} in {args.output}: {info}")
            return 0
        manifest = pack(args.data_path, args.image_folder, args.output, num_shards=args.shards, workers=args.workers)
    except (PackError, packed_format.DataSourceError, records_lib.RecordError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {manifest['num_records']} records in {len(manifest['shards'])} shards; "
          f"{manifest['num_skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
