"""Compile time, init time and per-chip memory of the train step, from shapes alone (no weights, no data).

  python -m bench.compile --depth        # narrow model: compile and init time at 8 vs 64 layers, scanned vs unrolled
  python -m bench.compile --table        # LLaVA-1.5 7B / 13B, stage 1 / 2, on every target (TARGETS)
  python -m bench.compile --cell 7b 2 v5e-8 --rows 4 --remat full    # one compile, one JSON line
  python -m bench.compile --table --sizes 13b --stages 2 --lora       # stage 2 as LoRA (`:13b_lora`)
  python -m bench.compile --table --sizes next-7b --stages 2 --targets v5p-8,v6e-8,v5e-16 --rows 8   # LLaVA-NeXT-7B
  python -m bench.compile --table --sizes ov-7b --stages si,ov --targets v5p-8,v6e-8 --rows 1     # OneVision-7B
  python -m bench.compile --cell ov-7b si v6e-16 --rows 1          # OneVision's stages by name: stage1, si, ov
  python -m bench.compile --costs 7b:2:v5p-8:16 7b:2:v5p-8:16:packed 7b:2:v6e-8:4:tower   # cost estimates
  python -m bench.compile --costs 7b:2:v5p-8:4:packed=8192       # packed rows of 8192 (samples still <= 2048)
  python -m bench.compile --costs-from compile_results.jsonl --fill packed=0.97,bucketed=0.6      # table again

`--table` compiles each recipe (configs/llava15.py) through `llava_jax.train.aot`, the path of
`--config.compile_only=True`, which builds the step as training does: TPU targets through libtpu's
compiler for the topology (`pip install -e ".[tpu]"`), the GPU target with the CPU compiler over 8
simulated devices against 80 GiB (an upper bound: that compiler does not schedule FSDP gathers for
memory). For each cell it starts from the recipe's rows per device and halves them until the step
fits (remat `full`, FSDP over every chip, 2048 tokens, one image per row); it prints a markdown table
and appends every compile to `--out` as JSON. Every compile runs in its own process. The global batch is the
recipe's stage's, fed whole to the step as the loop feeds it (`--rows` x chips a micro-batch).

`next-7b` is LLaVA-NeXT-7B (the `llava-next-7b` preset: Mistral-7B, CLIP-336, v1.6 anyres) trained by
configs/llava_next.py:mistral_7b: stage 2 trains the projector, the LLM and the vision tower, 4096 tokens a
row, one image a row at its most patches (base + 2 x 2 tiles: up to 2928 image tokens), global batch 128.

`ov-7b` is LLaVA-OneVision-7B (the `llava-onevision-qwen2-7b` preset: SigLIP-SO400M/14-384, Qwen2-7B,
anyres_max_9 over (1x1)..(6x6) tiles, bilinear video pooling) trained by configs/llava_onevision.py:qwen2_7b,
its stages by the recipe's names: `si` and `ov` train everything (the tower at 2e-6), 32768 tokens a row, global
batch 256, and differ in their data alone (one program); `stage1` trains the projector, 8192 tokens, one 384 px
tile an image. A row carries 37 tile slots (base + 6 x 6) and a 32-frame video's 32 (the model reads video, so
every row has room for one). Without --rows a table starts at the recipe's micro-batch over 8 devices (16 rows).

`--costs` compiles the cells named `SIZE:STAGE:TARGET:ROWS[:packed[=ROW_LENGTH]][:tower]` (rows a chip; `packed`:
data.packing rows, several samples and their images a row, `=ROW_LENGTH` rows of that many tokens with the recipe's
tokens a step; `tower`: the stage trains the vision tower at 2e-6, as LLaVA-NeXT's
stage 2 does) and prints, per cell and optimizer step, the TPU compiler's cost estimates beside counts that
account for what it leaves out. What the compiler counts (found on 2026-12-06, jax 0.10.2, libtpu 0.0.42.1):
- `cost_analysis()["flops"]` is the FLOPs of one device's program with every loop body counted once: the
  micro-batch loop, each tower's scanned layers and the chunked loss' loop each add one iteration. Counted
  once, our count of the program's matmuls (llava_jax/train/hlo_flops.py: every dot and convolution of the
  optimized HLO, 2 x outputs x contracted size, a convolution's window counted only where it reads input,
  not padding) agrees with it to 0.2% on the 7B stage-2 step; with every loop at its trip count (read from
  the loop condition: the TPU compiler writes no trip counts) it is the step's matmul FLOPs, the column to
  use. A scanned stack counts what its unrolled twin counts (tests/test_hlo_flops.py, tests/test_compile.py).
- Neither count sees inside custom calls: the decoder's splash attention (a Pallas kernel) is in neither, so
  the cross-check divides the loop-counted FLOPs by flops.py's count with full remat's second forward and
  without attention; the model FLOPs (flops.py, with attention, no recompute) and 6 x params x tokens are
  what MFU divides.
- `optimal_seconds` is the compiler's time estimate of the same once-counted program. It was negative
  (-0.998) for an unrolled MLP on v5e, so it is quoted only when positive and within ROOFLINE_AGREES of a
  hand roofline of the same figures (max(flops / peak, bytes accessed / HBM bandwidth)); then the step's
  time is that estimate scaled by the loop-counted over the once-counted matmul FLOPs (each loop body's
  time taken as its FLOPs' share), and the MFU is the model FLOPs over that time at the chip's peak. All
  of these are the compiler's estimates, not measurements: it sees no input pipeline, no host, no
  collective contention beyond its own model, and a kernel's time only as its custom call's estimate.
- Flops a computed token: the step's loop-counted FLOPs over rows x max_length; a real (non-padding) token:
  that over `--fill`, the real tokens a computed token holds (bench/packing.py measures it per layout). A
  packed program computes its rows' image slots whether filled or not (`image_slots` of the report).

`--depth` is the scan goal: compile (train step, one CPU device) and random-init time of a narrow
LLaVA at 8 and 64 LLaMA layers, scanned (this code) and unrolled (`scan_layers=False`, the layout
before scanning), and the old init (the model's `init` traced and compiled, as `init_params` did).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (libtpu topology or None for the CPU compiler over 8 devices, chip memory GiB override)
TARGETS = {
    "v5e-8": ("v5e:2x4", None),
    "v5e-16": ("v5e:4x4", None),
    "v5e-32": ("v5e:4x8", None),
    "v5p-8": ("v5p:2x2x1", None),
    "v6e-8": ("v6e:2x4", None),
    "v6e-16": ("v6e:4x4", None),
    "v6e-32": ("v6e:4x8", None),
    "8x80GB-GPU": (None, 80.0),
}
RECIPE_ROWS = {1: 32, 2: 16}  # rows per device of configs/llava15.py (8 devices: micro-batches 256 and 128)
# bench name -> (PRESETS name, configs/llava_next.py argument)
NEXT_SIZES = {"next-7b": ("llava-next-7b", "mistral_7b")}
# bench name -> (PRESETS name, configs/llava_onevision.py argument); its stages go by the recipe's names
OV_SIZES = {"ov-7b": ("llava-onevision-qwen2-7b", "qwen2_7b")}


def _env(devices: int) -> dict:
    # The repository first, then whatever the caller had (e.g. a --target directory holding libtpu).
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def cell(size: str, stage: int | str, target: str, rows: int, remat: str, scan: bool = True, lora: bool = False,
         packed: bool = False, tower: bool = False, hlo_dir: str = "", row_length: int = 0) -> dict:
    """Compile one recipe stage for one target in this process; returns the report as a dict.

    `lora`: stage 2 of the `:SIZE_lora` recipe (r 128 adapters, the base frozen), not full fine-tuning.
    `size`: 7b / 13b (configs/llava15.py), a NEXT_SIZES name (configs/llava_next.py) or an OV_SIZES one
    (configs/llava_onevision.py, `stage` then by name: stage1, si, ov).
    `packed`: `data.packing` rows (several samples a row, their images in the row's image slots); `row_length`
    (packed): rows of that many tokens, each sample still truncated at the stage's max_length.
    `tower`: the stage trains the vision tower too, at LLaVA-NeXT's 2e-6 (`vision_learning_rate`).
    `hlo_dir`: keep the compiled program's optimized HLO there (`SIZE_STAGE_TARGET_ROWS[_packed][_tower].hlo.gz`)."""
    from llava_jax.train import aot

    topology, chip = TARGETS[target]
    devices = aot.topology_devices(topology) if topology else None
    n = len(devices) if devices else __import__("jax").device_count()
    c = _cell_config(size, stage, n, rows, remat, scan, lora, packed, tower, row_length)
    if chip:
        c.compile_chip_memory_gib = chip
    cpu0 = _cpu_seconds()
    name = _cell_name(size, stage, target, rows, packed, tower, row_length)
    report = aot.compile_stage(c, 0, devices, os.path.join(hlo_dir, f"{name}.hlo.gz") if hlo_dir else None)
    return {**aot.report_dict(report), "size": size, "stage": stage, "target": target, "rows_per_device": rows,
            "lora": lora, "packed": packed, "tower": tower, "row_length": row_length,
            "device_kind": report.devices.split(" x ", 1)[-1], "cpu_s": _cpu_seconds() - cpu0}


def _cell_name(size, stage, target, rows, packed, tower, row_length) -> str:
    """`SIZE_STAGE_TARGET_ROWS[_packed][_T<row_length>][_tower]`: a cell's HLO file name."""
    return "_".join([size, str(stage), target, str(rows)] + ["packed"] * bool(packed)
                    + [f"T{row_length}"] * bool(row_length) + ["tower"] * bool(tower))


def _cell_config(size: str, stage: int | str, n: int, rows: int, remat: str, scan: bool = True, lora: bool = False,
                 packed: bool = False, tower: bool = False, row_length: int = 0):
    """The config a cell compiles: the recipe's stage with the cell's remat, layout and rows a device."""
    if lora and stage != 2:
        raise ValueError("--lora is a stage-2 recipe")
    c = _recipe(size, stage, lora)
    c.model.init = ""
    c.model.remat = remat
    for st in c.stages:
        st.remat = ""  # the cell's remat, not the recipe's per-stage choice
    c.model.scan_layers = scan
    s = c.stages[0]
    if packed:
        c.data.packing, c.data.group_by_modality_length = True, False
        s.row_length = row_length
        if row_length > s.max_length:  # the recipe's tokens a step, in fewer, longer rows
            s.global_batch = max(1, s.global_batch * s.max_length // row_length)
    if tower and not any(p.startswith("vision_tower") for p in s.trainable):
        s.trainable, s.vision_learning_rate = [*s.trainable, "vision_tower/.*"], 2e-6
    s.micro_batch = rows * n
    if s.global_batch % s.micro_batch:
        raise ValueError(f"{rows} rows x {n} devices do not divide the global batch {s.global_batch}")
    return c


def _stage(name: str) -> int | str:
    """A stage as the command line gives it: LLaVA-1.5's and NeXT's by number (`2`), OneVision's by name (`si`)."""
    return int(name) if name.isdigit() else name


def _recipe(size: str, stage: int | str, lora: bool):
    """The training config of one recipe stage, by bench size name."""
    if size in OV_SIZES:
        if lora:
            raise ValueError("--lora: LLaVA-OneVision's stages have no LoRA recipe")
        return _ov_config(size, stage)
    if stage not in (1, 2):
        raise ValueError(f"stage {stage!r} of {size}: expected 1 or 2")
    if size in NEXT_SIZES:
        if lora:
            raise ValueError("--lora: LLaVA-NeXT's stage 2 trains everything")
        return _next_config(size, stage)
    from configs.llava15 import get_config

    return get_config(f"{size}_lora_stage2" if lora else f"{size}_stage{stage}")


def _recipe_rows(size: str, stage: int | str) -> int:
    """Rows a device a table starts from without --rows: LLaVA-1.5's (RECIPE_ROWS), or the recipe's micro-batch
    over 8 devices (OneVision's `si` / `ov`: 16 rows of 32768 tokens, which no slice here holds)."""
    if size in OV_SIZES:
        return max(1, _recipe(size, stage, False).stages[0].micro_batch // 8)
    return RECIPE_ROWS[stage]


def _next_config(size: str, stage: int):
    """configs/llava_next.py's stage `stage` for the bench size's LLM, with the preset's architecture (no
    model.init on this host): stage 2 trains the projector, image_newline, the LLM and the vision tower
    (its own learning rate) on anyres images, 4096 tokens a row, global batch 128."""
    from configs.llava_next import get_config

    preset, recipe = NEXT_SIZES[size]
    c = get_config(f"{recipe}_stage{stage}")
    c.model.preset = preset
    return c


def _ov_config(size: str, stage: str):
    """configs/llava_onevision.py's stage `stage` (`stage1`, `si` or `ov`) for the bench size's LLM: `si` and `ov`
    train everything (the tower at 2e-6) on anyres_max_9 images (and, every row, a 32-frame video's slots),
    32768 tokens a row, global batch 256; `stage1` the projector on one 384 px tile an image, 8192 tokens."""
    from configs.llava_onevision import STAGES, get_config

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} of {size}: expected one of {', '.join(STAGES)}")
    preset, recipe = OV_SIZES[size]
    c = get_config(f"{recipe}_{stage}")
    c.model.preset = preset
    return c


def _chips(target: str) -> int:
    """Chips of a target: its topology's product (`v5p:2x2x1` is 4), 8 for the GPU target."""
    import math

    topology = TARGETS[target][0]
    return 8 if topology is None else math.prod(int(x) for x in topology.split(":")[1].split("x"))


def _cpu_seconds() -> float:
    """This process's CPU time (user + system): less sensitive than wall time to other jobs on the host."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cell_subprocess(size, stage, target, rows, remat, scan=True, lora=False, packed=False, tower=False,
                     hlo_dir="", timeout=1800, row_length=0) -> dict:
    args = [sys.executable, "-m", "bench.compile", "--cell", size, str(stage), target, "--rows", str(rows),
            "--remat", remat] + ([] if scan else ["--unrolled"]) + (["--lora"] if lora else [])
    args += ["--packed"] * packed + ["--tower"] * tower + (["--hlo-dir", hlo_dir] if hlo_dir else [])
    args += ["--row-length", str(row_length)] if row_length else []
    t0 = time.time()
    r = subprocess.run(args, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        return {"size": size, "stage": stage, "target": target, "rows_per_device": rows, "remat": remat,
                "failed": r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else f"exit {r.returncode}",
                "wall_s": time.time() - t0}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t0
    return out


def table(out_path: str, sizes, stages, targets, lora: bool = False, start_rows: int | None = None) -> None:
    """Compile every cell, halving rows until it fits; print the markdown table.

    `start_rows`: rows a chip to try first (default: the recipe's, at most the global batch)."""
    rows_md = []
    for size in sizes:
        for stage in stages:
            for target in targets:
                n = _chips(target)
                global_batch = _recipe(size, stage, lora).stages[0].global_batch
                rows = min(start_rows or _recipe_rows(size, stage), global_batch // n)
                found = None
                while rows >= 1:
                    rec = _cell_subprocess(size, stage, target, rows, "full", lora=lora)
                    rec["uptime"] = os.getloadavg()[0]
                    with open(out_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)
                    if "failed" in rec:
                        break
                    if rec["fits"]:
                        found = rec
                        break
                    free = (rec["chip_bytes"] or 0) - rec["argument_bytes"]
                    if free <= 0 or rows == 1:  # the state alone does not fit, or one row does not
                        break
                    # Temporaries grow about linearly with the rows: jump to the largest power of two
                    # that the free memory suggests, at most half of what failed.
                    guess = rows * free / max(rec["temp_bytes"], 1)
                    rows = min(rows // 2, 1 << (int(guess).bit_length() - 1) if guess >= 1 else 1)
                last = found or rec
                rows_md.append(_md_row(size, stage, target, last, found is not None))
    print("\n| model | stage | target | fits with (rows/device, remat, mesh) | per-chip arguments | temporaries | "
          "total / chip | compile |")
    print("|---|---|---|---|---|---|---|---|")
    for line in rows_md:
        print(line)


def _md_row(size, stage, target, rec, fits) -> str:
    if "failed" in rec:
        return f"| {size} | {stage} | {target} | failed: {rec['failed']} | | | | |"
    g = 1 << 30
    mesh = " ".join(f"{k}={v}" for k, v in rec["mesh"].items() if v > 1) or "1 device"
    remat = f"{rec['remat']}{', LoRA r 128' if rec.get('lora') else ''}"
    what = (f"{rec['rows_per_device']} rows, {remat}, {mesh}" if fits
            else f"no: {rec['rows_per_device']} row(s)/chip need {rec['total_bytes'] / g:.1f} GiB")
    chip = f"{rec['chip_bytes'] / g:.4g}" if rec["chip_bytes"] else "?"  # 95, 31.25, 15.75
    return (f"| {size}, {rec['seq_len']} tokens | {stage} | {target} | {what} | {rec['argument_bytes'] / g:.1f} GiB | "
            f"{rec['temp_bytes'] / g:.1f} GiB | {rec['total_bytes'] / g:.1f} / {chip} GiB | "
            f"{rec['compile_s']:.0f} s |")


# --- the compiler's cost estimates ----------------------------------------------------------------------

# optimal_seconds is quoted only within these factors of the hand roofline of the figures it was given
# (max(flops / peak, bytes / bandwidth)): below it is impossible, far above it is not a roofline estimate.
ROOFLINE_AGREES = (0.9, 3.0)


def cost_row(rec: dict) -> dict:
    """One compiled cell's cost figures a chip and a step (from its `--cell` record): the compiler's, the
    loop-counted and the analytic FLOPs, and the step time and MFU `optimal_seconds` implies where it can
    be trusted (else the reason it cannot)."""
    import math

    import jax

    from llava_jax.models.llava import abstract_params
    from llava_jax.train import aot, flops

    chips = math.prod(rec["mesh"].values())
    c = _cell_config(rec["size"], rec["stage"], chips, rec["rows_per_device"], rec["remat"], True, rec["lora"],
                     rec["packed"], rec["tower"], rec.get("row_length", 0))
    stage = c.stages[0]
    cfg = aot.model_config(c, stage)
    cost, device_kind = rec["cost"], rec["device_kind"]
    rows = stage.global_batch
    computed_tokens = rows * rec["seq_len"]
    trains = lambda prefix: any(p.startswith(prefix) for p in stage.trainable)  # noqa: E731
    tiles = rows * rec["image_slots"]  # the step computes the tower over every slot, filled or not
    analytic = flops.train_step_flops(cfg, tokens=computed_tokens, seq_len=rec["seq_len"], tiles=tiles,
                                      train_vision=trains("vision_tower"), train_text=trains("language_model"))
    # What the loop-counted HLO matmuls should come to: full remat's second forward in, attention out (the
    # decoder's runs in a fused kernel on TPU, which no HLO count sees).
    visible = flops.train_step_flops(cfg, tokens=computed_tokens, seq_len=rec["seq_len"], tiles=tiles,
                                     train_vision=trains("vision_tower"), train_text=trains("language_model"),
                                     recompute=rec["remat"] == "full", attention=False)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    step_flops = cost["hlo_flops"] * chips  # the micro-batch loop is one of the loops counted
    row = {"chips": chips, "computed_tokens": computed_tokens, "params": params,
           "compiler_flops_chip": cost["compiler_flops"], "hlo_flops_once_chip": cost["hlo_flops_once"],
           "hlo_flops_chip": cost["hlo_flops"], "step_flops": step_flops, "analytic_flops": analytic,
           "analytic_matmuls_with_recompute": visible,
           "six_p_t": 6.0 * params * computed_tokens, "flops_per_computed_token": step_flops / computed_tokens,
           "loops": cost["loops"], "unknown_loops": cost["unknown_loops"], "kernels": cost["kernels"]}
    peak = flops.peak_tflops(device_kind or "")
    bandwidth = flops.peak_hbm_gbps(device_kind or "")
    optimal = cost["compiler_optimal_seconds"]
    row["optimal_seconds"] = optimal
    if optimal is None or peak is None or bandwidth is None:
        row["time_na"] = "no optimal_seconds from this compiler" if optimal is None else "chip's peaks unknown"
        return row
    roofline = max(cost["compiler_flops"] / (peak * 1e12), cost["compiler_bytes"] / (bandwidth * 1e9))
    row["roofline_seconds"] = roofline
    low, high = ROOFLINE_AGREES
    if optimal <= 0:
        row["time_na"] = f"optimal_seconds is {optimal:.3g} (negative)"
    elif not low * roofline <= optimal <= high * roofline:
        row["time_na"] = f"optimal_seconds {optimal:.3g} s vs hand roofline {roofline:.3g} s of the same figures"
    else:
        # The estimate covers each loop body once: scale it by the matmul FLOPs the loops add.
        row["step_seconds"] = optimal * step_flops / chips / max(cost["hlo_flops_once"], 1.0)
        row["mfu"] = analytic / (row["step_seconds"] * chips * peak * 1e12)
    return row


def _fills(spec: str) -> dict[str, float]:
    """`packed=0.85,packed8192=0.97,bucketed=0.6` -> {"packed": 0.85, ...}: the fill of each layout (`packedN`:
    packed rows of N tokens, a `packed=N` cell)."""
    out = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if not re.fullmatch(r"packed\d*|bucketed", name) or not value:
            raise SystemExit(f"--fill: {part!r}; expected packed=F or bucketed=F with F in (0, 1]")
        out[name] = float(value)
        if not 0 < out[name] <= 1:
            raise SystemExit(f"--fill: {part!r}; expected packed=F or bucketed=F with F in (0, 1]")
    return out


def costs(out_path: str, cells: list[str], remat: str, fills: dict[str, float], hlo_dir: str = "") -> None:
    """Compile each `SIZE:STAGE:TARGET:ROWS[:packed[=ROW_LENGTH]][:tower]` cell and print the cost-estimate table
    (`packed=8192`: packed rows of 8192 tokens, samples still truncated at the stage's max_length)."""
    recs = []
    for spec in cells:
        size, stage, target, rows, *flags = spec.split(":")
        row_length = [f.split("=", 1)[1] for f in flags if f.startswith("packed=")]
        flags = ["packed" if f.startswith("packed=") else f for f in flags]
        if set(flags) - {"packed", "tower"} or not all(x.isdigit() for x in row_length):
            raise SystemExit(f"--costs: {spec!r}; flags after ROWS are packed (or packed=ROW_LENGTH) and tower")
        rec = _cell_subprocess(size, _stage(stage), target, int(rows), remat, packed="packed" in flags,
                               tower="tower" in flags, hlo_dir=hlo_dir, timeout=3600,
                               row_length=int(row_length[0]) if row_length else 0)
        rec["uptime"] = os.getloadavg()[0]
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    print("\n" + "\n".join(cost_table(recs, fills)))


def _recount(rec: dict, hlo_dir: str) -> None:
    """A record's loop-counted FLOPs counted again from its kept HLO (`--hlo-dir`), when there is one."""
    import gzip

    from llava_jax.train import hlo_flops

    name = _cell_name(rec["size"], rec["stage"], rec["target"], rec["rows_per_device"], rec.get("packed"),
                      rec.get("tower"), rec.get("row_length", 0))
    path = os.path.join(hlo_dir, f"{name}.hlo.gz")
    if rec.get("cost") and os.path.exists(path):
        with gzip.open(path, "rt") as f:
            counted = hlo_flops.count(f.read())
        rec["cost"].update(hlo_flops=counted.flops, hlo_flops_once=counted.once, loops=list(counted.loops),
                           unknown_loops=counted.unknown_loops)


def cost_table(recs: list[dict], fills: dict[str, float]) -> list[str]:
    """The markdown table of `costs` (every figure a chip is per step; "est." marks the compiler's estimates)."""
    e = lambda x: f"{x:.3g}"  # noqa: E731
    lines = ["| model, stage | target, rows a chip | batch | compiler flops a chip (loops once) | matmul flops, loops "
             "counted, all chips (/ flops.py with remat, no attention) | model flops: flops.py / 6PT | "
             "flops a computed token | a real token (fill) | "
             "optimal_seconds (est.) | step time, MFU (est.) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        layout = f"packed{r.get('row_length') or ''}" if r.get("packed") else "bucketed"
        tower = " + tower" if r.get("tower") else ""
        head = f"| {r['size']}, {r['stage']}{tower} | {r['target']}, {r['rows_per_device']} | {layout} |"
        if "failed" in r or not r.get("cost"):
            lines.append(f"{head} {r.get('failed') or r.get('error') or 'no cost figures'} | | | | | | |")
            continue
        c = cost_row(r)
        fill = fills.get(layout)
        real = f"{e(c['flops_per_computed_token'] / fill)} ({fill:g})" if fill else "(no --fill)"
        optimal = c["optimal_seconds"]
        time = (f"{c['step_seconds']:.2f} s, {100 * c['mfu']:.0f}%" if "step_seconds" in c else f"n/a: {c['time_na']}")
        lines.append(f"{head} {e(c['compiler_flops_chip'])} | {e(c['step_flops'])} "
                     f"({c['step_flops'] / c['analytic_matmuls_with_recompute']:.3f}) | {e(c['analytic_flops'])} / "
                     f"{e(c['six_p_t'])} | {e(c['flops_per_computed_token'])} | {real} | "
                     f"{'n/a' if optimal is None else f'{optimal:.3g} s'} | {time} |")
    return lines


# --- depth scaling -------------------------------------------------------------------------------------


def _narrow(layers: int, scan: bool):
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig

    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=56),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=layers, num_heads=4,
                        num_kv_heads=4, head_dim=32),
        image_token_index=511, vision_feature_layer=-1, remat="full", scan_layers=scan,
    )


def depth_point(layers: int, scan: bool, what: str) -> dict:
    """One measurement in this process: `init` (init_params, compile + run), `old_init` (the model's
    init traced and compiled, as init_params was before), or `compile` (the stage-2 train step)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from llava_jax.models.llava import Llava, init_params
    from llava_jax.parallel import rules as rules_lib
    from llava_jax.parallel.mesh import make_mesh
    from llava_jax.train.program import stage_program
    from llava_jax.train.defaults import stage as make_stage
    from llava_jax.train.aot import abstract_batch
    from llava_jax.models.llava import abstract_params

    cfg = _narrow(layers, scan)
    t0, cpu0 = time.time(), _cpu_seconds()
    if what == "init":
        jax.block_until_ready(init_params(cfg, jax.random.key(0)))
    elif what == "old_init":
        v = cfg.vision
        ids = np.zeros((1, 8), np.int32)
        px = np.zeros((1, 1, v.image_size, v.image_size, 3), np.float32)
        jax.block_until_ready(jax.jit(lambda k: nn.unbox(Llava(cfg).init(k, ids, px)["params"]))(jax.random.key(0)))
    else:
        mesh = make_mesh()
        st = make_stage("finetune", data="", template="", trainable=["projector/.*", "language_model/.*"],
                        learning_rate=1e-4, global_batch=8, micro_batch=4, max_length=256)
        program = stage_program(cfg, st, mesh, rules_lib.DEFAULT_RULES, 100, abstract_params(cfg))
        t0, cpu0 = time.time(), _cpu_seconds()
        program.step.lower(program.state_abstract, abstract_batch(cfg, 2, 4, 256, mesh)).compile()
    return {"layers": layers, "scan": scan, "what": what, "seconds": time.time() - t0, "cpu_s": _cpu_seconds() - cpu0}


def depth(out_path: str) -> None:
    results = []
    for what in ("compile", "init", "old_init"):
        for scan in ((True, False) if what != "old_init" else (False,)):
            for layers in (8, 64):
                r = subprocess.run([sys.executable, "-m", "bench.compile", "--depth-point", str(layers),
                                    "scan" if scan else "unrolled", what], cwd=ROOT, env=_env(1),
                                   capture_output=True, text=True, timeout=3600)
                rec = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {
                    "layers": layers, "scan": scan, "what": what, "error": r.stderr[-300:]}
                rec["uptime"] = os.getloadavg()[0]
                print(json.dumps(rec), flush=True)
                with open(out_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                results.append(rec)
    print("\n| measurement | layout | 8 layers | 64 layers | 64 / 8 |\n|---|---|---|---|---|")
    for what in ("compile", "init", "old_init"):
        for scan in ((True, False) if what != "old_init" else (False,)):
            pts = {r["layers"]: r.get("seconds") for r in results if r["what"] == what and r["scan"] == scan}
            if None in pts.values():
                continue
            name = {"compile": "train step compile", "init": "init_params (compile + run)",
                    "old_init": "old init (model.init traced + compiled)"}[what]
            print(f"| {name} | {'scanned' if scan else 'unrolled'} | {pts[8]:.2f} s | {pts[64]:.2f} s | "
                  f"{pts[64] / pts[8]:.2f}x |")


def _check_cells(ap: argparse.ArgumentParser, args) -> None:
    """Exit 2 with one line on a size, stage or target that names no recipe, before any compile."""
    if args.cell:
        sizes, stages, targets = [args.cell[0]], [args.cell[1]], [args.cell[2]]
    elif args.table:
        sizes, stages, targets = args.sizes.split(","), args.stages.split(","), args.targets.split(",")
    else:
        return
    for target in targets:
        if target not in TARGETS:
            ap.error(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    for size in sizes:
        for stage in stages:
            try:
                _recipe(size, _stage(stage), args.lora)
            except ValueError as e:
                ap.error(str(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--cell", nargs=3, metavar=("SIZE", "STAGE", "TARGET"))
    ap.add_argument("--depth-point", nargs=3, metavar=("LAYERS", "LAYOUT", "WHAT"))
    ap.add_argument("--rows", type=int, default=None,
                    help="--cell: rows per device; --table: the rows to try first (default: the recipe's)")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--unrolled", action="store_true", help="--cell: scan_layers=False")
    ap.add_argument("--lora", action="store_true", help="--cell / --table: stage 2 as LoRA (the `:SIZE_lora` recipe)")
    ap.add_argument("--packed", action="store_true", help="--cell: packed rows (data.packing)")
    ap.add_argument("--row-length", type=int, default=0, help="--cell --packed: rows of this many tokens (a stage's "
                    "row_length; 0: its max_length)")
    ap.add_argument("--tower", action="store_true", help="--cell: the stage trains the vision tower (at 2e-6)")
    ap.add_argument("--costs", nargs="+", metavar="SIZE:STAGE:TARGET:ROWS[:packed][:tower]",
                    help="compile these cells (each in its own process) and print the cost-estimate table")
    ap.add_argument("--hlo-dir", default="", help="--cell / --costs: keep each compiled program's HLO here")
    ap.add_argument("--costs-from", metavar="JSONL", help="print the cost table of the cells recorded in this file")
    ap.add_argument("--fill", default="",
                    help="--costs: real (non-padding) tokens per computed token by layout, e.g. "
                         "packed=0.97,bucketed=0.6 (bench/packing.py measures them); default: per computed token")
    ap.add_argument("--sizes", default="7b,13b")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default="compile_results.jsonl")
    args = ap.parse_args()
    _check_cells(ap, args)
    if args.cell:
        size, stage, target = args.cell
        rows = args.rows or _recipe_rows(size, _stage(stage))
        print(json.dumps(cell(size, _stage(stage), target, rows, args.remat, scan=not args.unrolled, lora=args.lora,
                              packed=args.packed, tower=args.tower, hlo_dir=args.hlo_dir, row_length=args.row_length)))
    elif args.costs:
        costs(args.out, args.costs, args.remat, _fills(args.fill), args.hlo_dir)
    elif args.costs_from:
        with open(args.costs_from) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        if args.hlo_dir:  # count again from the kept programs (after a change to llava_jax/train/hlo_flops.py)
            for r in recs:
                _recount(r, args.hlo_dir)
        print("\n".join(cost_table([r for r in recs if "cost" in r or "failed" in r], _fills(args.fill))))
    elif args.depth_point:
        layers, layout, what = args.depth_point
        print(json.dumps(depth_point(int(layers), layout == "scan", what)))
    elif args.depth:
        depth(args.out)
    elif args.table:
        table(args.out, args.sizes.split(","), [_stage(s) for s in args.stages.split(",")], args.targets.split(","),
              lora=args.lora, start_rows=args.rows)
    else:
        ap.error("choose --table, --costs, --depth or --cell")


if __name__ == "__main__":
    main()
