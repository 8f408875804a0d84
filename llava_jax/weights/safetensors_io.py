"""Streaming safetensors reading and writing, with errors that name the file.

Headers are parsed and checked once; each tensor is read by copy when asked for, so that a 7B
conversion holds a tensor or two in memory. bfloat16 is read with `ml_dtypes` (numpy has no bf16).

Why not the `safetensors` package: its `safe_open` memory-maps the file, and every page a read
touches stays counted in the process's resident memory, so reading a 14 GB checkpoint that way peaks
near 14 GB. `python -m bench.safetensors_memory` (BENCHMARKS.md) reads a 512 MiB file, each tensor
cast to float32 and transposed: peak RSS 126 MiB with ours (np.fromfile at the tensor's offset), 638
MiB with safe_open(framework="numpy") (887 MiB with framework="flax"), 46 MiB after the imports.
(safe_open's numpy API reads bf16 only once ml_dtypes is imported: "data type 'bfloat16' not
understood" otherwise.) Its writer (`safetensors.numpy.save_file`) takes every tensor at once, where
an export streams one at a time. Reads from gs:// go through `paths.open` here, which it cannot.
So the package is not a dependency (transformers, which the tests use, brings its own copy).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from llava_jax import paths

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as expected."""


class SafetensorsFile:
    """One .safetensors file: header parsed and validated eagerly, tensors read by copy on demand."""

    def __init__(self, path: str):
        self.path = path
        size = paths.as_path(path).stat().length if paths.is_remote(path) else os.path.getsize(path)
        with paths.open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = header
        for key, e in header.items():
            start, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {e['dtype']}")
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: tensor {key!r} ends at byte "
                    f"{self._data_start + end} but the file has {size}"
                )
            expected = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - start != expected:
                raise CheckpointError(f"{path}: corrupt entry for tensor {key!r} ({end - start} bytes, "
                                      f"expected {expected})")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        """The tensor, read from the file into a fresh array."""
        e = self._entries[key]
        start, _ = e["data_offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        dtype = DTYPES[e["dtype"]]
        if not paths.is_remote(self.path):
            return np.fromfile(self.path, dtype=dtype, count=count, offset=self._data_start + start).reshape(e["shape"])
        arr = np.empty(e["shape"], dtype)
        with paths.open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        return arr


class TensorStore:
    """All tensors of a checkpoint directory (safetensors, sharded with an index or not)."""

    def __init__(self, files: list[str], source: str | None = None):
        if not files:
            raise CheckpointError("no checkpoint files given")
        self.source = source or (files[0] if len(files) == 1 else os.path.dirname(files[0]))  # for messages
        self.files = {f: SafetensorsFile(f) for f in files}
        self._where: dict[str, SafetensorsFile] = {}
        for st in self.files.values():
            for k in st.keys():
                self._where[k] = st

    @classmethod
    def from_dir(cls, directory: str, prefix: str = "") -> "TensorStore":
        """Open every `{prefix}*.safetensors` in a directory (the index json is checked when present)."""
        listing = paths.listdir(directory)
        names = sorted(n for n in listing if n.endswith(".safetensors") and n.startswith(prefix))
        if not names:
            raise CheckpointError(f"{directory}: no .safetensors files found")
        store = cls([os.path.join(directory, n) for n in names], source=directory)
        for index_name in [n for n in listing if n.endswith(".safetensors.index.json")]:
            weight_map = json.loads(paths.read_text(os.path.join(directory, index_name))).get("weight_map", {})
            missing = [k for k in weight_map if k not in store._where]
            if missing:
                raise CheckpointError(
                    f"{directory}/{index_name} lists {len(missing)} tensors that no shard holds, e.g. {missing[:3]}"
                )
        return store

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)


def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterable[np.ndarray],
                      metadata: dict | None = None) -> int:
    """Write a .safetensors file whose header is known up front, taking the arrays one at a time; returns
    the bytes of tensor data. `metadata` defaults to {"format": "pt"} (what transformers expects); {} writes none."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    metadata = {"format": "pt"} if metadata is None else metadata
    if metadata:  # an empty one is left out, as `safetensors` does
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with paths.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), arr in zip(specs, arrays, strict=True):
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: {name} is {arr.dtype}{arr.shape}, its header says "
                                 f"{np.dtype(dtype)}{tuple(shape)}")
            f.write(np.ascontiguousarray(arr).tobytes())
    return offset


def save_file(tensors: Iterable[tuple[str, np.ndarray]], path: str, metadata: dict | None = None) -> int:
    """Write (name, array) pairs to one .safetensors file; returns the bytes of tensor data."""
    tensors = list(tensors)
    return write_safetensors(path, [(n, a.shape, a.dtype) for n, a in tensors], (a for _, a in tensors),
                             metadata or {})
