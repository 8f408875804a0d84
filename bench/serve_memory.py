"""Per-chip memory of the engine serving LLaVA-1.5 and LLaVA-NeXT, from the compiler alone (no weights, no chip).

    JAX_PLATFORMS=cpu python -m bench.serve_memory --size 7b --topology v5e:2x2            # 4 v5e chips, tensor=4
    JAX_PLATFORMS=cpu python -m bench.serve_memory --size 7b --topology v5e:2x2 --chips 1 --int8   # one chip, int8
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.serve_memory --size 13b   # 2 CPU devices
    JAX_PLATFORMS=cpu python -m bench.serve_memory --size next-7b --topology v5e:2x2 --batch 1 --attention xla
    JAX_PLATFORMS=cpu python -m bench.serve_memory --topology v5e:2x2 --chips 1 --int8 --batch 16 --decode-only

Compiles the engine's two programs, `prefill_step` (vision tower, prompts into a fresh cache, first
token) and `decode_loop` (the `while_loop` of decode steps), exactly as `Engine(model, mesh=
tensor_parallel_mesh(N), int8=...)` runs them: bf16 weights (or int8 with a scale per output
channel) split over `tensor` by the rules table, the KV cache split on kv heads. TPU topologies go
through libtpu's compiler on this host (`pip install -e ".[tpu]"`); without `--topology`, this
host's devices. Prints one markdown row per program: arguments, new outputs (those not written
over a donated input: the prefill's fresh cache), temporaries and their total per chip against
the chip's memory. The cache holds the prompt plus the decode window that `--new`
tokens end in (`Engine`'s doubling from 16 slots).

`--size next-7b` (the `llava-next-7b` preset: Mistral-7B, CLIP-336, v1.6 anyres) serves one `--image-size`
image a row (672 x 672: base + 2 x 2 tiles, 2928 image tokens): the prefill takes the row's tile slots
(`Engine.tile_slots` of one image: its most patches) and the `image_index` that places the features.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.config import PRESETS
from llava_jax.inference import engine as engine_lib
from llava_jax.inference.quant import abstract_quantized
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.attention import target_platform
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import mesh_platform, sharded_shapes
from llava_jax.train.aot import CHIP_MEMORY_GIB, topology_devices

GIB = 1 << 30
SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b", "next-7b": "llava-next-7b"}
TEXT_TOKENS = 65  # a prompt's text around its image (641 - 576 for LLaVA-1.5's default)


def _params(cfg, mesh, rules, int8: bool):
    """The weights' shapes in the compute dtype (int8 kernels with `int8`), sharded as the engine shards them."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.dtype), abstract_params(cfg))
    if int8:
        shapes = abstract_quantized(shapes)
    return sharded_shapes(shapes, engine_lib.param_shardings(shapes, cfg, mesh, rules))


def _buckets(prompt: int, new: int) -> tuple[int, int, int]:
    """The engine's prompt bucket, new-token budget and the cache window the answer's last token is decoded in
    (`Engine`'s doubling from 16 slots)."""
    num_new = engine_lib.bucket(new, engine_lib.MIN_NEW_TOKENS_BUCKET)
    window = engine_lib.FIRST_WINDOW
    while window < new:
        window = engine_lib.next_window(window, num_new)
    return engine_lib.bucket(prompt, engine_lib.MIN_PROMPT_BUCKET), num_new, window


def _figures(compiled, chip) -> dict:
    """Per-chip bytes of one compiled program, in GiB."""
    mem = compiled.memory_analysis()
    args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    new_out = mem.output_size_in_bytes - mem.alias_size_in_bytes  # outputs not written over a donated input
    return {"argument_gib": args_b / GIB, "output_gib": new_out / GIB, "temp_gib": temp_b / GIB,
            "total_gib": (args_b + new_out + temp_b) / GIB, "chip_gib": chip}


def _state_shapes(shapes, mesh, rules):
    """The decode state's shapes sharded as the engine pins them: the cache by `CACHE_AXES`, the rest
    whole (their batch axis maps to `data`, one device here)."""
    cache = NamedSharding(mesh, nn.logical_to_mesh_axes(engine_lib.CACHE_AXES, rules))
    whole = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: whole, shapes)._replace(cache=jax.tree.map(lambda _: cache, shapes.cache))
    return sharded_shapes(shapes, shardings)


def _setup(size: str, devices: list, int8: bool, attention: str):
    """(config in bf16, tensor-parallel mesh over `devices`, rules, sharded weight shapes, a spec maker of
    whole-array shapes on the mesh): what every compiled program here starts from."""
    cfg = PRESETS[SIZES[size]].replace(dtype="bfloat16", attention=attention)
    mesh = make_mesh(data=1, fsdp=1, tensor=len(devices), devices=devices)
    rules = tuple(rules_lib.DEFAULT_RULES)
    whole = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)  # noqa: E731
    return cfg, mesh, rules, _params(cfg, mesh, rules, int8), spec


def compile_engine(size: str, devices: list, *, batch: int, prompt: int, new: int, int8: bool,
                   attention: str = "auto", decode_only: bool = False) -> list[dict]:
    """Compile prefill and decode for `devices` (tensor-parallel over all of them); a dict per program.
    `attention`: the model config's (`xla` shows the prefill without the fused kernel). `prompt` tokens a
    row, one image among them (anyres: its most tiles). `decode_only`: the decode program alone, its state
    shaped by the prefill without compiling it (a batch whose prefill does not fit the chip, as a slot
    engine that prefills fewer rows than it decodes would run)."""
    cfg, mesh, rules, params, spec = _setup(size, devices, int8, attention)
    t, num_new, window = _buckets(prompt, new)
    v = cfg.vision
    warp = {k: spec((batch,), x.dtype) for k, x in SamplingParams().warp_args(batch).items()}  # shapes: nothing runs
    # One image a row: LLaVA-1.5's one slot, or an anyres image's tile slots (Engine.tile_slots of one image).
    slots = cfg.geometry.max_patches
    args = (params, spec((batch, t), np.int32), spec((batch, slots, v.image_size, v.image_size, 3), jnp.bfloat16),
            spec((batch, t), np.int32), spec((batch,), np.uint32), spec((batch,), np.int32), warp,
            spec((batch, engine_lib.MAX_END_IDS), np.int32),
            spec((batch, t), np.int32) if cfg.is_anyres else None)
    module = Llava(cfg)
    out = []
    programs = []
    with target_platform(mesh_platform(mesh)), jax.set_mesh(mesh):
        lowered = engine_lib.prefill_step.lower(module, *args, num_new=num_new, window=window, greedy=True,
                                                rules=rules, int8=int8)
        if decode_only:
            state = _state_shapes(lowered.out_info, mesh, rules)
        else:
            prefill = lowered.compile()
            programs.append(("prefill", prefill))
            state = sharded_shapes(lowered.out_info, prefill.output_shardings)
        decode = engine_lib.decode_loop.lower(module, params, state, spec((), np.int32), spec((), np.int32),
                                              spec((batch,), np.bool_), greedy=True, rules=rules, int8=int8).compile()
        programs.append(("decode", decode))
    chip = CHIP_MEMORY_GIB.get(devices[0].device_kind)
    for name, compiled in programs:
        out.append({"size": size, "program": name, "devices": f"{len(devices)} x {devices[0].device_kind}",
                    "int8": int8, "attention": attention, "batch": batch, "prompt": t, "cache_slots": t + window,
                    **_figures(compiled, chip)})
    return out


def compile_slots(size: str, devices: list, *, slots: int, max_len: int, prompt: int, int8: bool,
                  attention: str = "auto") -> list[dict]:
    """Compile the slot engine's programs for `devices` (`SlotEngine(Engine(model, mesh=...), max_batch=slots,
    max_len=max_len)`): a request's prefill (one row, its prompt bucket, no window), `insert` into the running
    state, and the decode loop over `slots` rows of `max_len` cache slots (the sampling program: the larger one).
    A dict per program."""
    import flax.linen as nn

    from llava_jax.models.llama import init_cache

    cfg, mesh, rules, params, spec = _setup(size, devices, int8, attention)
    t = engine_lib.bucket(prompt, engine_lib.MIN_PROMPT_BUCKET)
    v = cfg.vision
    warp1 = {k: spec((1,), x.dtype) for k, x in SamplingParams().warp_args(1).items()}
    args = (params, spec((1, t), np.int32), spec((1, cfg.geometry.max_patches, v.image_size, v.image_size, 3),
                                                  jnp.bfloat16),
            spec((1, t), np.int32), spec((1,), np.uint32), spec((1,), np.int32), warp1,
            spec((1, engine_lib.MAX_END_IDS), np.int32), spec((1, t), np.int32) if cfg.is_anyres else None)
    split = NamedSharding(mesh, nn.logical_to_mesh_axes(engine_lib.CACHE_AXES, rules))
    cache = jax.eval_shape(lambda: init_cache(cfg.text, slots, max_len, jnp.bfloat16))
    b = slots
    state = engine_lib.DecodeState(
        cache={n: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=split) for n, c in cache.items()},
        kv_mask=spec((b, max_len), np.int32), tokens=spec((b, max_len), np.int32),
        logprobs=spec((b, max_len), np.float32), positions=spec((b,), np.int32), done=spec((b,), np.bool_),
        step=spec((b,), np.int32), seeds=spec((b,), np.uint32), limits=spec((b,), np.int32),
        base=spec((b,), np.int32), warp={k: spec((b,), x.dtype) for k, x in SamplingParams().warp_args(b).items()},
        end_ids=spec((b, engine_lib.MAX_END_IDS), np.int32))
    module = Llava(cfg)
    scalar = spec((), np.int32)
    with target_platform(mesh_platform(mesh)), jax.set_mesh(mesh):
        lowered = engine_lib.prefill_step.lower(module, *args, num_new=max_len, window=0, greedy=False, rules=rules,
                                                int8=int8)
        prefill = lowered.compile()
        prefix = sharded_shapes(lowered.out_info, prefill.output_shardings)
        put = engine_lib.insert.lower(state, prefix, scalar, scalar, rules=rules).compile()
        decode = engine_lib.decode_loop.lower(module, params, state, scalar, scalar, spec((b,), np.bool_),
                                              greedy=False, rules=rules, int8=int8).compile()
    chip = CHIP_MEMORY_GIB.get(devices[0].device_kind)
    return [{"size": size, "program": f"slots {name}", "devices": f"{len(devices)} x {devices[0].device_kind}",
             "int8": int8, "attention": attention, "batch": 1 if name == "prefill" else b, "prompt": t,
             "cache_slots": t if name == "prefill" else max_len, **_figures(compiled, chip)}
            for name, compiled in (("prefill", prefill), ("insert", put), ("decode", decode))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="7b", choices=sorted(SIZES))
    ap.add_argument("--topology", default=None, help="a TPU topology, e.g. v5e:2x2 (default: this host's devices)")
    ap.add_argument("--chips", type=int, default=None, help="tensor-parallel over the first N devices (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=None,
                    help=f"prompt tokens (default: the image's tokens + {TEXT_TOKENS}: 641 for LLaVA-1.5)")
    ap.add_argument("--image-size", type=int, nargs=2, default=(672, 672), metavar=("H", "W"),
                    help="next-7b: the image's size in pixels, which sets its token count (672 672: 2928 tokens)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--attention", default="auto", help="auto | xla (the prefill without the fused kernel)")
    ap.add_argument("--decode-only", action="store_true",
                    help="compile the decode program alone (its state shaped by the prefill, which is not compiled)")
    ap.add_argument("--slots", action="store_true",
                    help="the slot engine's programs (`SlotEngine(max_batch=--batch, max_len=--max-len)`): a request's "
                         "prefill, insert, and the decode loop over every slot")
    ap.add_argument("--max-len", type=int, default=1024, help="--slots: cache slots of each row (prompt + answer)")
    ap.add_argument("--json", default=None, help="append the figures to this file")
    a = ap.parse_args()
    devices = (topology_devices(a.topology) if a.topology else jax.devices())[: a.chips]
    cfg = PRESETS[SIZES[a.size]]
    image_tokens = cfg.image_layout(tuple(a.image_size)).num_tokens if cfg.is_anyres else cfg.num_image_tokens
    if a.slots:
        rows = compile_slots(a.size, devices, slots=a.batch, max_len=a.max_len, prompt=a.prompt or image_tokens +
                             TEXT_TOKENS, int8=a.int8, attention=a.attention)
    else:
        rows = compile_engine(a.size, devices, batch=a.batch, prompt=a.prompt or image_tokens + TEXT_TOKENS,
                              new=a.new, int8=a.int8, attention=a.attention, decode_only=a.decode_only)
    print("| model | weights | devices | program | batch x cache slots | arguments | new outputs | temporaries | total / chip |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chip = f"{r['chip_gib']:.2f} GiB" if r["chip_gib"] else "?"
        print(f"| {r['size']} | {'int8' if r['int8'] else 'bf16'} | {r['devices']} | {r['program']} | "
              f"{r['batch']} x {r['cache_slots']} | {r['argument_gib']:.2f} GiB | {r['output_gib']:.2f} GiB | "
              f"{r['temp_gib']:.2f} GiB | "
              f"{r['total_gib']:.2f} / {chip} |")
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
