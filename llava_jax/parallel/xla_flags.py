"""XLA flags that help on GPUs and TPUs, set in one visible place.

The entry points (`python -m llava_jax.train`, `llava_jax.generate`, `llava_jax.chat`, the
`bench/` scripts) call `apply()` before JAX starts a backend. On a machine with an NVIDIA GPU or
a TPU it adds the flags below to `XLA_FLAGS` (GPU) or `LIBTPU_INIT_ARGS` (TPU) and prints one
line saying which; on a CPU it does nothing. A flag already present in those variables is never
overridden, so a user sets any of them the usual way:

    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false python -m llava_jax.train ...
    LLAVA_JAX_XLA_FLAGS=0 python -m llava_jax.train ...     # add none (or --noxla_perf_flags,
                                                            # generate/chat: --no-xla-flags)

Which flags: XLA:GPU's `-O1` set (openxla.org/xla/gpu_optimization_levels: collectives
pipelined across the scanned layers, the latency-hiding scheduler, while loops double-buffered)
and MaxText's TPU collective-overlap flags. Names are checked against this jaxlib and libtpu by
tests/test_xla_flags.py; what they buy on an H200 or a TPU is unmeasured so far (BENCHMARKS.md).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

ENV_SWITCH = "LLAVA_JAX_XLA_FLAGS"

GPU_FLAGS = {
    # Overlap FSDP all-gathers / reduce-scatters with compute, across layers of the scanned stack.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}
TPU_FLAGS = {
    # Fuse and overlap collectives with compute (MaxText's defaults for FSDP training).
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
}
PRESETS = {"gpu": ("XLA_FLAGS", GPU_FLAGS), "tpu": ("LIBTPU_INIT_ARGS", TPU_FLAGS)}


def detect_platform() -> str | None:
    """"gpu", "tpu" or None (CPU or unknown), without starting JAX: `JAX_PLATFORMS` if set, else
    an installed CUDA plugin with an NVIDIA device node, or libtpu with a TPU device node."""
    requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return {"cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(requested)
    cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    if cuda and glob.glob("/dev/nvidia[0-9]*"):
        return "gpu"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    return None


def merge(existing: str, flags: dict[str, str]) -> tuple[str, list[str]]:
    """`existing` plus those of `flags` whose names it does not already set; (new value, added)."""
    present = {f.lstrip("-").split("=", 1)[0] for f in existing.split()}
    added = [f"--{k}={v}" for k, v in flags.items() if k not in present]
    return " ".join([existing.strip(), *added]).strip(), added


def apply(enabled: bool = True, platform: str | None = None, out=sys.stderr) -> list[str]:
    """Add the preset for this machine's platform to its environment variable; return what was added.

    Does nothing when disabled (argument or `LLAVA_JAX_XLA_FLAGS=0`), on a CPU, or once JAX has
    started a backend (the flags would be ignored; it says so).
    """
    if not enabled or os.environ.get(ENV_SWITCH, "1").lower() in ("0", "false", "no", "off"):
        return []
    platform = platform or detect_platform()
    if platform not in PRESETS:
        return []
    var, flags = PRESETS[platform]
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        print(f"llava_jax: JAX already started; {var} presets not applied", file=out)
        return []
    os.environ[var], added = merge(os.environ.get(var, ""), flags)
    if added:
        print(f"llava_jax: {var} += {' '.join(added)}  (set {ENV_SWITCH}=0 to skip; llava_jax/parallel/xla_flags.py)",
              file=out)
    return added
