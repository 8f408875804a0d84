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

Paths that are always local (temporary files, /proc) use `os` and `open` directly.
"""

from __future__ import annotations

import builtins
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
from collections.abc import Callable
from typing import IO

from etils import epath

PathLike = str | os.PathLike

# gcsfs asks GCS's storage-control API for each bucket's layout (hierarchical or not) unless this is
# "false", and logs a warning every time that fails. An emulator has no such API: a 3-step run printed
# about 2,000 "Could not determine bucket type" lines. Set here, before gcsfs is imported; only for an
# emulator, and never over the user's own choice.
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class PathError(ValueError):
    """A path the user gave cannot be used (a bucket name GCS refuses, a workdir that cannot be written)."""


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
    """True if a file or directory is there (on GCS: an object, or objects under it as a prefix)."""
    return as_path(path).exists()


def isfile(path: PathLike) -> bool:
    """True for a file (on GCS: an object)."""
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: PathLike) -> bool:
    """True for a directory (on GCS: a prefix that objects sit under)."""
    return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
    """Names in a directory (not paths), sorted."""
    return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: PathLike) -> None:
    """Create `path` and its parents if missing (on GCS directories are implicit: nothing to do)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path: PathLike) -> None:
    """Remove a directory and everything under it; nothing to do if it is not there."""
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
    """A whole file's bytes."""
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    """A whole UTF-8 file's text."""
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write a whole file (not atomic locally: see `atomic_write`)."""
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    """Write a whole UTF-8 file (not atomic locally: see `atomic_write`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def copy(src: PathLike, dst: PathLike) -> None:
    """Copy one file (either side local or remote)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
    else:
        write_bytes(dst, read_bytes(src))


# --- atomic directories ---------------------------------------------------------------------------


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


def copytree(src: PathLike, dst: PathLike) -> None:
    """Copy every file under local or remote `src` to the same relative path under `dst`."""
    for name in listdir(src):
        child = os.path.join(os.fspath(src), name)
        if isdir(child):
            makedirs(os.path.join(os.fspath(dst), name))
            copytree(child, os.path.join(os.fspath(dst), name))
        else:
            copy(child, os.path.join(os.fspath(dst), name))


# --- checking a workdir ---------------------------------------------------------------------------


def gcs_bucket_problem(bucket: str) -> str | None:
    """Why GCS would refuse `bucket` as a bucket name, or None if it is a valid one.

    GCS's naming rules: 3-63 characters (up to 222 with dots, 63 between dots), lowercase letters,
    digits, `-`, `_` and `.`, a letter or digit at each end, not an IP address, no `goog` prefix and
    no `google`. TensorStore only says so at the first checkpoint, after the data and a stage's work.
    """
    if not re.fullmatch(r"[a-z0-9._-]+", bucket):
        return "only lowercase letters, digits, '-', '_' and '.' are allowed"
    if len(bucket) < 3 or len(bucket) > (222 if "." in bucket else 63):
        return f"it has {len(bucket)} characters; GCS needs 3 to 63 (222 with dots)"
    if any(len(part) > 63 for part in bucket.split(".")):
        return "a part between dots is longer than 63 characters"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return "it must start and end with a letter or digit"
    try:
        ipaddress.ip_address(bucket)
        return "it is an IP address"
    except ValueError:
        pass
    if bucket.startswith("goog") or "google" in bucket:
        return "GCS reserves names that start with 'goog' or contain 'google'"
    return None


def check_writable_workdir(workdir: PathLike) -> None:
    """Raise PathError (one line) unless a `gs://` workdir names a valid bucket and can be written.

    Run before any work: a bad bucket otherwise fails only at the first checkpoint. The check writes
    and deletes one small object in the workdir. Local workdirs are left to the first write.
    """
    workdir = os.fspath(workdir)
    if not workdir.startswith("gs://"):
        return
    bucket = workdir[len("gs://"):].split("/", 1)[0]
    problem = gcs_bucket_problem(bucket)
    if problem:
        raise PathError(f"{workdir}: {bucket!r} is not a valid GCS bucket name ({problem})")
    probe = os.path.join(workdir, f".write_check_{os.getpid()}")
    try:
        write_bytes(probe, b"")
        as_path(probe).unlink()
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001  (gcsfs raises OSError, HttpError or its own errors alike)
        first = (str(e).strip().splitlines() or [""])[0]
        raise PathError(f"{workdir}: cannot write to the workdir ({type(e).__name__}: {first})") from e


# --- atomic writes --------------------------------------------------------------------------------


def publish(local_file: str, path: PathLike) -> None:
    """Move a finished local file to `path` whole: a rename on disk (same file system), one upload to GCS.

    A reader of `path` sees the old file or the new one, never a part: several processes (hosts)
    may write the same file at once, and a killed writer leaves no torn file behind.
    """
    if is_remote(path):
        with builtins.open(local_file, "rb") as src, as_path(path).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        os.remove(local_file)
    else:
        os.replace(local_file, path)


def atomic_write(path: PathLike, data: bytes | str) -> None:
    """Write a whole file atomically (`str` as UTF-8): a temporary file beside it renamed over it
    locally (after fsync, so that a crash leaves the old or the new file); one object upload on GCS,
    where an object appears whole or not at all."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if is_remote(path):
        write_bytes(path, data)
        return
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:  # a full disk, a kill: the old file stays, and no temporary file is left
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
