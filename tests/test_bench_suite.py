"""bench/suite.py: the table it prints from the benchmarks' JSON files, and imports that the GPU
machine can satisfy (it has no grain or ml_collections)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.suite import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(folder, name, record):
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(record, f)


def test_table_has_mfu_roofline_and_ratios(tmp_path):
    train = dict(benchmark="train_step", shape="llava-1.5-7b", layers=16, dtype="bfloat16", batch=8, seq=2048,
                 flops=989e12 * 0.5)  # 0.5 s of an H200's peak
    _write(tmp_path, "train_ours", {**train, "rows": [dict(time_s=1.0, device="NVIDIA H200", devices=1, memory_gib=60.0)]})
    _write(tmp_path, "train_torch", {**train, "rows": [dict(time_s=1.5, device="NVIDIA H200", devices=1)]})
    decode = dict(benchmark="decode", shape="llava-1.5-7b", prompt_tokens=617, new_tokens=128)
    _write(tmp_path, "decode_ours", {**decode, "rows": [dict(batch=1, decode_tok_s=300.0, roofline=0.84, ttft_ms=40.0),
                                                        dict(batch=16, decode_tok_s=3000.0, roofline=0.5, ttft_ms=90.0)]})
    _write(tmp_path, "decode_torch", {**decode, "rows": [dict(batch=1, decode_tok_s=100.0, roofline=0.28, ttft_ms=80.0)]})
    lines = summarize(str(tmp_path), {"prefill_ours": "timed out (60 s)"}).splitlines()
    train_line = next(line for line in lines if line.startswith("| train step"))
    assert "1000 ms, 494 TFLOP/s, 50.0% MFU, 60.0 GiB" in train_line and train_line.endswith("| 1.50x |")
    prefill_line = next(line for line in lines if line.startswith("| prefill"))
    assert "timed out (60 s) (see prefill_ours.log)" in prefill_line and prefill_line.endswith("| - |")
    b1 = next(line for line in lines if "batch 1," in line)
    assert "300 tok/s, 84% of roofline" in b1 and b1.endswith("| 3.00x |")
    b16 = next(line for line in lines if "batch 16," in line)
    assert "no result (see decode_torch.log)" in b16


def test_benchmarks_import_without_grain_or_ml_collections():
    code = ("import sys, bench.suite, bench.common, bench.train_step, bench.forward, bench.generate; "
            "print(sorted(m for m in ('grain', 'ml_collections') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow(seconds=5)
def test_packing_bench_smoke(tmp_path, capsys):
    """Smoke test of bench/packing.py at a tiny setting (no step timed): its table, and what must hold of any
    run: packed and bucketed rows of one max_length carry the same real tokens (the same samples, cut alike),
    packing needs no more rows, and the modelled mix is its components' records."""
    from bench import packing

    lines = packing.main(["--no-steps", "--num-train", "16", "--mix-fraction", "0.001", "--data-dir",
                          str(tmp_path / "data"), "--json", str(tmp_path / "packing.json")])
    by = {(x.data.split()[0], x.batching.split(",")[0] if x.batching.startswith("bucketed") else x.batching): x
          for x in lines}
    for data in ("synthetic", "modelled"):
        packed, bucketed = by[(data, "packed")], by[(data, "bucketed")]
        assert packed.real == bucketed.real > 0 and packed.samples == bucketed.samples
        assert packed.rows <= bucketed.rows and 0 < packed.fraction <= 1 and 0 < bucketed.fraction <= 1
    assert by[("modelled", "packed")].samples == sum(max(1, round(c.records * 0.001)) for c in packing.MIX_665K)
    assert sum(c.records for c in packing.MIX_665K) == 665_298  # the released file's count
    out = capsys.readouterr().out
    assert "| modelled LLaVA-1.5 665K mix | packed |" in out and "fewer computed tokens a real token" in out
    assert json.loads((tmp_path / "packing.json").read_text())["benchmark"] == "packing"
