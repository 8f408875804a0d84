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
    # The repository first, then the caller's path (where libtpu may be installed with --target).
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    # The session's XLA flags (tests/conftest.py), and simulated devices.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": pythonpath,
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


def _anyres_config(directory: str):
    """tests/_train_config.py:compile_projector with a tiny anyres model (its tiles, pinpoints up to 2 x 2
    tiles) written to `directory` as model.init; 2 micro-steps of 2 rows of 64 tokens."""
    from llava_jax.anyres import AnyresConfig
    from llava_jax.train import aot
    from tests._train_config import get_config

    c = get_config("compile_projector")
    tile = c.model.vision.image_size
    cfg = aot.model_config(c)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    pinpoints = ((tile, 2 * tile), (2 * tile, tile), (2 * tile, 2 * tile))
    cfg.replace(anyres=AnyresConfig(tile_size=tile, grid=grid, pinpoints=pinpoints)).save(directory)
    c.model.init = directory
    st = c.stages[0]
    st.trainable = ["projector/.*"]
    st.global_batch, st.micro_batch, st.max_length = 4, 2, 64
    return c


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile with")
def test_compile_only_of_an_anyres_stage_for_a_tpu_topology(tmp_path):
    """The tiny anyres stage compiled for a v5e-4 through libtpu (fsdp over 4 chips, 4 rows a micro-batch):
    it fits, and the arguments hold at least one chip's shard of the tiles and the image_index."""
    code = (
        "import sys\n"
        "from tests.test_compile import _anyres_config\n"
        "from llava_jax.train import aot\n"
        "c = _anyres_config(sys.argv[1])\n"
        "c.mesh.data, c.mesh.fsdp = 1, -1\n"
        "c.stages[0].global_batch, c.stages[0].micro_batch = 8, 4\n"
        "r = aot.compile_stage(c, 0, aot.topology_devices('v5e:2x2'))\n"
        "print(r.line())\n"
        "print('fits', r.fits, r.argument_bytes)\n"
    )
    r = _run(["-c", code, str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "4 x TPU v5 lite, mesh data=1 fsdp=4 tensor=1" in r.stdout
    fits, argument_bytes = r.stdout.split("fits ")[-1].split()
    tile = 56  # tests/_train_config.py's tower
    # A chip's rows: 2 micro-steps of 1 row, each 3 int32 arrays of 64 tokens, 5 float32 tiles, the image_index.
    batch_shard = 2 * (3 * 64 * 4 + 5 * tile * tile * 3 * 4 + 64 * 4)
    assert fits == "True" and int(argument_bytes) >= batch_shard, r.stdout


@pytest.mark.slow(seconds=5)
@pytest.mark.parametrize("base_resolution", [False, True])
def test_compile_only_of_an_anyres_stage_feeds_tiles_and_the_image_index(tmp_path, base_resolution):
    """LLaVA-NeXT compile-only on one CPU device: a tiny anyres model (56-px tiles, pinpoints up to 2 x 2
    tiles) from a converted directory (the projector trained, to keep the compile short). The batch holds
    each row's worst case, base + 4 tiles (one base tile in a `base_resolution` stage, as the loop cuts
    its data), and the image_index the model places the features by; the compiled step's arguments are
    the state's bytes plus exactly those arrays' (before: one 56-px slot a row and no image_index, which
    an anyres model refuses)."""
    from llava_jax.parallel.mesh import make_mesh
    from llava_jax.parallel.partition import abstract_sharded_params
    from llava_jax.train import aot
    from llava_jax.train.program import rules_from_config, stage_program

    c = _anyres_config(str(tmp_path))
    tile, st = c.model.vision.image_size, c.stages[0]
    st.base_resolution = base_resolution
    report = aot.compile_stage(c, 0)
    assert report.error is None and report.temp_bytes > 0, report

    loaded = aot.model_config(c)
    assert loaded.is_anyres and loaded.geometry.max_patches == 5
    mesh = make_mesh(**c.mesh.to_dict())
    rules = rules_from_config(c)
    program = stage_program(loaded, st, mesh, rules, 10, abstract_sharded_params(loaded, mesh, rules))
    nbytes = lambda tree: sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize  # noqa: E731
                              for x in jax.tree.leaves(tree))
    # The state, and the schedule's numbers the step takes as inputs (program.stage_program).
    state = nbytes(program.state_abstract) + nbytes(program.step.hyper)
    a, b, t = 2, 2, 64  # micro-steps, rows, tokens
    text = 3 * a * b * t * 4  # input_ids, labels, attention_mask: int32
    slots = 1 if base_resolution else 5  # base + 2 x 2 tiles a row
    pixels = a * b * slots * tile * tile * 3 * 4  # float32
    image_index = a * b * t * 4
    assert report.argument_bytes == state + text + pixels + image_index, (report, state)


# Language-model parameters of the base checkpoints (their model cards / safetensors indexes, at the
# base vocabulary), and that vocabulary: the presets add two rows (embedding, LM head) per token beyond it.
BASE_LLM = {
    "llava-next-7b": (7_241_732_096, 32000),  # Mistral-7B-Instruct-v0.2
    "llava-v1.6-vicuna-7b": (6_738_415_616, 32000),  # Vicuna-7B v1.5 (Llama-2-7B)
    "llava-v1.6-vicuna-13b": (13_015_864_320, 32000),  # Vicuna-13B v1.5 (Llama-2-13B)
    "llava-v1.6-34b": (34_388_917_248, 64000),  # Yi-34B
    "llama3-llava-next-8b": (8_030_261_248, 128256),  # Meta-Llama-3-8B-Instruct
}


@pytest.mark.parametrize("name", sorted(BASE_LLM))
def test_next_presets_have_the_checkpoints_shapes(name):
    """The LLaVA-NeXT presets compile-only and the benchmarks use: the language model has the base
    checkpoint's parameter count plus the added vocabulary rows, the image token lies in the vocabulary,
    and a 672 x 672 image takes the 2928 tokens transformers counts (v1.6 pinpoints, 336-px tiles)."""
    from llava_jax.config import PRESETS
    from llava_jax.models.llava import abstract_params

    cfg = PRESETS[name]
    params = abstract_params(cfg)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["language_model"]))
    base, base_vocab = BASE_LLM[name]
    assert count == base + 2 * cfg.text.hidden_size * (cfg.text.vocab_size - base_vocab), (count, base)
    assert base_vocab <= cfg.image_token_index < cfg.text.vocab_size
    assert cfg.is_anyres and cfg.image_layout((672, 672)).num_tokens == 2928
    assert params["image_newline"].shape == (cfg.text.hidden_size,)



@pytest.mark.slow(seconds=20)
def test_the_train_steps_loop_counted_flops_equal_its_unrolled_twins(tmp_path):
    """The real train step (every tower trained, 3 micro-batches of 4 rows, one CPU device): XLA's cost
    analysis counts the scanned layers (2 a tower) and the micro-batch loop once each; the loop-counted
    matmul FLOPs of the scanned step equal the unrolled step's (whose one loop is the micro-batches').
    Against the analytic count (flops.py: causal attention at half the score products, which XLA computes
    in full) they agree to within that attention term."""
    from llava_jax.train import aot, flops
    from tests._train_config import get_config

    def cost(scan: bool, micro: int) -> dict:
        c = get_config("compile")
        c.model.scan_layers = scan
        c.stages[0].micro_batch = 4
        c.stages[0].global_batch = 4 * micro
        report = aot.compile_stage(c, 0)
        assert report.error is None, report
        return report.cost

    scanned, unrolled = cost(True, 3), cost(False, 3)
    assert scanned["hlo_flops"] == unrolled["hlo_flops"]
    assert unrolled["loops"] == [3] and 2 in scanned["loops"] and scanned["unknown_loops"] == 0
    assert scanned["compiler_flops"] < 0.4 * scanned["hlo_flops"], "XLA's count was expected to miss loop trips"
    cfg = aot.model_config(get_config("compile"))
    t = get_config("compile").stages[0].max_length
    analytic = flops.train_step_flops(cfg, tokens=12 * t, seq_len=t, tiles=12, train_vision=True, train_text=True)
    half_attention = 3 * 2 * 2 * 12 * t * t * cfg.text.num_heads * cfg.text.head_dim * cfg.text.num_layers / 2
    assert analytic <= scanned["hlo_flops"] <= analytic + 1.05 * half_attention
