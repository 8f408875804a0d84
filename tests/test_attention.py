"""Attention implementations: the choice by backend and shape, and each fused path against XLA.

On this CPU the Pallas splash kernel runs in interpret mode (the same kernel code, interpreted),
and the TPU compiler (libtpu, when installed) compiles it for a TPU topology ahead of time. The
cuDNN kernel needs a GPU: its test is skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.attention import AttentionMask, attention, choose_attention, target_platform, via_right_padding
from llava_jax.models.llava import is_right_padded
from tests._seeds import fresh_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize("requested,platform,dtype,head_dim,decoding,expected", [
    ("auto", "cpu", BF16, 128, False, "xla"),
    ("auto", "gpu", BF16, 128, False, "cudnn"),
    ("auto", "gpu", jnp.float16, 64, False, "cudnn"),
    ("auto", "gpu", F32, 128, False, "xla"),  # cuDNN flash attention has no float32
    ("auto", "gpu", BF16, 256, False, "xla"),
    ("auto", "gpu", BF16, 128, True, "xla"),  # decode steps over a KV cache window
    ("auto", "tpu", BF16, 128, False, "splash"),
    ("auto", "tpu", F32, 64, False, "splash"),
    ("auto", "tpu", BF16, 128, True, "xla"),
    ("xla", "gpu", BF16, 128, False, "xla"),
    ("xla", "tpu", BF16, 128, False, "xla"),
    ("cudnn", "gpu", F32, 128, False, "xla"),  # an explicit kernel still falls back where it cannot run
    ("splash", "tpu", BF16, 128, True, "xla"),
    ("splash", "cpu", F32, 64, False, "splash"),  # Pallas interpret mode: for tests
])
def test_choice_by_backend_and_shape(requested, platform, dtype, head_dim, decoding, expected):
    impl, why = choose_attention(requested, platform=platform, dtype=dtype, head_dim=head_dim, decoding=decoding)
    assert impl == expected, why
    assert why


@pytest.mark.parametrize("requested,platform", [("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "gpu"), ("flash", "gpu")])
def test_a_kernel_the_platform_cannot_run_is_an_error(requested, platform):
    with pytest.raises(ValueError, match="attention"):
        choose_attention(requested, platform=platform, dtype=BF16, head_dim=128, decoding=False)


def test_target_platform_overrides_the_host_backend():
    from llava_jax.models.attention import current_platform

    assert current_platform() == jax.default_backend()
    with target_platform("tpu"):
        assert current_platform() == "tpu"
    assert current_platform() == jax.default_backend()


def test_right_padding_check():
    assert is_right_padded(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    assert not is_right_padded(np.array([[0, 1, 1], [1, 1, 1]]))
    assert not is_right_padded(np.array([[1, 0, 1]]))


def _qkv(seed, b, t, n, k, h, dtype=F32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype) for heads in (n, k, k)]


def _dense(tokens, causal):
    t = tokens.shape[1]
    m = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
    return jnp.asarray(m[None, None] & tokens.astype(bool)[:, None, None, :])


@pytest.mark.slow(seconds=12)
@pytest.mark.parametrize("causal", [True, False])
def test_splash_in_interpret_mode_equals_xla(causal):
    """Forward and gradients at real positions; left and right padding; GQA; T not a multiple of 128."""
    seed = fresh_seed()
    b, t, n, k, h = 2, 150, 2, 1, 32
    q, kk, v = _qkv(seed, b, t, n, k, h)
    tokens = np.ones((b, t), np.int32)
    tokens[0, 120:] = 0  # right padding
    tokens[1, :40] = 0  # left padding
    real = jnp.asarray(tokens.astype(bool))[:, :, None, None]
    fused = AttentionMask("splash", causal=causal, tokens=jnp.asarray(tokens))
    dense = _dense(tokens, causal)

    def loss(fn):  # a weighted sum over real positions only (padding outputs are unspecified)
        w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((b, t, n, h)), F32)
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * w, 0.0))

    with target_platform("cpu"):
        out = jax.jit(lambda q, k, v: attention(q, k, v, fused))(q, kk, v)
        grads = jax.jit(jax.grad(loss(lambda q, k, v: attention(q, k, v, fused)), argnums=(0, 1, 2)))(q, kk, v)
    ref = jax.nn.dot_product_attention(q, kk, v, mask=dense)
    ref_grads = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense)), argnums=(0, 1, 2))(q, kk, v)
    err = float(jnp.max(jnp.where(real, jnp.abs(out - ref), 0.0)))
    assert err < 1e-5, f"seed {seed}: forward max error {err:.2e}"
    for name, g, r in zip("qkv", grads, ref_grads):
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        assert rel < 1e-5, f"seed {seed}: d{name} relative error {rel:.2e}"


def test_rows_rotated_to_the_front_equal_attention_over_their_padding():
    """The cuDNN path for left-padded prompts (`right_padded=False`): each row's run of tokens is
    rotated to the front and a right-padding-only kernel (here XLA with a lengths mask, standing in
    for cuDNN, which needs a GPU) runs with per-row lengths; real positions equal the dense mask's.
    Rows: left-padded, right-padded, unpadded, padded on both sides, empty."""
    seed = fresh_seed()
    b, t, n, k, h = 5, 24, 4, 2, 8
    q, kk, v = _qkv(seed, b, t, n, k, h)
    tokens = np.ones((b, t), np.int32)
    tokens[0, :9] = 0
    tokens[1, 17:] = 0
    tokens[3, :5], tokens[3, 20:] = 0, 0
    tokens[4] = 0
    calls = []

    def right_padded_kernel(q, k, v, lengths):
        calls.append(lengths)
        m = jnp.arange(q.shape[1])[None, :] < lengths[:, None]  # [B, S]: the first `length` slots
        return jax.nn.dot_product_attention(q, k, v, mask=jnp.tril(jnp.ones((t, t), bool))[None, None] & m[:, None, None])

    out = via_right_padding(right_padded_kernel, q, kk, v, jnp.asarray(tokens))
    ref = jax.nn.dot_product_attention(q, kk, v, mask=_dense(tokens, True))
    assert np.asarray(calls[0]).tolist() == tokens.sum(1).tolist()
    real = tokens.astype(bool)
    err = float(np.max(np.abs(np.asarray(out - ref))[real]))
    assert err < 1e-6, f"seed {seed}: max error {err:.2e}"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU (this is "
                    f"{jax.default_backend()}); the CPU tests run the XLA path")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_equals_xla_in_bf16(causal):
    seed = fresh_seed()
    b, t, n, k, h = 2, 577 if not causal else 512, 8, 8 if not causal else 2, 64 if not causal else 128
    q, kk, v = _qkv(seed, b, t, n, k, h, BF16)
    tokens = np.ones((b, t), np.int32)
    if causal:
        tokens[0, 400:] = 0  # right padding: the lengths the kernel takes
    layouts = [(tokens, True)]
    if causal:  # left padding (the engine's prefill): rows rotated to the front, then the kernel
        left = np.ones((b, t), np.int32)
        left[0, :112] = 0
        layouts.append((left, False))
    for toks, right in layouts:
        mask = AttentionMask("cudnn", causal=causal, tokens=jnp.asarray(toks), right_padded=right)
        out = jax.jit(lambda q, k, v: attention(q, k, v, mask))(q, kk, v)
        ref = jax.nn.dot_product_attention(q.astype(F32), kk.astype(F32), v.astype(F32), mask=_dense(toks, causal))
        real = toks.astype(bool)[:, :, None, None]
        err = float(jnp.max(jnp.where(real, jnp.abs(out.astype(F32) - ref), 0.0)))
        assert err < 2e-2, f"seed {seed}: max error {err:.3e} against float32 XLA (right_padded={right})"


SHARDED = """
import json, numpy as np, jax
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import jit_sharded, model_param_shardings
from llava_jax.models.llava import Llava
from tests._parallel_worker import TINY, global_batch
from tests._params import host_random_params
cfg = TINY.replace(vision=TINY.vision.__class__(**{**TINY.vision.__dict__, "num_layers": 1}))
mesh, rules = make_mesh(1, 2, 2), rules_lib.DEFAULT_RULES
params = jax.device_put(host_random_params(cfg, 0), model_param_shardings(cfg, mesh, rules))  # no init compile
batch = {k: v[:8] for k, v in global_batch(cfg).items()}
batch["attention_mask"][2::4, :6] = 0  # left padding too: splash takes any padding
real = batch["attention_mask"] == 1
out = {}
for impl in ("xla", "splash"):
    module = Llava(cfg.replace(attention=impl))
    fn = lambda p, b: module.apply({"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"])[0]
    out[impl] = np.asarray(jit_sharded(fn, mesh, rules, None, None)(params, batch))[real].tolist()
print(json.dumps(out))
"""


@pytest.mark.slow(seconds=20)
def test_splash_under_a_sharded_mesh_equals_xla():
    """The whole model on 4 simulated devices (fsdp x tensor = 2 x 2): splash runs per shard under
    shard_map (interpret mode here) and gives XLA's logits at every real position, with left and
    right padding in the batch."""
    # The session's XLA flags (tests/conftest.py), and simulated devices.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": ROOT,
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["splash"], out["xla"], atol=2e-5, rtol=1e-5)


def _tpu_topology(name: str):
    """A TPU topology from libtpu on this host, or a skip saying why not."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<jax version>' compiles for TPUs on a CPU host)")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock
    chips = tuple(int(x) for x in name.split(":")[1].split("x")) + (1,) * (4 - name.count("x") - 1)
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=chips[:3], num_slices=1)
    except Exception as e:  # noqa: BLE001  (libtpu reports set-up problems in many ways)
        pytest.skip(f"libtpu is installed but gives no {name} topology here: {str(e).splitlines()[0]}")


def _tpu_mesh_and_config():
    """4 TPU v5e chips as fsdp x tensor = 2 x 2, and a bf16 LLaVA whose head dim (128) splash takes."""
    from jax.sharding import Mesh

    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.parallel.mesh import AXES

    topo = _tpu_topology("v5e:2x2")
    mesh = Mesh(np.array(topo.devices).reshape(1, 2, 2), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2, image_size=56),
        text=TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=2,
                        num_kv_heads=2, head_dim=128),
        image_token_index=255, vision_feature_layer=-1, dtype="bfloat16",
    )
    return mesh, cfg


def test_engine_prefill_lowers_for_tpu_with_splash():
    """The engine's prefill (left-padded prompts into an empty cache) compiled for 4 TPU v5e chips
    on the engine's mesh: it runs the splash kernel in both towers; decode steps stay on XLA."""
    from jax.sharding import NamedSharding, PartitionSpec

    from llava_jax.inference.engine import prefill_step
    from llava_jax.inference.sampling import SamplingParams
    from llava_jax.models.llava import Llava
    from llava_jax.parallel import rules as rules_lib
    from llava_jax.parallel.partition import abstract_sharded_params

    mesh, cfg = _tpu_mesh_and_config()
    rules = rules_lib.DEFAULT_RULES
    rows = NamedSharding(mesh, PartitionSpec("data"))
    params = abstract_sharded_params(cfg, mesh, rules)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)  # noqa: E731
    args = (params, spec((2, 256), np.int32), spec((2, 1, 56, 56, 3), jnp.bfloat16), spec((2, 256), np.int32),
            spec((2,), np.uint32), spec((2,), np.int32), SamplingParams().warp_args(2), spec((2, 4), np.int32))
    with target_platform("tpu"), jax.set_mesh(mesh):
        lowered = prefill_step.lower(Llava(cfg), *args, num_new=16, window=16, greedy=True, rules=tuple(rules))
        text = lowered.compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') >= 2, "expected a Pallas kernel per tower"


def test_model_lowers_for_tpu_with_splash_in_both_towers():
    """AOT-compile the forward pass for 4 TPU v5e chips (fsdp x tensor = 2 x 2) from this CPU: the
    mesh's platform, not the host's, makes `auto` choose splash, in the vision tower and the
    language model, each under shard_map."""
    from jax.sharding import NamedSharding, PartitionSpec

    from llava_jax.models.llava import Llava
    from llava_jax.parallel import rules as rules_lib
    from llava_jax.parallel.partition import abstract_sharded_params, jit_sharded

    mesh, cfg = _tpu_mesh_and_config()
    rules = rules_lib.DEFAULT_RULES
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((4, 256), np.int32, sharding=rows)
    pixels = jax.ShapeDtypeStruct((4, 1, 56, 56, 3), jnp.bfloat16, sharding=rows)
    params = abstract_sharded_params(cfg, mesh, rules)
    module = Llava(cfg)
    forward = jit_sharded(lambda p, i, x: module.apply({"params": p}, i, x, i)[0], mesh, rules, None, None)
    text = forward.lower(params, ids, pixels).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') >= 2, "expected a Pallas kernel per tower"


def test_splash_temporaries_are_a_fraction_of_the_dense_scores():
    """One TPU v5e chip, the 7B's attention shape (2 x 2048 tokens, 32 heads of 128, bf16, causal):
    the compiler's temporaries for splash against the dense XLA path, which holds float32 scores."""
    from llava_jax.models.attention import AttentionMask

    topo = _tpu_topology("v5e:2x2")
    chip = jax.sharding.SingleDeviceSharding(topo.devices[0])
    x = jax.ShapeDtypeStruct((2, 2048, 32, 128), jnp.bfloat16, sharding=chip)
    tokens = jax.ShapeDtypeStruct((2, 2048), jnp.int32, sharding=chip)
    temps = {}
    for impl in ("splash", "xla"):
        fn = lambda q, k, v, t: attention(q, k, v, AttentionMask(impl, causal=True, tokens=t))  # noqa: E731
        with target_platform("tpu"):
            temps[impl] = jax.jit(fn).lower(x, x, x, tokens).compile().memory_analysis().temp_size_in_bytes
    print(f"per-chip temporaries: splash {temps['splash'] / 2**20:.1f} MiB, xla {temps['xla'] / 2**20:.0f} MiB")
    assert temps["splash"] < 0.05 * temps["xla"]
