"""Compile-only: lower and compile each stage's real train step from shapes alone, and report the
compile time and per-device memory against the chip's (MaxText's train_compile).

    python -m llava_jax.train --config=configs/llava15.py:7b --config.compile_only=True
    python -m llava_jax.train --config=configs/llava15.py:7b --config.compile_only=True \\
        --config.compile_topology=v5e:2x4          # a TPU v5e-8, compiled here through libtpu

No weights and no data are read: the architecture comes from `model.init`'s config when that
directory exists, else from `model.preset` (configs/llava15.py names one), else from the `model`
fields of a random-init config. The mesh, remat, dtype, micro-batch and global batch are the
config's, and the step is built by `program.stage_program`, as training builds it. Sequences are
`max_length` long (the longest bucket, so the memory is the worst case) with one image per row; for an
anyres (LLaVA-NeXT) model that image has the most patches any pinpoint gives (v1.6: base + 2 x 2 tiles;
one base tile in a `base_resolution` stage) and the batch carries the `image_index` the model places the
features by.

`compile_topology` needs libtpu (`pip install -e ".[tpu]"`); any host can compile for any
topology (`v5e:2x4`, `v5e:4x4`, `v5p:2x2x1`, `v6e:2x4`, ...). Without it the step compiles for
this host's devices (simulate N CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N).
The CPU compiler does not schedule FSDP all-gathers for memory as the TPU and GPU compilers do:
its temporaries are an upper bound.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
import types
from typing import Any

import jax
import ml_collections
import numpy as np

from llava_jax import paths
from llava_jax.anyres import CORNERS, AnyresConfig, image_slots
from llava_jax.config import CONFIG_FILE, PRESETS, LlavaConfig
from llava_jax.parallel import compile_cache
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import abstract_sharded_params, batch_shardings, sharded_shapes
from llava_jax.train import hlo_flops
from llava_jax.train.program import compute_config, rules_from_config, stage_program
from llava_jax.train.validate import has_architecture, validate

GIB = 1 << 30
# High-bandwidth memory per chip (vendor figures), by `device_kind`.
CHIP_MEMORY_GIB = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,  # v5e
    "TPU v5": 95.0,  # v5p
    "TPU v6 lite": 32.0,  # v6e (Trillium)
    "NVIDIA A100-SXM4-80GB": 80.0,
    "NVIDIA H100 80GB HBM3": 80.0,
    "NVIDIA H200": 141.0,
}
SCHEDULE_STEPS = 1000  # the learning-rate schedule's length does not change the compiled program


@dataclasses.dataclass
class CompileReport:
    """Per-device figures of one compiled stage step (bytes from the compiler's memory analysis)."""

    stage: str
    devices: str  # e.g. "8 x TPU v5 lite"
    mesh: dict[str, int]
    remat: str
    micro_batch: int  # rows per micro-batch, all devices together
    num_micro: int
    seq_len: int
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    chip_bytes: int | None  # the device's memory, when known
    image_slots: int = 1  # tile slots a row the step computes the vision tower over (filled or not)
    error: str | None = None  # the compiler's out-of-memory refusal (temporaries then from its message)
    cost: dict[str, Any] | None = None  # the compiler's cost figures and the loop-counted FLOPs (`cost_figures`)

    @property
    def total_bytes(self) -> int:
        """Live at the peak: arguments, outputs not aliased to (donated) arguments, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        if self.error:
            return False
        return None if self.chip_bytes is None else self.total_bytes <= self.chip_bytes

    def line(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        head = (f"{self.stage}: {self.devices}, mesh {mesh}, remat {self.remat}, micro-batch {self.micro_batch} rows "
                f"x {self.seq_len} tokens ({self.num_micro} per step)")
        mem = (f"compile {self.compile_s:.1f} s; per device: arguments {_size(self.argument_bytes)}, "
               f"temporaries {_size(self.temp_bytes)}, total {_size(self.total_bytes)}")
        if self.error:
            mem = (f"DOES NOT FIT: the compiler needs {_size(self.temp_bytes)} of temporaries, "
                   f"{_size(self.chip_bytes)} of HBM are available (arguments {_size(self.argument_bytes)})")
        elif self.chip_bytes is not None:
            pct = 100 * self.total_bytes / self.chip_bytes
            mem += f" of {self.chip_bytes / GIB:.0f} GiB ({pct:.0f}%): {'fits' if self.fits else 'DOES NOT FIT'}"
        if self.cost:
            optimal = self.cost["compiler_optimal_seconds"]
            estimate = f", optimal_seconds {optimal:.3g}" if optimal is not None else ""
            mem += (f"\n  per device and step: {self.cost['hlo_flops']:.3g} matmul FLOPs with loops counted (the "
                    f"compiler's estimate, each loop body once: {self.cost['compiler_flops']:.3g} FLOPs{estimate}; "
                    "bench/compile.py --costs)")
        return f"{head}\n  {mem}"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.2f} MiB"


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as `v5e:2x4`, `v5p:2x2x1` or `v6e:4x4`, from libtpu (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compile_topology={name!r} needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    # Compiling touches no chip: it may run beside another process that has libtpu loaded (which
    # otherwise holds /tmp/libtpu_lockfile). Read when libtpu loads, so set before the first use.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default", num_slices=1)
    except Exception as e:  # libtpu raises its own errors for names it does not know
        raise ValueError(f"compile_topology={name!r}: libtpu cannot build it ({str(e).splitlines()[0][:200]}); "
                         "expected e.g. v5e:2x4, v5p:2x2x1, v6e:2x4") from None
    return list(topo.devices)


def model_config(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict | None = None) -> LlavaConfig:
    """The architecture compile-only uses (see the module docstring), with the run's (and `stage`'s) compute settings."""
    m = config.model
    init = m.init
    if init and paths.isfile(os.path.join(init, CONFIG_FILE)):
        cfg = LlavaConfig.load(init)
    elif m.preset:
        if m.preset not in PRESETS:
            raise ValueError(f"model.preset {m.preset!r} is not one of {sorted(PRESETS)}")
        cfg = PRESETS[m.preset]
    elif has_architecture(m):
        from llava_jax.train.loop import model_config as random_init_config

        # The tokenizer only sizes the vocabulary; a stand-in of the size the run would have.
        vocab = config.data.synthetic_args.vocab_size
        cfg = random_init_config(config, types.SimpleNamespace(vocab_size=vocab, bos_id=1, eos_id=2))
    else:
        raise ValueError("compile_only needs the architecture: model.init (a converted directory), model.preset "
                         f"(one of {sorted(PRESETS)}) or the model.vision / model.text fields")
    return compute_config(cfg, config, stage)


def abstract_batch(cfg: LlavaConfig, num_micro: int, micro_batch: int, seq_len: int, mesh,
                   max_images: int = 1, geometry: AnyresConfig | None = None, packed: bool = False,
                   num_frames: int = 0) -> dict:
    """The micro-batched global batch the loop feeds the step ([A, b, ...], sharded as `device_batch` does).

    `pixel_values` [A, b, S, H, W, 3] holds S = `max_images` x `geometry.max_patches` tile slots a row (the
    data pipeline's static worst case; `geometry`: the stage's, default the model's): one slot an image for
    LLaVA-1.5 or a base-resolution stage, base + tiles of the largest pinpoint for anyres; OneVision's untiled
    several images one slot each (`anyres.image_slots`, unpacked rows). An anyres model's
    batches add `image_index` [A, b, T] int32 (the feature-table row of each image token), which the step
    passes to the model, and a weighted geometry's (OneVision) `image_index` and `image_weight` [A, b, T, 4]
    (int32, float32); `packed` ones (data.packing) `segment_ids` and `positions` [A, b, T] int32, and
    `max_images` is then the pipeline's images a row (`pipeline.images_per_row`). `num_frames`: video frames a
    row's slots add (unpacked rows; packed ones count them in `max_images`).
    """
    v = cfg.vision
    rows = (num_micro, micro_batch)
    geometry = geometry or cfg.geometry
    slots = max_images * geometry.max_patches if packed else image_slots(geometry, max_images) + num_frames
    shapes = {
        "input_ids": ((*rows, seq_len), np.int32),
        "labels": ((*rows, seq_len), np.int32),
        "attention_mask": ((*rows, seq_len), np.int32),
        "pixel_values": ((*rows, slots, v.image_size, v.image_size, v.num_channels), np.float32),
    }
    if cfg.is_anyres and (geometry or cfg.geometry).weighted:
        shapes["image_index"] = ((*rows, seq_len, CORNERS), np.int32)
        shapes["image_weight"] = ((*rows, seq_len, CORNERS), np.float32)
    elif cfg.is_anyres:
        shapes["image_index"] = ((*rows, seq_len), np.int32)
    if packed:
        shapes["segment_ids"] = shapes["positions"] = ((*rows, seq_len), np.int32)
    batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return sharded_shapes(batch, batch_shardings(batch, mesh))


def compile_stage(config: ml_collections.ConfigDict, index: int, devices: list | None = None,
                  hlo_path: str | None = None) -> CompileReport:
    """Lower and compile stage `index`'s train step for `devices` (default: this host's) from shapes alone.

    `hlo_path`: also write the compiled program's optimized HLO text there (gzip), to read its cost figures."""
    stage = config.stages[index]
    cfg = model_config(config, stage)
    mesh = make_mesh(**config.mesh.to_dict(), devices=devices)
    rules = rules_from_config(config)
    if stage.lora:  # the adapters the stage adds to the frozen base, as the loop adds them
        from llava_jax.train import lora as lora_train

        cfg = cfg.replace(lora=lora_train.resolve_spec(stage.lora, cfg))
        lora_train.check_rank_splits(cfg.lora, mesh, rules)
    if stage.global_batch % stage.micro_batch:
        raise ValueError(f"stage {stage.name}: global_batch {stage.global_batch} must divide by micro_batch {stage.micro_batch}")
    num_micro = stage.global_batch // stage.micro_batch
    row_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if stage.micro_batch % row_split:
        raise ValueError(f"stage {stage.name}: a micro-batch of {stage.micro_batch} rows does not split over the "
                         f"{row_split} devices of data x fsdp")
    params = abstract_sharded_params(cfg, mesh, rules)
    total = config.max_steps if config.max_steps > 0 else SCHEDULE_STEPS
    program = stage_program(cfg, stage, mesh, rules, total, params)
    # data.max_images_per_sample images a row, cut as the loop cuts the stage's images (a `base_resolution`
    # stage of an anyres model: one base tile an image); packed rows hold as many as the pipeline gives them.
    from llava_jax.data.pipeline import images_per_row, video_images
    from llava_jax.train.loop import stage_geometry

    geometry, _ = stage_geometry(cfg, stage, None, False)
    images = config.data.max_images_per_sample
    frames = config.data.num_frames if geometry.video else 0  # as the loop reads video records
    seq_len = stage.max_length
    if config.data.packing:
        seq_len = stage.row_length or stage.max_length  # the pipeline's packed rows
        images = images_per_row(geometry, seq_len, images + video_images(geometry, frames),
                                config.data.max_images_per_row)
    batch = abstract_batch(cfg, num_micro, stage.micro_batch, seq_len, mesh, max_images=images,
                           geometry=geometry, packed=config.data.packing, num_frames=frames)
    start = time.time()
    lowered = program.step.lower(program.state_abstract, batch)
    device = mesh.devices.flat[0]
    chip = config.compile_chip_memory_gib or CHIP_MEMORY_GIB.get(device.device_kind)
    report = CompileReport(
        stage=f"stage {index + 1} {stage.name}",
        devices=f"{mesh.devices.size} x {device.device_kind}",
        mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
        remat=cfg.remat,
        micro_batch=stage.micro_batch,
        num_micro=num_micro,
        seq_len=seq_len,
        compile_s=0.0,
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=0,
        chip_bytes=None if chip is None else int(float(chip) * GIB),
        image_slots=images * geometry.max_patches if config.data.packing else image_slots(geometry, images),
    )
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit and says how much it needed.
        needed = _OOM.search(str(e))
        if needed is None:
            raise
        temp, available = (float(x) * GIB for x in needed.groups())
        return dataclasses.replace(report, compile_s=time.time() - start, argument_bytes=_input_bytes(program, batch),
                                   temp_bytes=int(temp), chip_bytes=int(available), error=str(e).splitlines()[0][:300])
    seconds = time.time() - start
    if hlo_path:
        import gzip

        with gzip.open(hlo_path, "wt") as f:
            f.write(compiled.as_text())
    mem = compiled.memory_analysis()
    return dataclasses.replace(
        report,
        cost=cost_figures(compiled),
        compile_s=seconds,
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
    )


# "the total memory required for HLO temporaries (45.06G) exceeds available HBM (15.75G)"
_OOM = re.compile(r"HLO temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)")


def _input_bytes(program, batch: dict) -> int:
    """One device's shards of the state and the batch: the arguments, when the compiler gives no figures."""

    def shard_bytes(x, sharding) -> int:
        return math.prod(sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize

    state = sum(jax.tree.leaves(jax.tree.map(shard_bytes, program.state_abstract, program.state_shardings)))
    return state + sum(shard_bytes(x, x.sharding) for x in batch.values())


def run(config: ml_collections.ConfigDict) -> list[CompileReport]:
    """Compile every stage of `config` (for `compile_topology` when set) and print one report per stage."""
    validate(config)
    compile_cache.enable(config.compilation_cache_dir)
    topology = config.compile_topology
    devices = topology_devices(topology) if topology else None
    reports = []
    for index in range(len(config.stages)):
        report = compile_stage(config, index, devices)
        print(report.line(), flush=True)
        reports.append(report)
    return reports


def cost_figures(compiled) -> dict[str, Any]:
    """One device's cost figures of a compiled program: the compiler's estimates and the loop-counted matmul FLOPs.

    `compiler_flops`, `compiler_bytes` and `compiler_optimal_seconds` are XLA's `cost_analysis()` as it gives
    them (`optimal_seconds` only from the TPU compiler): each loop body counted once. `hlo_flops` counts the
    program's matmuls with every loop at its trip count (llava_jax/train/hlo_flops.py), `hlo_flops_once`
    the same matmuls with each body once, the count to hold against `compiler_flops`.
    """
    analysis = compiled.cost_analysis()
    analysis = (analysis[0] if analysis else {}) if isinstance(analysis, (list, tuple)) else (analysis or {})
    counted = hlo_flops.count(compiled.as_text())
    kernels = sorted({c for c in counted.custom_calls if c not in _BOOKKEEPING_CALLS})
    optimal = analysis.get("optimal_seconds")
    return {"compiler_flops": float(analysis.get("flops", 0.0)),
            "compiler_bytes": float(analysis.get("bytes accessed", 0.0)),
            "compiler_optimal_seconds": None if optimal is None else float(optimal),
            "hlo_flops": counted.flops, "hlo_flops_once": counted.once, "loops": list(counted.loops),
            "unknown_loops": counted.unknown_loops, "kernels": kernels}


# Custom calls that move or allocate memory, not compute: not worth naming among the uncounted kernels.
_BOOKKEEPING_CALLS = frozenset({"AllocateBuffer", "ConcatBitcast", "Sharding", "SPMDFullToShardShape",
                                "SPMDShardToFullShape", "MoveToHost", "MoveToDevice"})


def report_dict(report: CompileReport) -> dict[str, Any]:
    """A report as plain JSON-able values (what bench/compile.py records)."""
    return {**dataclasses.asdict(report), "total_bytes": report.total_bytes, "fits": report.fits}
