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

import jax
import numpy as np

from bench.forward import SHAPES
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import abstract_sharded_params
from llava_jax.train import lora as lora_train
from llava_jax.train.aot import abstract_batch, topology_devices
from llava_jax.train.defaults import lora, stage
from llava_jax.train.program import stage_program

GIB = 1 << 30
PROJECTOR, PROJECTOR_AND_LLM = ["projector/.*"], ["projector/.*", "language_model/.*"]


def compile_step(cfg, mesh, batch: int, seq: int, lora_rank: int) -> dict:
    """Compile one stage-2 step (full, or LoRA of `lora_rank`) for `mesh`, built by the training loop's
    own `train/program.stage_program` (as compile-only builds it); per-device memory in GiB."""
    st = stage("finetune", data="", template="", trainable=PROJECTOR if lora_rank else PROJECTOR_AND_LLM,
               learning_rate=2e-4 if lora_rank else 2e-5, global_batch=batch, micro_batch=batch, max_length=seq,
               lora=lora(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.05, non_lora_learning_rate=2e-5)
               if lora_rank else None)
    rules = rules_lib.DEFAULT_RULES
    if lora_rank:  # the adapters the loop adds for the stage (train/lora.py)
        cfg = cfg.replace(lora=lora_train.resolve_spec(st.lora, cfg))
    params = abstract_sharded_params(cfg, mesh, rules)
    program = stage_program(cfg, st, mesh, rules, 5000, params)
    t0 = time.time()
    compiled = program.step.lower(program.state_abstract, abstract_batch(cfg, 1, batch, seq, mesh)).compile()
    mem = compiled.memory_analysis()
    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.split(params)[0]))
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
    # FSDP over every device: a TPU topology's (through libtpu) or this host's.
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=topology_devices(args.topology) if args.topology else None)
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
