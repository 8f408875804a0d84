"""One accelerator benchmark run: llava_jax and its PyTorch peer, each in its own process, one table.

    bench/accelerator.sh OUT                   # the 7B shapes on one GPU; planned to end within 8 minutes
    python -m bench.suite OUT --shape small    # the same benchmarks at a tiny shape (runs on a CPU)

Six processes run one after the other, each under its own timeout, each writing OUT/<name>.json
and OUT/<name>.log (JAX preallocates most of a GPU's memory, so JAX and torch never share one):

    train_ours, train_torch       stage-2 train step (projector + LLM trained, CLIP frozen), bf16:
                                  ours with float32 master weights, AdamW, remat `--remat`, fused
                                  attention by backend; transformers + torch AdamW with gradient
                                  checkpointing and sdpa attention. 7B widths with `--layers` (16 of
                                  32: the full 7B's float32 AdamW state alone takes 80 GB), 8 x 2048.
    prefill_ours, prefill_torch   7B forward over 8 prompts of 1 + 576 image + 64 text tokens,
                                  last-position logits (what a prefill computes).
    decode_ours, decode_torch     7B greedy decode, batch 1 and 16, 617-token prompts, 128 new tokens,
                                  EOS ignored; ours with the engine, transformers with `generate`.

Then it prints one markdown table (also OUT/summary.md): step time and MFU against the chip's
bf16 peak (989 TFLOP/s for an H100 / H200), prefill time and MFU, decode tokens/s with the
fraction of the `--bandwidth-gbs` roofline (4800: H200), and peer time / our time. The GPU machine
has jax, flax, optax, orbax, torch and transformers; nothing here imports grain or ml_collections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from llava_jax.train.flops import peak_tflops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (module, args, timeout s, side); the timeouts of a preset add up to its time budget.
PRESETS = {
    "7b": [
        ("train_ours", "bench.train_step", "--shape llava-1.5-7b --layers {layers} --dtype bfloat16 --batch 8 "
         "--seq 2048 --remat {remat} --iters 3 --skip-torch", 130, "ours"),
        ("train_torch", "bench.train_step", "--shape llava-1.5-7b --layers {layers} --dtype bfloat16 --batch 8 "
         "--seq 2048 --iters 3 --skip-ours", 70, "torch"),
        ("prefill_ours", "bench.forward", "--shape llava-1.5-7b --dtype bfloat16 --batch 8 --last-only --iters 5 "
         "--skip-hf", 60, "ours"),
        ("prefill_torch", "bench.forward", "--shape llava-1.5-7b --dtype bfloat16 --batch 8 --last-only --iters 5 "
         "--skip-ours", 40, "torch"),
        ("decode_ours", "bench.generate", "--shape llava-1.5-7b --dtype bfloat16 --batch-sizes 1,16 --new-tokens 128 "
         "--repeats 2 --bandwidth-gbs {bandwidth} --no-hf", 100, "ours"),
        ("decode_torch", "bench.generate", "--shape llava-1.5-7b --dtype bfloat16 --batch-sizes 1,16 --new-tokens 128 "
         "--repeats 2 --bandwidth-gbs {bandwidth} --no-ours", 60, "torch"),
    ],
    "small": [
        ("train_ours", "bench.train_step", "--shape small --batch 4 --seq 256 --remat {remat} --iters 2 --skip-torch",
         300, "ours"),
        ("train_torch", "bench.train_step", "--shape small --batch 4 --seq 256 --iters 2 --skip-ours", 300, "torch"),
        ("prefill_ours", "bench.forward", "--shape small --batch 4 --last-only --iters 3 --skip-hf", 300, "ours"),
        ("prefill_torch", "bench.forward", "--shape small --batch 4 --last-only --iters 3 --skip-ours", 300, "torch"),
        ("decode_ours", "bench.generate", "--shape small --batch-sizes 1,4 --new-tokens 16 --repeats 1 --no-hf",
         300, "ours"),
        ("decode_torch", "bench.generate", "--shape small --batch-sizes 1,4 --new-tokens 16 --repeats 1 --no-ours",
         300, "torch"),
    ],
}


def run_one(name: str, module: str, args: str, timeout: int, side: str, out: str) -> str:
    """Run one benchmark process; its status: ok, failed (exit code) or timed out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if side == "torch":
        env["JAX_PLATFORMS"] = "cpu"  # the torch process must leave the GPU's memory to torch
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    cmd = [sys.executable, "-m", module, *args.split(), "--json", os.path.join(out, f"{name}.json")]
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out ({timeout} s)"
    print(f"[suite] {name}: {status} in {time.time() - t0:.0f} s", flush=True)
    return status


def _load(out: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mfu(record: dict, row: dict) -> str:
    tf = record["flops"] / row["time_s"] / 1e12 / row.get("devices", 1)
    peak = peak_tflops(row["device"])
    return f"{tf:.0f} TFLOP/s, {tf / peak:.1%} MFU" if peak else f"{tf:.3g} TFLOP/s"


def summarize(out: str, statuses: dict[str, str] | None = None) -> str:
    """The markdown table of a run's JSON files (a missing one shows its process status)."""
    statuses = statuses or {}

    def missing(name):
        return statuses.get(name, "no result") + f" (see {name}.log)"

    lines = ["| benchmark | llava_jax | transformers | peer time / ours |", "|---|---|---|---|"]
    for kind, label in (("train", "train step"), ("prefill", "prefill")):
        ours, peer = _load(out, f"{kind}_ours"), _load(out, f"{kind}_torch")
        rec = ours or peer
        what = label
        if rec:
            what = (f"{label}: {rec['shape']} ({rec['layers']} LLaMA layers), {rec['batch']} x {rec['seq']}, "
                    f"{rec['dtype']}")
        cells = []
        for name, r in ((f"{kind}_ours", ours), (f"{kind}_torch", peer)):
            if r and r["rows"]:
                row = r["rows"][0]
                mem = f", {row['memory_gib']:.1f} GiB" if row.get("memory_gib") else ""
                cells.append(f"{row['time_s'] * 1e3:.0f} ms, {_mfu(r, row)}{mem}")
            else:
                cells.append(missing(name))
        ratio = f"{peer['rows'][0]['time_s'] / ours['rows'][0]['time_s']:.2f}x" if ours and peer and ours["rows"] and peer["rows"] else "-"
        lines.append(f"| {what} | {cells[0]} | {cells[1]} | {ratio} |")
    ours, peer = _load(out, "decode_ours"), _load(out, "decode_torch")
    batches = sorted({r["batch"] for rec in (ours, peer) if rec for r in rec["rows"]})
    for b in batches or [None]:
        rec = ours or peer
        what = f"decode: {rec['shape']}, batch {b}, {rec['prompt_tokens']}-token prompts, {rec['new_tokens']} new tokens" if rec else "decode"
        cells, speeds = [], []
        for name, r in (("decode_ours", ours), ("decode_torch", peer)):
            row = next((x for x in (r or {}).get("rows", []) if x["batch"] == b), None)
            if row:
                roof = f", {row['roofline']:.0%} of roofline" if row.get("roofline") is not None else ""
                cells.append(f"{row['decode_tok_s']:.0f} tok/s{roof}, TTFT {row['ttft_ms']:.0f} ms")
                speeds.append(row["decode_tok_s"])
            else:
                cells.append(missing(name))
        ratio = f"{speeds[0] / speeds[1]:.2f}x" if len(speeds) == 2 else "-"
        lines.append(f"| {what} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for the results (created)")
    ap.add_argument("--shape", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--layers", type=int, default=16, help="LLaMA layers of the 7B train step")
    ap.add_argument("--remat", default="minimal", help="our remat policy for the train step (models/remat.py)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth for the roofline (H200)")
    ap.add_argument("--only", default="", help="comma-separated subset of the process names")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    only = {n for n in args.only.split(",") if n}
    t0 = time.time()
    statuses = {}
    for name, module, fmt, timeout, side in PRESETS[args.shape]:
        if only and name not in only:
            continue
        cmd_args = fmt.format(layers=args.layers, remat=args.remat, bandwidth=args.bandwidth_gbs)
        statuses[name] = run_one(name, module, cmd_args, timeout, side, args.out)
    table = summarize(args.out, statuses)
    header = f"bench.suite --shape {args.shape} (remat {args.remat}), {time.time() - t0:.0f} s, results in {args.out}"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
