"""Opening checkpoint files as tensor stores: safetensors (safetensors_io.py), torch `.bin`, and JSON beside them.

A store gives names, header shapes/dtypes and fresh copies of tensors (`Store`). Tensors are read
by copy (safetensors: `np.fromfile` at the tensor's offset; torch `.bin`: a memory map that is
dropped every GiB) so that pages of a 13.5 GB checkpoint never pile up in the process's resident
memory. Torch pickles are only ever opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Protocol

import ml_dtypes
import numpy as np

from llava_jax import paths
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore

# Files beside the weights that are not weights (HF Trainer output); never opened.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")
_RELOAD_BYTES = 1 << 30  # drop a torch memory map after this much has been read through it


def read_json(path: str) -> dict:
    """A JSON file, with an error naming it when it is missing or malformed."""
    try:
        return json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class Store(Protocol):
    """What conversion needs from a checkpoint: names, header shapes/dtypes, and fresh copies."""

    source: str

    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def get(self, name: str) -> np.ndarray: ...


def _import_torch(path: str):
    try:
        import torch  # only this path touches torch, and only to read tensors
    except ImportError:
        raise CheckpointError(
            f"{path}: a torch .bin checkpoint needs PyTorch to read, and it is not installed; "
            "install torch (the CPU build is enough) or convert the files to .safetensors"
        ) from None
    return torch


def read_torch_state_dict(path: str) -> dict:
    """A torch state dict, opened with `weights_only=True` (never runs code from the file), memory-mapped."""
    torch = _import_torch(path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format: no mmap
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the pickle holds more than tensors ({first[:200]}); "
            "checkpoints are only read with torch.load(weights_only=True), which never runs code from the file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).strip()[:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a flat state dict of name -> tensor, found {type(sd).__name__}")
    return sd


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # optional (only .bin checkpoints need it); present here, since `t` is a torch tensor

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


class BinStore:
    """torch `.bin` files (`pytorch_model*.bin`, `mm_projector.bin`): one memory map at a time, copied out."""

    def __init__(self, files: list[str], source: str):
        self.source = source
        self._meta: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}
        for path in files:
            for name, t in read_torch_state_dict(path).items():
                self._meta[name] = (path, tuple(t.shape), _torch_to_numpy(t.flatten()[:0]).dtype)
        self._open: tuple[str, dict] | None = None
        self._read = 0

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._meta[name][2]

    def get(self, name: str) -> np.ndarray:
        path = self._meta[name][0]
        if self._open is None or self._open[0] != path:
            self._open, self._read = (path, read_torch_state_dict(path)), 0
        x = _torch_to_numpy(self._open[1][name])
        self._read += x.nbytes
        if self._read > _RELOAD_BYTES:  # unmapping releases the file pages counted in our resident memory
            self._open = None
        return x


def _weight_files(directory: str) -> tuple[list[str], list[str]]:
    names = sorted(paths.listdir(directory))
    st = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith((".bin", ".pt", ".pth")) and n not in _NOT_WEIGHTS]
    preferred = [n for n in bins if n.startswith(("pytorch_model", "model"))]
    return st, preferred or bins


def open_checkpoint(directory: str) -> Store:
    """Every weight file of a directory: `*.safetensors` (preferred) or torch `*.bin`."""
    if not paths.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    st, bins = _weight_files(directory)
    if st:
        return TensorStore.from_dir(directory)
    if bins:
        return BinStore([os.path.join(directory, n) for n in bins], directory)
    raise CheckpointError(f"{directory}: no weights found (expected *.safetensors or pytorch_model*.bin)")


def open_file(path: str) -> Store:
    """One weight file (e.g. `mm_projector.bin` as original stage 1 writes it, or a .safetensors)."""
    if not paths.isfile(path):
        raise CheckpointError(f"{path}: not found")
    if path.endswith(".safetensors"):
        return TensorStore([path], source=path)
    return BinStore([path], path)
