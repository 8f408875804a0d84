"""JAX's persistent compilation cache, opt in: compiled programs are kept in a directory and reused
by the next process that compiles the same program (same shapes, shardings, flags and versions).

    from llava_jax.parallel import compile_cache
    compile_cache.enable("/tmp/llava_jax_cache")        # before the first compile

Training turns it on with `--config.compilation_cache_dir=DIR`; `generate` and `chat` with
`--compilation-cache-dir DIR`. The directory may be local or on GCS (`gs://...`), and several
processes may share it. It is never cleared by us: delete it to reclaim the space.
"""

from __future__ import annotations

import os

import jax

# Programs that compile faster than this are not worth a file read (JAX's own default is 1 s).
MIN_COMPILE_SECONDS = 1.0


def enable(directory: str | None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> str | None:
    """Keep compiled programs in `directory` (created if needed); None or "" leaves the cache off.

    Call it before anything is compiled. Returns the directory in use (None when off).
    """
    if not directory:
        return None
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
