"""Run a few sharded train steps in a fresh process (device count and distributed set-up are
process-wide in JAX) and print the per-step losses as JSON. Used by tests/test_parallel.py.

    python -m tests._parallel_worker MESHES          # e.g. "8,1,1;2,2,2" with 8 host devices
    python -m tests._parallel_worker --compile-7b    # AOT-compile the 7B stage-2 step on 8 devices
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import init_params
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.distributed import maybe_initialize
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import device_batch, jit_sharded, state_shardings
from llava_jax.train.optimizer import make_optimizer, split_params
from llava_jax.train.step import create_state, make_train_step, to_microbatches

TINY = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16),
    image_token_index=127,
    vision_feature_layer=-1,
)
ROWS, STEPS, MICRO = 16, 3, 2


def global_batch(cfg: LlavaConfig) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (ROWS, 24)).astype(np.int32)
    ids[::2, 1 : 1 + cfg.num_image_tokens] = cfg.image_token_index  # half the rows carry an image
    labels = np.where(rng.random(ids.shape) < 0.5, ids, -100).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::3, -5:] = 0  # some right padding
    px = rng.standard_normal((ROWS, 1, 28, 28, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}


def run(mesh_shape: tuple[int, int, int], cfg: LlavaConfig = TINY) -> list[float]:
    mesh = make_mesh(*mesh_shape)
    rules = rules_lib.DEFAULT_RULES
    params = jax.device_get(nn.unbox(init_params(cfg, jax.random.key(0))))  # same values on every mesh
    tx, schedule = make_optimizer(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0)
    trainable, frozen = split_params(params, ["(projector|language_model)/.*"])
    abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    shardings = state_shardings(abstract, cfg, mesh, rules, tx)
    state = jax.jit(lambda p, f: create_state(p, f, tx), out_shardings=shardings)(trainable, frozen)
    step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (shardings, None),
                       (shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    batch = global_batch(cfg)
    per_process = ROWS // jax.process_count()
    local = {k: v[jax.process_index() * per_process : (jax.process_index() + 1) * per_process] for k, v in batch.items()}
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, device_batch(to_microbatches(local, MICRO), mesh))
        losses.append(float(metrics["loss"]))
    return losses


def compile_7b() -> dict:
    """Lower and compile the LLaVA-1.5-7B stage-2 step for 8 devices from abstract shapes only."""
    import time

    from llava_jax.config import LLAVA_15_7B
    from llava_jax.parallel.partition import batch_shardings, model_param_shardings

    cfg = LLAVA_15_7B.replace(dtype="bfloat16", remat="full")
    mesh = make_mesh(1, 8, 1)
    rules = rules_lib.DEFAULT_RULES
    sh = model_param_shardings(cfg, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))), sh)
    tx, schedule = make_optimizer(learning_rate=2e-5, total_steps=5000)
    trainable, frozen = split_params(params, ["(projector|language_model)/.*"])
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.dtype, sharding=x.sharding), frozen)
    abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    shardings = state_shardings(abstract, cfg, mesh, rules, tx)
    b, t = 8, 2048
    batch = {
        "input_ids": jax.ShapeDtypeStruct((1, b, t), np.int32),
        "labels": jax.ShapeDtypeStruct((1, b, t), np.int32),
        "attention_mask": jax.ShapeDtypeStruct((1, b, t), np.int32),
        "pixel_values": jax.ShapeDtypeStruct((1, b, 1, 336, 336, 3), cfg.dtype),
    }
    bsh = batch_shardings(batch, mesh)
    step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (shardings, bsh),
                       (shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    t0 = time.time()
    lowered = step.lower(abstract, batch)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    gib = 1 << 30
    out = {"compile_s": time.time() - t0, "mesh": "fsdp=8", "batch": f"{b}x{t}"}
    if mem is not None:
        out.update({"argument_gib": mem.argument_size_in_bytes / gib, "output_gib": mem.output_size_in_bytes / gib,
                    "temp_gib": mem.temp_size_in_bytes / gib, "alias_gib": mem.alias_size_in_bytes / gib})
    return out


if __name__ == "__main__":
    maybe_initialize()
    if sys.argv[1] == "--compile-7b":
        print(json.dumps(compile_7b()))
    else:
        shapes = [tuple(int(x) for x in m.split(",")) for m in sys.argv[1].split(";")]
        print(json.dumps({";".join(map(str, s)): run(s) for s in shapes}))
