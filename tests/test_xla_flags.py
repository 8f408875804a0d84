"""The XLA flag presets: added visibly, never over a user's flag, off on request, and every name
known to this jaxlib (GPU) and libtpu (TPU), which reject unknown flags at start-up."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys

import pytest
from jax._src import xla_bridge

from llava_jax.parallel import xla_flags


def test_merge_keeps_the_users_flags():
    merged, added = xla_flags.merge("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d",
                                    xla_flags.GPU_FLAGS)
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in merged.split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in merged.split()
    assert "--xla_dump_to=/tmp/d" in merged.split()
    assert len(added) == len(xla_flags.GPU_FLAGS) - 1


def test_apply_prints_what_it_adds_and_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_enable_async_all_gather=false")
    out = io.StringIO()
    added = xla_flags.apply(platform="tpu", out=out)
    assert added and "LIBTPU_INIT_ARGS +=" in out.getvalue() and all(a in out.getvalue() for a in added)
    assert "--xla_enable_async_all_gather=false" in os.environ["LIBTPU_INIT_ARGS"]
    assert xla_flags.apply(platform="tpu", out=out) == []  # idempotent: everything is set now
    monkeypatch.setenv("LLAVA_JAX_XLA_FLAGS", "0")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_flags.apply(platform="gpu") == [] and os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("LLAVA_JAX_XLA_FLAGS", "1")
    assert xla_flags.apply(False, platform="gpu") == [] and os.environ["XLA_FLAGS"] == ""
    assert xla_flags.apply(platform="cpu") == []


def test_apply_after_jax_started_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    out = io.StringIO()
    assert xla_flags.apply(platform="gpu", out=out) == []
    assert os.environ["XLA_FLAGS"] == "" and "not applied" in out.getvalue()


def test_gpu_flag_names_are_known_to_this_jaxlib():
    """jaxlib parses XLA_FLAGS (GPU options included) on any backend and aborts on an unknown name."""
    flags, _ = xla_flags.merge("", xla_flags.GPU_FLAGS)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


TPU_CHECK = """
from jax.experimental import topologies
topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                             chips_per_host_bounds=(2, 2, 1), num_slices=1)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'): TPU flag names unchecked")
def test_tpu_flag_names_are_known_to_libtpu():
    flags, _ = xla_flags.merge("", xla_flags.TPU_FLAGS)
    env = {**os.environ, "LIBTPU_INIT_ARGS": flags, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", TPU_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert "Unknown command line flag" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
