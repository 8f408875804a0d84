"""On a TPU the decode loop keeps one KV cache: the compiler's temporaries stay far below the
cache's size. A cache update that the TPU compiler wants in another layout (a dynamic_update_slice of
a [1, B, K, 1, H] block, a scatter with a [K, H] window) made it copy the donated cache into that
layout on entry to the loop and back on exit: a second cache (or half of one) in temporaries, which
the CPU program (`test_decode_hlo.py`) never shows. `llama.write_cache` writes H-wide rows instead.

Compiled for one TPU v5e chip through libtpu on this host (skipped without libtpu); nothing runs.
Before the fix both tests failed here (temporaries 34 and 32 MiB against a 64 MiB cache; now 0)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.inference.engine import MAX_END_IDS, DecodeState, decode_loop
from llava_jax.inference.quant import abstract_quantized
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.attention import target_platform
from llava_jax.models.llama import write_cache
from llava_jax.models.llava import Llava, abstract_params

# Two layers of the 7B's attention (its widths decide the TPU compiler's layouts: narrower ones, or
# one layer, hide the copy), a small vocabulary and MLP; int8 weights, which the compiler keeps as they
# are (it copies bf16 q/k/v kernels into another layout, which would blur the figure).
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=28),
    text=TextConfig(vocab_size=256, hidden_size=4096, intermediate_size=256, num_layers=2, num_heads=32,
                    num_kv_heads=32, head_dim=128),
    image_token_index=255, vision_feature_layer=-1, dtype="bfloat16",
)
B, S, N = 8, 256, 16  # a 64 MiB cache (k and v)
MAX_SHARE = 0.25  # of the cache's bytes: a second cache is 1.0


def _v5e_chip():
    """One TPU v5e chip from libtpu's topology (no TPU needed), or a skip saying why not."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<jax version>' compiles for TPUs on a CPU host)")
    from llava_jax.train.aot import topology_devices

    try:
        return topology_devices("v5e:2x2")[0]
    except Exception as e:  # noqa: BLE001  (libtpu reports set-up problems in many ways)
        pytest.skip(f"libtpu is installed but gives no v5e:2x2 topology here: {str(e).splitlines()[0]}")


def _temporaries_and_cache(lowered) -> tuple[int, int]:
    mem = lowered.compile().memory_analysis()
    cache_bytes = 2 * int(np.prod((CFG.text.num_layers, B, CFG.text.num_kv_heads, S, CFG.text.head_dim))) * 2
    assert mem.alias_size_in_bytes >= cache_bytes  # the cache outputs are the donated inputs
    return mem.temp_size_in_bytes, cache_bytes


def _sds(chip):
    whole = NamedSharding(Mesh(np.array([chip]), ("x",)), PartitionSpec())
    return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)


@pytest.mark.slow(seconds=10)
def test_decode_loop_keeps_one_cache_on_tpu():
    chip = _v5e_chip()
    sds, t = _sds(chip), CFG.text
    cache = {n: sds((t.num_layers, B, t.num_kv_heads, S, t.head_dim), jnp.bfloat16) for n in "kv"}
    warp = {k: sds((B,), x.dtype) for k, x in SamplingParams(max_new_tokens=N).warp_args(B).items()}
    state = DecodeState(
        cache=cache, kv_mask=sds((B, S), jnp.int32), tokens=sds((B, N), jnp.int32), logprobs=sds((B, N), jnp.float32),
        positions=sds((B,), jnp.int32), done=sds((B,), jnp.bool_), step=sds((B,), jnp.int32),
        seeds=sds((B,), jnp.uint32), limits=sds((B,), jnp.int32), base=sds((B,), jnp.int32), warp=warp,
        end_ids=sds((B, MAX_END_IDS), jnp.int32),
    )
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), abstract_params(CFG))
    params = jax.tree.map(lambda x: sds(x.shape, x.dtype), abstract_quantized(params))
    with target_platform("tpu"):
        lowered = decode_loop.lower(Llava(CFG), params, state, sds((), jnp.int32), sds((), jnp.int32),
                                    sds((B,), jnp.bool_), greedy=True, int8=True)
    temp, cache_bytes = _temporaries_and_cache(lowered)
    assert temp < MAX_SHARE * cache_bytes, f"decode temporaries {temp / 2**20:.1f} MiB, cache {cache_bytes >> 20} MiB"


def test_per_row_cache_write_keeps_one_cache_on_tpu():
    """A slot per row (`cache_index` [B], continuous batching), in a decode-shaped loop: a while loop
    over the donated stacked cache, layers scanned, each writing its k/v and attending over its slice."""
    chip = _v5e_chip()
    sds, t = _sds(chip), CFG.text
    d = t.num_kv_heads * t.head_dim

    def layer(carry, w):  # w [2 K H, D]: the layout the TPU compiler keeps (no copy of the weights)
        x, ck, cv, i, slots = carry
        kv = jnp.einsum("bd,ed->be", x, w).reshape(B, 1, 2, t.num_kv_heads, t.head_dim)  # [B, T=1, 2, K, H]
        ck, cv = write_cache(ck, kv[:, :, 0], i, slots), write_cache(cv, kv[:, :, 1], i, slots)
        k, v = (jax.lax.dynamic_index_in_dim(c, i, keepdims=False) for c in (ck, cv))  # [B, K, S, H]
        s = jnp.einsum("bkh,bksh->bks", kv[:, 0, 0], k, preferred_element_type=jnp.float32)
        out = jnp.einsum("bks,bksh->bkh", jax.nn.softmax(s).astype(v.dtype), v).reshape(B, d)
        return (x + out, ck, cv, i + 1, slots), None

    def loop(ck, cv, w, x, slots, steps):
        def body(c):
            ck, cv, x, slots, step = c
            (x, ck, cv, _, _), _ = jax.lax.scan(layer, (x, ck, cv, jnp.int32(0), slots), w)
            return ck, cv, x, slots + 1, step + 1

        return jax.lax.while_loop(lambda c: c[-1] < steps, body, (ck, cv, x, slots, jnp.int32(0)))

    cache = sds((t.num_layers, B, t.num_kv_heads, S, t.head_dim), jnp.bfloat16)
    w, x = sds((t.num_layers, 2 * d, d), jnp.bfloat16), sds((B, d), jnp.bfloat16)
    lowered = jax.jit(loop, donate_argnums=(0, 1)).lower(cache, cache, w, x, sds((B,), jnp.int32), sds((), jnp.int32))
    temp, cache_bytes = _temporaries_and_cache(lowered)
    assert temp < MAX_SHARE * cache_bytes, f"loop temporaries {temp / 2**20:.1f} MiB, cache {cache_bytes >> 20} MiB"
