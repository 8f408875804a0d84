"""Run a few sharded train steps in a fresh process (device count and distributed set-up are
process-wide in JAX) and print the per-step losses as JSON. Used by tests/test_parallel.py.

    python -m tests._parallel_worker MESHES          # e.g. "8,1,1;2,2,2" with 8 host devices
    python -m tests._parallel_worker --compile-7b    # AOT-compile the 7B stage-2 step on 8 devices
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.distributed import maybe_initialize
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import device_batch
from llava_jax.train.defaults import stage
from llava_jax.train.program import stage_program
from llava_jax.train.step import to_microbatches
from tests._params import host_random_params

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
    # Same values on every mesh, drawn on the host: init_params would compile its initializers in every
    # worker process (a jit per device count; ~20 s of a loaded 2-core CPU each).
    params = host_random_params(cfg, 0)
    st = stage("finetune", data="", template="", trainable=["(projector|language_model)/.*"], learning_rate=1e-3,
               global_batch=ROWS, micro_batch=ROWS // MICRO, warmup_ratio=0.0)
    program = stage_program(cfg, st, mesh, rules, 10, params)  # as the training loop builds it
    state, step = program.init_state(params), program.step
    batch = global_batch(cfg)
    per_process = ROWS // jax.process_count()
    local = {k: v[jax.process_index() * per_process : (jax.process_index() + 1) * per_process] for k, v in batch.items()}
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, device_batch(to_microbatches(local, MICRO), mesh))
        losses.append(float(metrics["loss"]))
    return losses


def compile_7b() -> dict:
    """Lower and compile the LLaVA-1.5-7B stage-2 step for 8 devices from abstract shapes only, through
    compile-only (train/aot.py), with one micro-batch of 8 rows x 2048 tokens."""
    from configs.llava15 import get_config
    from llava_jax.train import aot

    config = get_config("7b_stage2")
    config.model.init = ""  # the architecture from model.preset
    config.stages[0].global_batch = config.stages[0].micro_batch = 8
    report = aot.compile_stage(config, 0)
    gib = 1 << 30
    return {"compile_s": report.compile_s, "mesh": "fsdp=8", "batch": f"8x{report.seq_len}",
            "argument_gib": report.argument_bytes / gib, "output_gib": report.output_bytes / gib,
            "temp_gib": report.temp_bytes / gib, "alias_gib": report.alias_bytes / gib}


if __name__ == "__main__":
    maybe_initialize()
    if sys.argv[1] == "--compile-7b":
        print(json.dumps(compile_7b()))
    else:
        shapes = [tuple(int(x) for x in m.split(",")) for m in sys.argv[1].split(";")]
        print(json.dumps({";".join(map(str, s)): run(s) for s in shapes}))
