"""Helpers the benchmark scripts share: depth override, device memory, JSON results.

Nothing here imports grain or ml_collections (absent on the GPU machine), nor torch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from llava_jax.config import LlavaConfig


def with_layers(cfg: LlavaConfig, layers: int | None) -> LlavaConfig:
    """`cfg` with `layers` LLaMA layers (None: as it is)."""
    return cfg if not layers else cfg.replace(text=dataclasses.replace(cfg.text, num_layers=layers))


def device_memory_gib() -> float | None:
    """Peak memory in use on JAX's first device so far (GiB), where the backend reports it (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def write_json(path: str | None, record: dict) -> None:
    """Write one benchmark's results (for `bench.suite`), if asked to."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
