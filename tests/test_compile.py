"""Compile-only mode (the real train step from shapes alone, on simulated devices and for a TPU
topology through libtpu) and the persistent compilation cache."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "_train_config.py")


def _run(args: list[str], devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": ROOT,
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_compilation_cache_is_reused_by_the_next_process(tmp_path):
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from llava_jax.parallel import compile_cache\n"
        "compile_cache.enable(sys.argv[1], min_compile_seconds=0)\n"
        "events = []\n"
        "jax.monitoring.register_event_listener(lambda e, **k: events.append(e))\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
        "print(events.count('/jax/compilation_cache/cache_hits'))\n"
    )
    first = _run(["-c", code, str(tmp_path / "cache")])
    second = _run(["-c", code, str(tmp_path / "cache")])
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert int(first.stdout.split()[-1]) == 0 and int(second.stdout.split()[-1]) >= 1


def _input_shard_bytes(mesh, data: int, fsdp: int, micro_batch: int) -> int:
    """Bytes of one device's shards of the train state and micro-batched batch (tests/_train_config.py:compile_projector)."""
    from llava_jax.parallel.partition import abstract_sharded_params
    from llava_jax.train import aot
    from llava_jax.train.program import rules_from_config, stage_program
    from tests._train_config import get_config

    c = get_config("compile_projector")
    c.mesh.data, c.mesh.fsdp, c.stages[0].micro_batch = data, fsdp, micro_batch
    cfg, stage, rules = aot.model_config(c), c.stages[0], rules_from_config(c)
    params = abstract_sharded_params(cfg, mesh, rules)
    program = stage_program(cfg, stage, mesh, rules, 10, params)
    batch = aot.abstract_batch(cfg, stage.global_batch // stage.micro_batch, stage.micro_batch, stage.max_length, mesh)

    def shard_bytes(x, s):
        return int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize

    total = sum(jax.tree.leaves(jax.tree.map(shard_bytes, program.state_abstract, program.state_shardings)))
    return total + sum(shard_bytes(x, x.sharding) for x in batch.values())


def _mib(text: str, what: str) -> float:
    value, unit = re.search(rf"{what} ([0-9.]+) (GiB|MiB)", text).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


@pytest.mark.slow(seconds=8)
def test_compile_only_on_8_simulated_devices_reports_the_sharded_memory(tmp_path):
    """`--config.compile_only=True` compiles every stage without data or weights and prints the
    figures: the arguments per device are the shards of the state and of the batch, to the byte
    (computed here on an abstract mesh); the compilation cache directory of the config is filled."""
    cache = tmp_path / "cache"
    r = _run(["-m", "llava_jax.train", f"--config={CONFIG}:compile_projector", "--config.compile_only=True",
              "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.stages[0].micro_batch=8",
              f"--config.compilation_cache_dir={cache}", f"--workdir={tmp_path / 'w'}"], devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "8 x cpu, mesh data=2 fsdp=4 tensor=1" in r.stdout and r.stdout.count("per device: arguments") == 1
    assert not os.path.exists(tmp_path / "w"), "compile-only must not create the workdir"
    assert os.listdir(cache), "the compilation cache was not written"
    mesh = jax.sharding.AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    want = _input_shard_bytes(mesh, 2, 4, 8) / (1 << 20)
    assert abs(_mib(r.stdout, "arguments") - want) < 0.006, (r.stdout, want)
    assert _mib(r.stdout, "total") >= _mib(r.stdout, "arguments")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile with")
def test_compile_only_for_a_tpu_topology():
    """A v5e-4 topology, compiled here through libtpu: the arguments hold at least the state's and the
    batch's shards (TPU layouts pad small arrays), and the tiny step fits a 16 GiB chip."""
    r = _run(["-m", "llava_jax.train", f"--config={CONFIG}:compile_projector", "--config.compile_only=True",
              "--config.compile_topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "4 x TPU v5 lite, mesh data=1 fsdp=4 tensor=1" in r.stdout and "of 16 GiB" in r.stdout
    assert "fits" in r.stdout and "DOES NOT FIT" not in r.stdout
    mesh = jax.sharding.AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"))
    want = _input_shard_bytes(mesh, 1, 4, 4) / (1 << 20)
    assert want <= _mib(r.stdout, "arguments") < 4 * want, (r.stdout, want)


def test_model_clis_turn_the_cache_on_before_loading(tmp_path, monkeypatch):
    """`--compilation-cache-dir` of generate / chat / eval (their shared flags) reaches the helper
    before the model is loaded; `--unrolled-layers` reaches the loader."""
    import argparse

    from llava_jax.inference import flags
    from llava_jax.inference.pipeline import Pipeline
    from llava_jax.parallel import compile_cache

    p = argparse.ArgumentParser()
    flags.add_model_flags(p)
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda d: calls.append(("cache", d)))
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda path, **kw: calls.append(("load", kw["scan_layers"])))
    for extra in ([], ["--unrolled-layers"]):
        flags.load_pipeline(p.parse_args(["--model-path", "m", "--compilation-cache-dir", str(tmp_path / "c"), *extra]))
    assert calls == [("cache", str(tmp_path / "c")), ("load", None), ("cache", str(tmp_path / "c")), ("load", False)]
