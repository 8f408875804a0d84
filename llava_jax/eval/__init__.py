"""Benchmarks by name (one module each), answered with the batched engine and scored as the
original LLaVA scripts score them. `python -m llava_jax.eval run|score|suite`; see `__main__`."""

from llava_jax.eval import gqa, mmbench, mme, pope, scienceqa, seed, shapes, textvqa, vizwiz, vqav2  # noqa: F401
from llava_jax.eval.benchmark import BENCHMARKS, Benchmark, Layout, get_benchmark, register

__all__ = ["BENCHMARKS", "Benchmark", "Layout", "get_benchmark", "register"]
