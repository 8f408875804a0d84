"""The compiled decode loop updates the donated KV cache in place: no copy of a cache-shaped buffer
(the whole stacked cache or one layer's slice, in any layout) anywhere in the program, and the
cache outputs alias the cache inputs. Checked in the optimised HLO of a tiny config (CPU backend),
scanned and unrolled layers; nothing is run, only compiled from abstract shapes."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.inference.engine import MAX_END_IDS, DecodeState, decode_loop
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.llava import Llava, abstract_params

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=28),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16),
    image_token_index=127,
    vision_feature_layer=-1,
)
# Sizes all distinct from each other and from the model's, so that a shape names its buffer.
B, T, W, N = 5, 32, 48, 64

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\{[\d,]*\} (\w[\w-]*)\((.*)")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.-]+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None and line.strip():
            comps[name].append(line)
    return comps


def layout_copies(hlo: str, shapes: list[tuple[int, ...]]) -> list[str]:
    """Instructions that copy or transpose a buffer whose dims are a permutation of one of `shapes`:
    a bare copy/transpose, or a fusion whose root is one."""
    perms = {p for s in shapes for p in itertools.permutations(s)}
    comps = _computations(hlo)

    def root_op(comp: str) -> str:
        for line in comps.get(comp, []):
            if line.lstrip().startswith("ROOT"):
                m = _INSTR.match(line)
                return m.group(4) if m else ""
        return ""

    bad = []
    for comp, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            dims = tuple(int(d) for d in m.group(3).split(",") if d)
            if dims not in perms:
                continue
            op = m.group(4)
            if op in ("copy", "transpose"):
                bad.append(f"{comp}: {line.strip()[:160]}")
            elif op == "fusion":
                called = _CALLS.search(line)
                if called and root_op(called.group(1)) in ("copy", "transpose"):
                    bad.append(f"{comp}: {line.strip()[:160]}")
    return bad


def _decode_hlo(cfg: LlavaConfig) -> str:
    sds = jax.ShapeDtypeStruct
    t = cfg.text
    slots = T + W
    cache = {n: sds((t.num_layers, B, t.num_kv_heads, slots, t.head_dim), jnp.float32) for n in "kv"}
    warp = {k: sds((B,), x.dtype) for k, x in SamplingParams(max_new_tokens=N).warp_args(B).items()}
    state = DecodeState(
        cache=cache, kv_mask=sds((B, slots), jnp.int32), tokens=sds((B, N), jnp.int32),
        logprobs=sds((B, N), jnp.float32), positions=sds((B,), jnp.int32), done=sds((B,), jnp.bool_),
        step=sds((B,), jnp.int32), seeds=sds((B,), jnp.uint32), limits=sds((B,), jnp.int32),
        base=sds((B,), jnp.int32), warp=warp, end_ids=sds((B, MAX_END_IDS), jnp.int32),
    )
    lowered = decode_loop.lower(Llava(cfg), abstract_params(cfg), state, sds((), jnp.int32), sds((), jnp.int32),
                                sds((B,), jnp.bool_), greedy=True)
    return lowered.compile().as_text()


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_decode_loop_updates_the_cache_in_place(scan):
    cfg = CFG.replace(scan_layers=scan)
    t = cfg.text
    hlo = _decode_hlo(cfg)
    full = (t.num_layers, B, t.num_kv_heads, T + W, t.head_dim)
    bad = layout_copies(hlo, [full, full[1:]])
    assert not bad, "copies of the KV cache in the decode program:\n" + "\n".join(bad)
    # The cache outputs (the first two leaves of the state) reuse the donated inputs' buffers.
    aliases = dict(re.findall(r"\{(\d+)\}: \((\d+),", hlo.split("\n", 1)[0]))
    assert "0" in aliases and "1" in aliases, f"cache outputs are not aliased to inputs: {aliases}"
    assert "while(" in hlo  # the checked program is the decode loop


def _attention_loop_copies(cache_shape: tuple[int, ...], spec: str) -> list[str]:
    """`layout_copies` of a while loop that reads one layer of a stacked cache per step and takes
    query-key scores [B, K, T, S] from it, as the decode loop does."""

    def loop(cache, steps):
        def body(carry):
            i, cache, acc = carry
            layer = jax.lax.dynamic_index_in_dim(cache, i % cache_shape[0], keepdims=False)
            q = jnp.ones((B, 1, 2, 16)) + acc[:, None, None, :16]
            return i + 1, cache, acc + jnp.einsum(spec, q, layer).sum(axis=(1, 2))

        return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, cache, jnp.zeros((B, T + W))))[2]

    hlo = jax.jit(loop).lower(jax.ShapeDtypeStruct(cache_shape, jnp.float32), 4).compile().as_text()
    return layout_copies(hlo, [cache_shape, cache_shape[1:]])


def test_layout_copy_check_finds_the_old_cache_layout_relayout():
    """The checker is not blind: the previous cache layout [L, B, S, K, H] makes XLA relayout the
    layer's keys every step (batch axes B, K of the matmul not leading); [L, B, K, S, H] does not."""
    assert _attention_loop_copies((3, B, T + W, 2, 16), "btkh,bskh->bkts")
    assert not _attention_loop_copies((3, B, 2, T + W, 16), "btkh,bksh->bkts")
