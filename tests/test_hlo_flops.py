"""Matmul FLOPs of compiled programs with loops counted (llava_jax/train/hlo_flops.py): a scanned stack counts
what its unrolled twin counts, nested loops multiply, and the TPU compiler's output (no trip-count
annotation) is read from the loop condition. The TPU test compiles through libtpu (skipped without it)."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest

from llava_jax.train import flops, hlo_flops

M, D, LAYERS = 64, 32, 5


def _stack(scan: bool):
    def f(ws, x):
        if scan:
            x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        else:
            for i in range(LAYERS):
                x = jnp.tanh(x @ ws[i])
        return x.sum()

    return f


def _compile(f, *shapes):
    return jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def test_a_scanned_stack_counts_what_the_unrolled_one_does():
    """Forward, and forward + backward (gradients of the weights and the input): the loop-counted FLOPs of
    the scanned stack equal the unrolled stack's; counted once, the scanned one is one layer."""
    layer = 2 * M * D * D
    for fn, per_layer in ((lambda f: f, 1), (lambda f: jax.grad(f, argnums=(0, 1)), 3)):
        scanned = hlo_flops.count(_compile(fn(_stack(True)), (LAYERS, D, D), (M, D)).as_text())
        unrolled = hlo_flops.count(_compile(fn(_stack(False)), (LAYERS, D, D), (M, D)).as_text())
        assert unrolled.flops == unrolled.once == LAYERS * per_layer * layer
        assert scanned.flops == unrolled.flops
        assert scanned.once == per_layer * layer
        assert all(t == LAYERS for t in scanned.loops) and scanned.loops and scanned.unknown_loops == 0


def test_nested_loops_multiply_and_the_condition_gives_the_trip_count():
    """A micro-batch loop around a scanned stack (the train step's shape) counts trips x layers x layer. With
    the compiler's trip-count annotation removed (the TPU compiler writes none), the loop conditions give
    the same counts."""
    micro = 3

    def f(ws, xs):
        def one(total, x):
            return total + _stack(True)(ws, x), None

        return jax.lax.scan(one, 0.0, xs)[0]

    text = _compile(f, (LAYERS, D, D), (micro, M, D)).as_text()
    counted = hlo_flops.count(text)
    assert counted.flops == micro * LAYERS * 2 * M * D * D
    assert sorted(counted.loops) == sorted([LAYERS, micro])
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert "known_trip_count" not in bare
    assert hlo_flops.count(bare) == counted


def test_a_loop_without_a_constant_bound_is_counted_once_and_listed():
    def f(w, x, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1].sum()

    c = jax.jit(f).lower(jax.ShapeDtypeStruct((D, D), jnp.float32), jax.ShapeDtypeStruct((M, D), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32)).compile()
    counted = hlo_flops.count(c.as_text())
    assert counted.unknown_loops == 1 and counted.flops == counted.once == 2 * M * D * D


def test_counted_once_the_matmuls_are_what_xla_cost_analysis_counts():
    """On a matmul-bound program XLA's own `flops` (each body once) and ours counted once agree to within
    its elementwise work (tanh, the sum): the parse reads the same dots XLA does."""
    compiled = _compile(jax.grad(_stack(True), argnums=(0, 1)), (LAYERS, 256, 256), (512, 256))
    ours = hlo_flops.count(compiled.as_text()).once
    analysis = compiled.cost_analysis()
    theirs = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    assert ours <= theirs <= 1.02 * ours, (ours, theirs)


def test_peaks_of_a_v5p_chip_by_its_device_kind():
    """A v5p chip's device_kind is "TPU v5" (a v5e's "TPU v5 lite"): both have their own peaks."""
    assert flops.peak_tflops("TPU v5") == 459.0 and flops.peak_tflops("TPU v5 lite") == 197.0
    assert flops.peak_hbm_gbps("TPU v5") == 2765.0 and flops.peak_hbm_gbps("TPU v5 lite") == 819.0
    assert flops.peak_tflops("TPU v6 lite") == 918.0 and flops.peak_tflops("cpu") is None


@pytest.mark.slow(seconds=12)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile with")
def test_the_tpu_compilers_loops_are_counted_from_their_conditions():
    """For one v5e chip (libtpu, no TPU needed): the TPU compiler turns dots into convolutions and writes no
    trip counts; the scanned stack still counts what the unrolled one does, and counted once agrees with the
    TPU cost analysis' `flops`."""
    from llava_jax.train import aot

    device = aot.topology_devices("v5e:2x2")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in ((LAYERS, 256, 256), (512, 256))]
    counts, analyses = {}, {}
    for scan in (True, False):
        compiled = jax.jit(jax.grad(_stack(scan), argnums=(0, 1))).lower(*shapes).compile()
        counts[scan] = hlo_flops.count(compiled.as_text())
        analysis = compiled.cost_analysis()
        analyses[scan] = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    assert counts[True].flops == counts[False].flops == LAYERS * 3 * 2 * 512 * 256 * 256
    assert counts[True].loops and counts[True].unknown_loops == 0
    for scan in (True, False):
        assert counts[scan].once <= analyses[scan] <= 1.02 * counts[scan].once


def test_a_counter_that_starts_elsewhere_and_steps_by_more_is_read_from_the_loop():
    """The TPU compiler's windowed matmuls count 0, 2, 4, 6 < 8 (4 trips), with no annotation: the start
    comes from the loop's initial tuple, the step from the body's `counter + constant`."""
    def f(w, x):
        body = lambda c: (c[0] + 2, jnp.tanh(c[1] @ w))  # noqa: E731
        return jax.lax.while_loop(lambda c: c[0] < 11, body, (3, x))[1].sum()

    text = _compile(f, (D, D), (M, D)).as_text()
    assert '"known_trip_count":{"n":"4"}' in text  # XLA's own count: 3, 5, 7, 9
    counted = hlo_flops.count(re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text))
    assert counted.loops == (4,) and counted.flops == 4 * 2 * M * D * D
