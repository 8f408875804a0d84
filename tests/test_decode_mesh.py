"""The engine on a mesh (tensor parallel over heads / MLP / vocab, the batch over `data`) generates
what it generates on one device: greedy ids equal, log-probs within 1e-5, across a cache growth (the slot
engine too, its cache split on kv heads); the
parameters and the KV cache are really split; int8 weights too. Runs in a subprocess with 4
simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._seeds import fresh_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(seconds=100)
def test_sharded_engine_equals_single_device():
    seed = fresh_seed()
    # The session's XLA flags (tests/conftest.py), and simulated devices.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "tests._decode_mesh_worker", str(seed)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    single = out.pop("single")
    int8_single, int8 = out.pop("int8_single"), out.pop("int8_tensor2")
    slots = out.pop("slots_tensor2")
    assert slots["tokens"] == [single["tokens"][1]] * 2, "slot engine on tensor=2"
    l, b, k, s, h = slots["cache_shape"]
    assert slots["cache_shard_shape"] == [l, b, k // 2, s, h], slots
    # int8 weights on the mesh: each kernel [layers, in, out] split as its float kernel (gate_proj's
    # output over `tensor`, down_proj's input), its scale [layers, out] as the kernel's output axis.
    specs = {k: v + ["None"] * (3 - len(v)) if k.endswith("/kernel") else v for k, v in int8["specs"].items()}
    assert int8["dtype"] == "int8" and specs["gate_proj/kernel"][-1] == "tensor", int8
    for proj in ("gate_proj", "down_proj"):
        kernel = specs[f"{proj}/kernel"]
        assert (specs[f"{proj}/kernel_scale"] + ["None"] * 2)[:2] == [kernel[0], kernel[2]], int8["specs"]
    assert int8["tokens"] == int8_single["tokens"]
    for a, b in zip(int8["logprobs"], int8_single["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg="int8 on tensor=2")
    assert set(out) == {"tensor2", "data2_tensor2"}
    for name, got in out.items():
        assert got["tokens"] == single["tokens"], name
        for a, b in zip(got["logprobs"], single["logprobs"]):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        # q_proj [layers, embed, heads]: heads over `tensor`. Cache [L, B, K, S, H]: kv heads over `tensor`,
        # the batch over `data` where the mesh has it.
        assert got["q_kernel_spec"][-1] == "tensor", got["q_kernel_spec"]
        l, b, k, s, h = got["cache_shape"]
        data = 2 if name.startswith("data2") else 1
        assert got["cache_shard_shape"] == [l, b // data, k // 2, s, h], name
