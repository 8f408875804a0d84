"""Generate with a tiny LLaVA on one device and on meshes of simulated CPU devices, in a fresh
process (the device count is process-wide), and print the results as JSON. Used by
tests/test_decode_mesh.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests._decode_mesh_worker SEED
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.inference.engine import Engine, Prompt
from llava_jax.inference.sampling import SamplingParams
from llava_jax.inference.slots import SlotEngine
from llava_jax.models.llava import LlavaModel
from llava_jax.parallel.mesh import make_mesh
from tests._params import host_random_params

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=256),
    image_token_index=127,
    vision_feature_layer=-2,
)
NEW = 24  # crosses the first cache window (16): the growth runs sharded too
MESHES = {"tensor2": (1, 1, 2), "data2_tensor2": (2, 1, 2)}  # (data, fsdp, tensor)


def random_params(seed: int) -> dict:
    """Fan-in scaled matrices, norm scales near 1: logits far from ties (unlike init_params)."""
    return host_random_params(CFG, seed)


def prompts(seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    out = []
    for images, text in ((0, 9), (1, 4), (2, 7)):
        ids = [1] + list(rng.integers(3, 120, 3))
        for _ in range(images):
            ids += [CFG.image_token_index] * CFG.num_image_tokens + list(rng.integers(3, 120, 2))
        ids += list(rng.integers(3, 120, text))
        px = rng.standard_normal((images, 28, 28, 3)).astype(np.float32) if images else None
        out.append(Prompt(np.asarray(ids, np.int32), px))
    return out


def run(engine: Engine, ps: list[Prompt]) -> dict:
    greedy = engine.generate(ps, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    return {"tokens": [c.token_ids for c in greedy], "logprobs": [c.logprobs for c in greedy]}


def main(seed: int) -> None:
    model = LlavaModel(CFG, random_params(seed))
    ps = prompts(seed)
    out = {"single": run(Engine(model), ps), "int8_single": run(Engine(model, int8=True), ps)}
    mesh = make_mesh(1, 1, 2, devices=jax.devices()[:2])
    int8 = Engine(model, mesh=mesh, int8=True)
    out["int8_tensor2"] = run(int8, ps)
    mlp = int8.params["language_model"]["layers"]["mlp"]
    out["int8_tensor2"]["specs"] = {f"{proj}/{leaf}": [str(a) for a in mlp[proj][leaf].sharding.spec]
                                    for proj in ("gate_proj", "down_proj") for leaf in ("kernel", "kernel_scale")}
    out["int8_tensor2"]["dtype"] = str(mlp["gate_proj"]["kernel"].dtype)
    for name, shape in MESHES.items():
        mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        engine = Engine(model, mesh=mesh)
        out[name] = run(engine, ps)
        q = engine.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        state = engine.prefill(engine.prepare(ps, params), params)
        out[name]["q_kernel_spec"] = [str(a) for a in q.sharding.spec]
        out[name]["cache_shard_shape"] = list(state.cache["k"].addressable_shards[0].data.shape)
        out[name]["cache_shape"] = list(state.cache["k"].shape)
    # The slot engine on tensor=2 (its prefill, insert and decode programs sharded, the cache split): two
    # requests decoding side by side get the single device's ids. One prompt, so that one prefill compiles;
    # requests joining a running batch are tests/test_inference_slots.py's.
    slots = SlotEngine(Engine(model, mesh=make_mesh(1, 1, 2, devices=jax.devices()[:2])), max_batch=2,
                       max_len=64).start()
    handles = [slots.submit(ps[1], SamplingParams(max_new_tokens=NEW, ignore_eos=True, seed=s)) for s in (1, 2)]
    out["slots_tensor2"] = {"tokens": [h.result(timeout=300).token_ids for h in handles]}
    out["slots_tensor2"]["cache_shard_shape"] = list(slots._state.cache["k"].addressable_shards[0].data.shape)
    out["slots_tensor2"]["cache_shape"] = list(slots._state.cache["k"].shape)
    slots.stop()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))
