"""Sharding properties: the same run gives the same losses on any mesh, in one process or two.

JAX fixes the device count per process, so each case runs in a fresh process
(tests/_parallel_worker.py) with simulated CPU devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llava_jax.config import LLAVA_15_7B, LLAVA_15_13B
from llava_jax.models.llava import init_params
from llava_jax.parallel import rules as rules_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args: list[str], devices: int, extra_env: dict | None = None, timeout: int = 600):
    # The session's XLA flags (tests/conftest.py), and simulated devices.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": ROOT,
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "tests._parallel_worker", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(proc, timeout: int = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single():
    """The losses on one device, in one process: what every mesh and the two-process run must give."""
    return _losses(_worker(["1,1,1"], devices=1))["1;1;1"]


@pytest.mark.slow(seconds=60)
def test_losses_equal_across_meshes_and_one_device(single):
    meshes = "8,1,1;2,2,2;1,4,2;1,8,1"
    sharded = _losses(_worker([meshes], devices=8))
    assert len(sharded) == 4
    for mesh, losses in sharded.items():
        np.testing.assert_allclose(losses, single, rtol=1e-5, err_msg=f"mesh data,fsdp,tensor = {mesh}")
    assert single[-1] < single[0]  # the steps really train


@pytest.mark.slow(seconds=30)
def test_two_processes_equal_one_process(single):
    """Two processes of one device each, the batch split over `data` across them, log one device's losses
    (the reference every mesh above meets; a third process with two devices cost the suite its own run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [_worker(["2,1,1"], devices=1, extra_env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    results = [_losses(p) for p in procs]
    for r in results:
        np.testing.assert_allclose(r["2;1;1"], single, rtol=1e-5)


@pytest.mark.parametrize("name,cfg", [("7b", LLAVA_15_7B), ("13b", LLAVA_15_13B)])
def test_rules_cover_every_parameter_of_the_real_configs(name, cfg):
    """No parameter is left unmatched (an error), and every large matrix is split over some mesh axis."""
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rules_lib.check_rules(boxed, rules_lib.DEFAULT_RULES)
    specs = nn.get_partition_spec(boxed)
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    unsplit = []
    for (path, leaf), spec in zip(flat, spec_leaves):
        mesh_axes = nn.logical_to_mesh_axes(tuple(spec), rules_lib.DEFAULT_RULES)
        if leaf.size >= 1 << 20 and all(a is None for a in mesh_axes):
            unsplit.append(jax.tree_util.keystr(path))
    assert not unsplit, f"{name}: large parameters replicated on every device: {unsplit[:5]}"
    n = sum(x.size for _, x in flat)
    assert n > (6e9 if name == "7b" else 12e9)


def test_unmatched_logical_axis_is_an_error():
    boxed = jax.eval_shape(lambda: init_params(LLAVA_15_7B, jax.random.key(0)))
    rules = tuple(r for r in rules_lib.DEFAULT_RULES if r[0] != "mlp")
    with pytest.raises(ValueError, match=r"logical axes \['mlp'\] have no sharding rule"):
        rules_lib.check_rules(boxed, rules)


@pytest.mark.slow(seconds=30)
def test_llava15_7b_stage2_step_compiles_for_8_devices():
    """The real 7B train step (remat, bf16, FSDP over 8 devices) lowers and compiles from abstract
    shapes alone; the per-device memory estimate is printed (CPU compiler: an upper bound, it does
    not schedule collectives for memory as the GPU/TPU compilers do)."""
    out = _losses(_worker(["--compile-7b"], devices=8), timeout=900)
    print("7B stage-2 step on fsdp=8:", json.dumps(out))
    assert out["argument_gib"] > 5  # params + Adam moments really are split 8 ways (~75 GiB in all)
    assert out["argument_gib"] < 15
