"""A local Google Cloud Storage for tests: gcp-storage-emulator on 127.0.0.1, plus what TensorStore needs.

    python -m tests._gcs_emulator PORT BUCKET      # serves until killed; prints "ready" when it listens

Tests start one with `running(BUCKET)` (the one emulator of the test suite).

TensorStore (Orbax's array storage, with its OCDBT manifest) reads an object's generation from the
`x-goog-generation` header of a download and writes with `ifGenerationMatch` preconditions. The
emulator sends no such header and ignores preconditions, so TensorStore fails with "Malformed
StorageGeneration". This wraps its object handlers to add both, as GCS itself behaves. Clients
reach it with STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore) set to
http://127.0.0.1:PORT.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _get, _insert, _delete = objects.download, objects.get, objects.insert, objects.delete


def _generation(storage, bucket: str, name: str | None) -> int:
    """The object's live generation; 0 when there is none (GCS's "does not exist" precondition)."""
    try:
        return int(storage.get_file_obj(bucket, name)["generation"]) if name else 0
    except NotFound:
        return 0


def _precondition_holds(request, response, storage, name: str | None) -> bool:
    """False (and a 412 response) when `ifGenerationMatch` / `ifGenerationNotMatch` does not hold."""
    current = _generation(storage, request.params["bucket_name"], name)
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if (match and int(match[0]) != current) or (not_match and int(not_match[0]) == current):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    return True


def download(request, response, storage, *args, **kwargs):
    name = request.params["object_id"]
    generation = _generation(storage, request.params["bucket_name"], name)
    if generation:
        not_match = request.query.get("ifGenerationNotMatch")
        if not_match and int(not_match[0]) == generation:
            response.status = HTTPStatus.NOT_MODIFIED
            response["x-goog-generation"] = str(generation)
            return None
        response["x-goog-generation"] = str(generation)
        response["x-goog-metageneration"] = "1"
    return _download(request, response, storage, *args, **kwargs)


def get(request, response, storage, *args, **kwargs):
    if request.query.get("alt") and request.query["alt"][0] == "media":
        return download(request, response, storage, *args, **kwargs)
    return _get(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    if not _precondition_holds(request, response, storage, name):
        return None
    # Generations are time_ns: two writes of one object within the clock's resolution must differ.
    time.sleep(1e-6)
    return _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
    if not _precondition_holds(request, response, storage, request.params["object_id"]):
        return None
    return _delete(request, response, storage, *args, **kwargs)


_WRAPPED = {_download: download, _get: get, _insert: insert, _delete: delete}


def _patch_routes() -> None:
    server.HANDLERS = tuple((pattern, {m: _WRAPPED.get(h, h) for m, h in handlers.items()})
                            for pattern, handlers in server.HANDLERS)
    objects.insert = insert  # the server's fallback for uploads posted without /upload


@contextlib.contextmanager
def running(bucket: str) -> Iterator[str]:
    """This emulator in a subprocess on a free 127.0.0.1 port, holding one empty `bucket`; yields its URL.

    Point clients at it with STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL (and, for gcsfs,
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: the emulator has no storage-layout API).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "tests._gcs_emulator", str(port), bucket], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the GCS emulator did not start (exit status {proc.wait()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def main(port: int, bucket: str) -> None:
    _patch_routes()
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
