"""Paths a user may give as local files or as `gs://bucket/...`: one place that reads, writes and lists them.

Workdirs, model directories, data files and image folders all go through here, so that a Cloud
TPU run keeps them on GCS exactly as a laptop run keeps them on disk. Paths stay plain strings
(`os.path.join` and `os.path.dirname` are right for `gs://` strings too); the operations go
through `etils.epath` (GCS through `gcsfs`), and Orbax and TensorStore write checkpoints to
`gs://` themselves.

What differs on GCS, and is handled by the callers that care:
- there is no rename of a directory (it is a copy of every object): model directories are
  written in place there, with the config written last as the completeness marker;
- there is no append: metrics are rewritten whole (see `train.metrics.MetricsWriter`);
- there are no symbolic links, so an image path is checked lexically only.

A local GCS emulator (tests; `gcp-storage-emulator`) is reached by setting both
`STORAGE_EMULATOR_HOST` (gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (TensorStore, used by Orbax) to
its address.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import secrets
import shutil
from collections.abc import Callable
from typing import IO

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URL such as `gs://bucket/dir` (anything with a scheme), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """The `epath.Path` for `path`, with a clear error when a `gs://` path has no GCS client installed."""
    path = os.fspath(path)
    if path.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise ImportError(f"{path}: gs:// paths need gcsfs; install it with pip install 'llava_jax[gcs]' "
                          "(or pip install gcsfs)")
    return epath.Path(path)


def absolute(path: PathLike) -> str:
    """A local path made absolute (as os.path.abspath); a remote one unchanged but for a trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isfile(path: PathLike) -> bool:
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
    """Names in a directory (not paths), sorted."""
    return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: PathLike) -> None:
    """Create `path` and its parents if missing (on GCS directories are implicit: nothing to do)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path: PathLike) -> None:
    if is_remote(path):
        as_path(path).rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def open(path: PathLike, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001  (the module's verb)
    """A file object for reading or writing (`r`, `rb`, `w`, `wb`; `a` only for local paths)."""
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding)
    if "a" in mode:
        raise ValueError(f"{path}: appending is not possible on remote storage; rewrite the file instead")
    return as_path(path).open(mode) if "b" in mode else as_path(path).open(mode, encoding=encoding)


def read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def copy(src: PathLike, dst: PathLike) -> None:
    """Copy one file (either side local or remote)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
    else:
        write_bytes(dst, read_bytes(src))


# ---------------------------------------------------------------------------------------------
# Atomic directories


def atomic_directory(dst: PathLike, write: Callable[[str], None]) -> str:
    """Run `write(tmp)` on a fresh `DST.tmp-XXXXXXXX` beside DST, then rename it to DST; on any failure remove it.

    Returns DST (absolute). DST must not exist. The directory is made with `os.mkdir(..., 0o777)`, so
    it gets the permissions of any directory the user creates (the kernel applies the umask), not
    mkdtemp's 0700. On object storage (no directory rename) `write` runs on DST itself, which is
    removed on failure; writers put the file that marks a complete directory last.
    """
    dst = absolute(dst)
    if exists(dst):
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    if is_remote(dst):
        try:
            write(dst)
        except BaseException:
            rmtree(dst)
            raise
        return dst
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    while True:
        tmp = f"{dst}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:  # another writer's temporary directory: draw another name
            continue
    try:
        write(tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
