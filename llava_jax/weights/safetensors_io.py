"""Streaming safetensors reading and writing, with errors that name the file.

Headers are parsed and checked once; each tensor is read by copy when asked for, so that a 7B
conversion holds a tensor or two in memory. (A memory map would leave every page it touched
counted as resident: reading a 14 GB checkpoint that way peaks near 14 GB.) bfloat16 is read with
`ml_dtypes` (numpy has no bf16).
"""

from __future__ import annotations

import json
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
                raise CheckpointError(f"{path}: corrupt entry for tensor {key!r} ({end - start} bytes, expected {expected})")

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


def save_file(tensors: Iterable[tuple[str, np.ndarray]], path: str, metadata: dict | None = None) -> int:
    """Write tensors to one .safetensors file, streaming them (two passes over a re-iterable input)."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, arr in tensors:
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with paths.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())
    return offset
