"""Per-device memory of the stage-2 train step, LoRA against full fine-tuning at the same batch, from the
compiler (ahead of time, abstract shapes only: nothing is allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.lora_memory             # 8 CPU devices
    JAX_PLATFORMS=cpu python -m bench.lora_memory --topology v5e:2x4                           # TPU v5e-8 (libtpu)
    python -m bench.lora_memory --shape small --batch 4 --seq 256                              # quick check

Both steps are built as the training loop builds them: the same trainable/frozen split (frozen in the
compute dtype, no optimizer state), the same optimizer (LoRA: two learning rates), the same
shardings from the rules table (FSDP over every device). Full: projector + LLM trained. LoRA:
LLaVA-1.5's finetune_lora.sh (r 128, alpha 256, every Linear of the LLM's layers, projector trained).
The CPU compiler does not schedule FSDP all-gathers for memory as the TPU and GPU ones do: its
temporaries are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bench.forward import SHAPES
from llava_jax.models.lora import DECODER_LINEARS, LoraSpec
from llava_jax.models.llava import init_params
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.partition import batch_shardings, jit_sharded, model_param_shardings, state_shardings
from llava_jax.train.lora import ADAPTER_PATTERNS
from llava_jax.train.optimizer import make_optimizer, split_params
from llava_jax.train.step import create_state, make_train_step

GIB = 1 << 30
PROJECTOR, PROJECTOR_AND_LLM = ["projector/.*"], ["projector/.*", "language_model/.*"]


def compile_step(cfg, mesh: Mesh, batch: int, seq: int, lora_rank: int) -> dict:
    """Compile one stage-2 step (full, or LoRA of `lora_rank`) for `mesh`; per-device memory in GiB."""
    if lora_rank:
        cfg = cfg.replace(lora=LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank, targets=DECODER_LINEARS, dropout=0.05))
    rules = rules_lib.DEFAULT_RULES
    sh = model_param_shardings(cfg, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))), sh)
    tx, schedule = make_optimizer(learning_rate=2e-4 if lora_rank else 2e-5, total_steps=5000,
                                  other_learning_rate=2e-5 if lora_rank else None, other=PROJECTOR)
    trainable, frozen = split_params(params, PROJECTOR + list(ADAPTER_PATTERNS) if lora_rank else PROJECTOR_AND_LLM)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.dtype, sharding=x.sharding), frozen)
    abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    shardings = state_shardings(abstract, cfg, mesh, rules, tx)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    v = cfg.vision
    b = {
        "input_ids": jax.ShapeDtypeStruct((1, batch, seq), np.int32),
        "labels": jax.ShapeDtypeStruct((1, batch, seq), np.int32),
        "attention_mask": jax.ShapeDtypeStruct((1, batch, seq), np.int32),
        "pixel_values": jax.ShapeDtypeStruct((1, batch, 1, v.image_size, v.image_size, 3), cfg.dtype),
    }
    bsh = batch_shardings(b, mesh)
    b = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bsh[k]) for k, x in b.items()}
    step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (shardings, bsh),
                       (shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    t0 = time.time()
    compiled = step.lower(abstract, b).compile()
    mem = compiled.memory_analysis()
    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return {
        "mode": f"LoRA r={lora_rank}" if lora_rank else "full",
        "trained_params_M": round(trained / 1e6, 1),
        "compile_s": round(time.time() - t0, 1),
        "argument_gib": round(mem.argument_size_in_bytes / GIB, 2),
        "output_gib": round(mem.output_size_in_bytes / GIB, 2),
        "alias_gib": round(mem.alias_size_in_bytes / GIB, 2),
        "temp_gib": round(mem.temp_size_in_bytes / GIB, 2),
        # donated state: outputs alias arguments, so the peak is arguments + temporaries (+ un-aliased outputs)
        "total_gib": round((mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                            + mem.temp_size_in_bytes) / GIB, 2),
    }


def topology_mesh(name: str) -> Mesh:
    """A mesh (data 1, fsdp = every chip, tensor 1) over the chips of a TPU topology, e.g. `v5e:2x4`."""
    from jax.experimental import topologies

    kind, _, shape = name.partition(":")
    dims = tuple(int(d) for d in shape.split("x"))
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                        chips_per_host_bounds=dims + (1,) * (3 - len(dims)), num_slices=1)
    devices = np.array(topo.devices)
    return Mesh(devices.reshape(1, devices.size, 1), ("data", "fsdp", "tensor"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    ap.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lora", type=int, default=128, help="LoRA rank")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--topology", default=None, help="a TPU topology (e.g. v5e:2x4), compiled with libtpu; "
                                                     "default: this host's devices")
    args = ap.parse_args()
    cfg = SHAPES[args.shape].replace(dtype="bfloat16", remat=args.remat)
    if args.topology:
        mesh = topology_mesh(args.topology)
    else:
        mesh = Mesh(np.array(jax.devices()).reshape(1, -1, 1), ("data", "fsdp", "tensor"))
    where = args.topology or f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"stage-2 step, shape={args.shape}, batch {args.batch} x {args.seq}, bf16, remat={args.remat}, "
          f"fsdp over {mesh.devices.size} devices ({where})")
    print("| mode | trained params (M) | arguments (GiB) | temporaries (GiB) | total per device (GiB) | compile (s) |")
    print("|---|---|---|---|---|---|")
    for rank in (0, args.lora):
        r = compile_step(cfg, mesh, args.batch, args.seq, rank)
        print(f"| {r['mode']} | {r['trained_params_M']} | {r['argument_gib']} | {r['temp_gib']} | {r['total_gib']} | "
              f"{r['compile_s']} |", flush=True)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
