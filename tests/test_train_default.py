"""The embedded default really learns: `python -m llava_jax.train` end to end, as a user runs it.

The bar of the training issue: on a 2-core CPU the whole default run (data build, stage 1, stage 2,
evaluation) finishes within 5 minutes with >= 85% held-out accuracy, >= 50 points above the same
model with the image blanked, and every question type (issue 19) clearly above chance. The default
takes about 4 minutes on an idle 2-core CPU, so CI runs the full thing; there is no shorter variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from llava_jax.data import synthetic

# The limit is 5 minutes idle. Under `pytest -n 3` the run shares the 2 cores with two other
# workers and took up to 517 s (2026-11-29), so a hang is what exceeds 14 minutes.
TIMEOUT_S = 840
QTYPES = ("color", "shape", "count", "position")
# Answering one of the closed set's answers at random.
CHANCE = {"color": 1 / len(synthetic.COLORS), "shape": 1 / len(synthetic.SHAPES),
          "count": 1 / synthetic.SceneConfig().max_count, "position": 1 / len(synthetic.POSITIONS)}
# Every question type clearly above its chance. Position questions (single objects only: 42 of the
# 642 held-out questions) fell to chance (0.26) while the overall accuracy still read 0.95. With
# stage 2's where-questions (data/synthetic.py), position measured 1.0 / 0.52 / 0.66 at seeds 0 / 1 / 2
# (seed and data seed, 2026-12-06); the margin leaves room for that spread and for so few questions.
ABOVE_CHANCE = 0.25


def _final_eval(metrics_path: str) -> dict:
    """The last record of metrics.jsonl that carries eval/accuracy (stage 2's end-of-stage eval)."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals, f"no record with eval/accuracy in {metrics_path}"
    return evals[-1]


@pytest.mark.slow(seconds=240)
def test_embedded_default_reaches_the_accuracy_bar(tmp_path):
    workdir = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llava_jax.train", f"--workdir={workdir}"],
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = _final_eval(os.path.join(workdir, "metrics.jsonl"))
    summary = {k: round(v, 3) for k, v in final.items() if k.startswith("eval/")} | {"seconds": round(seconds)}
    assert final["stage"] == "finetune", summary
    # Reported per question type, as the issue asks.
    assert all(f"eval/accuracy_{q}" in final for q in QTYPES), summary
    assert final["eval/accuracy"] >= 0.85, summary
    for q in QTYPES:
        assert final[f"eval/accuracy_{q}"] >= CHANCE[q] + ABOVE_CHANCE, (q, summary)
    assert final["eval/accuracy"] - final["eval/blind_accuracy"] >= 0.50, summary
    # The command prints the same figures and where the answering model is.
    assert f"eval/accuracy={final['eval/accuracy']:.4f}" in proc.stdout, proc.stdout
    assert os.path.isdir(workdir / "stage2_finetune"), proc.stdout
    # Stage 2's eval_benchmarks: the shapes questions answered by generation through the eval harness
    # and scored by its scorer. Greedy generation reproduces every answer that teacher forcing gets
    # right, so the benchmark is at least the teacher-forced accuracy (rounding of near-ties aside).
    with open(workdir / "metrics.jsonl") as f:
        bench = [r for r in map(json.loads, f) if "bench/shapes" in r]
    assert bench and bench[-1]["stage"] == "finetune", summary
    assert bench[-1]["bench/shapes"] >= 100 * final["eval/accuracy"] - 1.0, (bench[-1], summary)
    assert f"| synthetic shapes | exact match, held-out (%) | {bench[-1]['bench/shapes']:.1f} |" in proc.stdout
    assert os.path.exists(workdir / "eval" / "stage2_finetune" / "results.md")
