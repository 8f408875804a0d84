"""Per-device memory of the LLaVA-1.5 train step for each remat policy, from the compiler alone.

    python -m bench.remat_memory --topology v5p:2x2x1 --policies full,save_dot_except_mlp,minimal
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.remat_memory --topology cpu:8

Compiles the real step (`make_train_step` under `jit_sharded`, FSDP over every device, bf16
compute, float32 master weights and AdamW) from abstract shapes, no weights or data, for a TPU
topology through libtpu (`jax.experimental.topologies`, on a CPU host) or for this host's
devices, and prints per-device arguments and temporaries against the chip's HBM. `--layers`
compiles a shallower model: per-layer costs are linear in depth, so `--layers 2,4` and the
difference extrapolate to 32 (printed as such). Step time per policy needs the real chip.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bench.common import with_layers
from llava_jax.config import LLAVA_15_7B, LLAVA_15_13B
from llava_jax.models.remat import REMAT_POLICIES
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.mesh import AXES
from llava_jax.parallel.partition import abstract_sharded_params, batch_shardings, jit_sharded, state_shardings
from llava_jax.train.optimizer import make_optimizer, split_params
from llava_jax.train.step import create_state, make_train_step

HBM_GIB = {"v5p": 95, "v5e": 16, "v6e": 32, "v4": 32}
STAGES = {1: ["projector/.*"], 2: ["projector/.*", "language_model/.*"]}
GIB = 2**30


def devices(topology: str):
    """The devices to compile for: `cpu:N` (this host's) or a TPU topology name like v5p:2x2x1."""
    if topology.startswith("cpu"):
        return jax.devices()
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = (tuple(int(x) for x in topology.split(":")[1].split("x")) + (1, 1, 1))[:3]
    host = (2, 2, 1) if topology.startswith(("v4", "v5p")) else (2, 4, 1)  # chips per host
    bounds = tuple(min(d, h) for d, h in zip(dims, host))
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1).devices


def compile_step(cfg, devs, *, stage: int, rows: int, seq: int) -> dict:
    """Compile one train step; its per-device memory (GiB) and compile seconds."""
    mesh = Mesh(np.array(devs).reshape(1, len(devs), 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = rules_lib.DEFAULT_RULES
    params = abstract_sharded_params(cfg, mesh, rules)
    tx, schedule = make_optimizer(learning_rate=2e-5, total_steps=5000)
    trainable, frozen = split_params(params, STAGES[stage])
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.dtype, sharding=x.sharding), frozen)
    abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    shardings = state_shardings(abstract, cfg, mesh, rules, tx)
    v = cfg.vision
    batch = {"input_ids": jax.ShapeDtypeStruct((1, rows, seq), np.int32),
             "labels": jax.ShapeDtypeStruct((1, rows, seq), np.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, rows, seq), np.int32),
             "pixel_values": jax.ShapeDtypeStruct((1, rows, 1, v.image_size, v.image_size, 3), jnp.dtype(cfg.dtype))}
    step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (shardings, batch_shardings(batch, mesh)),
                       (shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    t0 = time.time()
    mem = step.lower(abstract, batch).compile().memory_analysis()
    return {"compile_s": round(time.time() - t0, 1), "argument_gib": mem.argument_size_in_bytes / GIB,
            "temp_gib": mem.temp_size_in_bytes / GIB, "host_temp_gib": mem.host_temp_size_in_bytes / GIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p:2x2x1", help="a TPU topology (v5p:2x2x1, v5e:2x4, ...) or cpu:N")
    ap.add_argument("--model", choices=["7b", "13b"], default="7b")
    ap.add_argument("--stage", type=int, choices=[1, 2], default=2)
    ap.add_argument("--policies", default="full,save_qkv_proj,save_dot_except_mlp,minimal")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--layers", default="", help="e.g. 2,4: compile at these depths and extrapolate")
    ap.add_argument("--rows-per-device", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devs = devices(args.topology)
    base = {"7b": LLAVA_15_7B, "13b": LLAVA_15_13B}[args.model].replace(dtype="bfloat16", attention=args.attention)
    depths = [int(x) for x in args.layers.split(",") if x] or [base.text.num_layers]
    rows = args.rows_per_device * len(devs)
    hbm = next((g for k, g in HBM_GIB.items() if args.topology.startswith(k)), None)
    results = []
    print(f"{args.model} stage {args.stage}, {args.topology} ({len(devs)} devices, fsdp), {rows} x {args.seq} "
          f"tokens, attention={args.attention}; per device, GiB", flush=True)
    print("| remat | arguments | temporaries | host temporaries | total | of HBM | compile s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in args.policies.split(","):
        if policy not in REMAT_POLICIES:
            raise SystemExit(f"unknown remat policy {policy!r}; choose from {REMAT_POLICIES}")
        by_depth = {}
        for depth in depths:
            cfg = with_layers(base, depth).replace(remat=policy)
            try:
                by_depth[depth] = compile_step(cfg, devs, stage=args.stage, rows=rows, seq=args.seq)
            except Exception as e:  # noqa: BLE001  (a policy the platform cannot compile: say so, go on)
                by_depth[depth] = {"error": str(e).splitlines()[0][:200]}
        if any("error" in r for r in by_depth.values()):
            err = next(r["error"] for r in by_depth.values() if "error" in r)
            print(f"| {policy} | - | - | - | - | - | - | does not compile: {err} |")
            results.append({"policy": policy, "error": err})
            continue
        r = dict(by_depth[depths[-1]])
        note = f"{depths[-1]} layers"
        if len(depths) == 2:  # linear in depth: extrapolate to the model's
            (d0, r0), (d1, r1) = sorted(by_depth.items())
            full = base.text.num_layers
            for k in ("argument_gib", "temp_gib", "host_temp_gib"):
                r[k] = r1[k] + (r1[k] - r0[k]) / (d1 - d0) * (full - d1)
            r["compile_s"] = r0["compile_s"] + r1["compile_s"]
            note = f"extrapolated to {full} layers from {d0} and {d1}"
        total = r["argument_gib"] + r["temp_gib"]
        share = f"{total / hbm:.0%}" if hbm else "-"
        print(f"| {policy} | {r['argument_gib']:.1f} | {r['temp_gib']:.1f} | {r['host_temp_gib']:.1f} | {total:.1f} | "
              f"{share} | {r['compile_s']} | {note} |", flush=True)
        results.append({"policy": policy, **r, "note": note})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "model": args.model, "stage": args.stage, "rows": rows,
                       "seq": args.seq, "attention": args.attention, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
