"""Time and peak resident memory of `python -m llava_jax.convert` on a random LLaVA-1.5-7B-shaped checkpoint.

  python bench/convert.py                      # 7B: writes 14 GB of random bf16 safetensors, converts, deletes
  python bench/convert.py --shape small        # 7B widths, 2 text + 2 vision layers (~1.3 GB): CI-sized
  python bench/convert.py --shape tiny --export

The source is laid out like llava-hf/llava-1.5-7b-hf (legacy key names, full CLIP tower with
post_layernorm, vocab 32064, shards of at most 5 GB with an index). Each measured command runs in
its own process; peak RSS is that process's ru_maxrss (os.wait4), so it counts every page the
converter touched, file-backed ones included. Goal (issue 3): at most 4 GB for 7B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from llava_jax.config import LLAVA_15_7B, LlavaConfig, llava_config_to_hf
from llava_jax.weights import mapping
from llava_jax.weights.safetensors_io import write_safetensors
from llava_jax.models.llava import abstract_params

SHAPES = {
    "7b": LLAVA_15_7B,
    "small": LLAVA_15_7B.replace(
        vision=dataclasses.replace(LLAVA_15_7B.vision, num_layers=2),
        text=dataclasses.replace(LLAVA_15_7B.text, num_layers=2),
        vision_feature_layer=-2,
    ),
    "tiny": LlavaConfig(
        vision=dataclasses.replace(LLAVA_15_7B.vision, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4),
        text=dataclasses.replace(LLAVA_15_7B.text, vocab_size=32064, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16),
    ),
}


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bits with the exponent pinned near 2^-7: finite, varied, and fast to make (no float math)."""
    bits = np.frombuffer(rng.bytes(2 * math.prod(shape)), np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16).reshape(shape)


def hf_tensors(cfg: LlavaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch shape) of a llava-hf checkpoint of this config: the whole CLIP tower included."""
    full = cfg.replace(vision_feature_layer=cfg.vision.num_layers)
    shapes = mapping.unstack_layers(abstract_params(full))
    out = []
    for e in sorted(mapping.entries(full), key=mapping.layer_order):
        leaf = shapes
        for k in e.path:
            leaf = leaf[k]
        shape = mapping.to_torch(np.broadcast_to(np.zeros((), np.uint8), leaf.shape), e.transform).shape
        out.append((mapping.torch_name(e, mapping.HF_LEGACY, cfg.projector_type), tuple(shape)))
    d = cfg.vision.hidden_size
    out += [(mapping.HF_LEGACY.vision + "post_layernorm." + k, (d,)) for k in ("weight", "bias")]
    return out


def write_source(directory: str, cfg: LlavaConfig, shard_bytes: int = 5 * 10**9, seed: int = 0) -> int:
    """A random bf16 llava-hf directory; returns its size in bytes."""
    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    tensors = hf_tensors(cfg)
    shards, size = [[]], 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(name, shape, np.dtype(ml_dtypes.bfloat16)) for name, shape in shard]
        total += write_safetensors(os.path.join(directory, fname), specs, (_random_bf16(rng, s) for _, s in shard))
        weight_map.update({name: fname for name, _ in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    hf = llava_config_to_hf(cfg) | {"torch_dtype": "bfloat16"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return total


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in GB, exit code) of one command, in its own process."""
    start = time.time()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.time() - start, usage.ru_maxrss * 1024 / 1e9, os.waitstatus_to_exitcode(status)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--workdir", help="where to write (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--export", action="store_true", help="also measure --to hf on the converted directory")
    args = p.parse_args()
    cfg = SHAPES[args.shape]
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    src, dst, hf = (os.path.join(work, n) for n in ("src", "ours", "hf"))
    try:
        t = time.time()
        total = write_source(src, cfg)
        print(f"[{args.shape}] wrote random bf16 llava-hf source: {total / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
        rows = []
        secs, rss, rc = measure([sys.executable, "-m", "llava_jax.convert", "--src", src, "--dst", dst])
        assert rc == 0, f"conversion failed ({rc})"
        rows.append(("hf -> ours", secs, rss, du(dst)))
        if args.export:
            secs, rss, rc = measure([sys.executable, "-m", "llava_jax.convert", "--src", dst, "--dst", hf, "--to", "hf"])
            assert rc == 0, f"export failed ({rc})"
            rows.append(("ours -> hf", secs, rss, du(hf)))
        print(f"\n| shape {args.shape} ({total / 1e9:.2f} GB bf16) | time (s) | peak RSS (GB) | output (GB) | GB/s |")
        print("|---|---|---|---|---|")
        for name, secs, rss, out in rows:
            print(f"| {name} | {secs:.1f} | {rss:.2f} | {out / 1e9:.2f} | {total / 1e9 / secs:.2f} |")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
