"""Packed rows against length buckets: real tokens, rows per epoch and train-step speed, in one run.

    python -m bench.packing                          # both data sets, steps timed: ~15 minutes on 2 busy cores
    python -m bench.packing --no-steps               # token and row counts only
    python -m bench.packing --mix-fraction 1         # all 665,298 modelled records (~1 ms each to plan, twice)

Two data sets, each batched both ways by the pipeline's own code, side by side:

(a) the embedded synthetic stage-2 data (llava_jax/data/synthetic.py, what `python -m llava_jax.train` trains
    on) through the whole pipeline, `make_dataset(..., packing=True)` against the tiny recipe's length buckets
    (configs/tiny.py: max_length 128, buckets 32-112, batches of 16), and packed into rows of 512 in batches of
    4 (`row_length` 512, samples still truncated at 128: the same tokens a step; at 128 most samples, 43-136
    tokens, fill a row alone). Every batch of one epoch
    goes through the tiny model's real stage-2 train step (train/program.stage_program, float32, as training
    builds it), timed step by step (each shape's first step, its compile, runs once untimed before).
(b) a length distribution modelled on LLaVA-1.5's stage-2 mix, llava_v1_5_mix665k.json (which cannot be
    downloaded here): the components of MIX_665K below (`--mix-fraction` of each), rendered by the pipeline's
    planner (`pipeline.plan_packing`: every record through the real template, renderer and tokenizer, then
    first-fit), batched as the LLaVA-1.5 recipe does (configs/llava15.py: max_length 2048, global batch 128,
    length buckets 512/1024/1536, grouped by modality and length: `pipeline.epoch_plan`, `pipeline.bucket_length`;
    and shuffled without grouping, the default) or packed (rows of 2048, and with samples still truncated at 2048
    `row_length` 4096 and 8192, in batches of 64 and 32). The
    records carry no pixels: a LLaVA-1.5 image is 576 tokens whatever it shows, so the counts are exact for
    these lengths. The step is timed once a batch shape (the tiny recipe's widths with LLaVA-1.5's 336 px image,
    576 tokens; `--step-rows` rows a step), and an epoch's step time is the sum over its batches of their
    shape's time a row times their rows.

Figures: real tokens (non-padding, supervised or not) over computed tokens (rows x T summed over the epoch's
batches, empty rows included), computed tokens per real token, rows per epoch (empty rows of the last batch
included), and train-step throughput in real tokens per second of step time on this machine's CPU. On the
tiny model (hidden 128) attention's T^2 dominates a step and XLA's masked attention computes every pair of a
packed row, its segments' included (splash skips them): longer rows cost more a token here than they would on
a 7B model, whose MLPs dominate.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402
from llava_jax import anyres  # noqa: E402
from llava_jax.data import image as image_lib  # noqa: E402
from llava_jax.data import packed_format, pipeline, sources, synthetic  # noqa: E402
from llava_jax.data.tokenizer import Tokenizer  # noqa: E402

# The LLaVA-1.5 recipe's stage 2 (configs/llava15.py) and its image: CLIP ViT-L/14 at 336 px, 24 x 24 tokens.
MIX_MAX_LENGTH, MIX_BATCH, MIX_BUCKETS, MIX_IMAGE_TOKENS = 2048, 128, (512, 1024, 1536), 576


@dataclasses.dataclass(frozen=True)
class Component:
    """One part of the 665K mix: its records, image folder (None: text only) and our model of its shape:
    question-answer rounds a record (uniform in `rounds`), and LLaMA tokens of a question and of an answer
    (lognormal: median, sigma of the log)."""

    name: str
    records: int
    folder: str | None
    rounds: tuple[int, int]
    question: tuple[float, float]
    answer: tuple[float, float]


# Records: the released file's exact counts by source (haotian-liu/LLaVA#702, the author correcting the
# LLaVA-1.5 paper's Table 7 for A-OKVQA and RefCOCO; they add up to the file's 665,298), LLaVA-Instruct split
# in the ratio of its three files (conversation_58k, detail_23k, complex_reasoning_77k). Folders: the README's
# coco, gqa, ocr_vqa, textvqa, vg; their totals are the file's counts by folder (haotian-liu/LLaVA#657: coco
# 364,100, vg 86,417, gqa 72,140, ocr_vqa 80,000, textvqa 21,953, text-only 40,688). The shapes are our
# estimates, not measured: short-answer VQA merged into one multi-round record an image, each question carrying
# Table 7's format prompt ("Answer the question using a single word or phrase.", ~12 tokens), A-OKVQA's
# options and letter answer, RefCOCO / VG region descriptions with box coordinates, long multi-turn ShareGPT.
MIX_665K = (
    Component("LLaVA-Instruct conversation", 57_894, "coco", (2, 6), (12, 0.4), (55, 0.6)),
    Component("LLaVA-Instruct detail", 22_958, "coco", (1, 1), (11, 0.2), (115, 0.35)),
    Component("LLaVA-Instruct complex reasoning", 76_860, "coco", (1, 1), (22, 0.4), (135, 0.35)),
    Component("ShareGPT (text only)", 40_688, None, (1, 6), (45, 1.1), (240, 0.8)),
    Component("VQAv2", 82_783, "coco", (3, 8), (20, 0.2), (2, 0.4)),
    Component("GQA", 72_140, "gqa", (6, 20), (21, 0.25), (2, 0.4)),
    Component("OKVQA", 8_998, "coco", (1, 1), (22, 0.25), (2, 0.4)),
    Component("OCRVQA", 80_000, "ocr_vqa", (3, 6), (18, 0.2), (6, 0.6)),
    Component("A-OKVQA", 66_160, "coco", (1, 1), (55, 0.25), (1, 0.0)),
    Component("TextCaps", 21_953, "textvqa", (1, 1), (14, 0.1), (16, 0.4)),
    Component("RefCOCO", 48_447, "coco", (2, 8), (30, 0.3), (12, 0.5)),
    Component("VG", 86_417, "vg", (4, 12), (30, 0.3), (10, 0.5)),
)


class ModelledMix(sources.Source):
    """Records of the modelled 665K mix (`MIX_665K`, `fraction` of each component), built on access from a few
    numbers a record: words of each turn, drawn once for the seed. No pixels (the planner needs none)."""

    def __init__(self, tokenizer: Tokenizer, fraction: float = 1.0, seed: int = 0):
        self.name = f"modelled llava_v1_5_mix665k ({fraction:g})"
        rng = np.random.default_rng(seed)
        # Words of the synthetic tokenizer's own text; how many of its tokens a word takes, on average.
        self._words = "the shapes are red blue green yellow purple white circle square triangle left right".split()
        per_word = len(tokenizer.encode(" ".join(self._words * 20))) / (len(self._words) * 20)
        self.component, turns = [], []
        for c, comp in enumerate(MIX_665K):
            n = max(1, round(comp.records * fraction))
            rounds = rng.integers(comp.rounds[0], comp.rounds[1] + 1, n)
            for r in rounds:
                q = rng.lognormal(np.log(comp.question[0]), comp.question[1], r)
                a = rng.lognormal(np.log(comp.answer[0]), comp.answer[1], r)
                turns.append(np.maximum(1, np.round(np.stack([q, a], 1).reshape(-1) / per_word)).astype(np.int32))
            self.component += [c] * n
        self.component = np.asarray(self.component, np.int32)
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in turns])]).astype(np.int64)
        self._turn_words = np.concatenate(turns)
        self._stats = None

    def __len__(self) -> int:
        return len(self.component)

    def __getitem__(self, index: int) -> sources.Example:
        comp = MIX_665K[self.component[index]]
        counts = self._turn_words[self._offsets[index]:self._offsets[index + 1]]
        words = self._words
        turns = [{"from": ("human", "gpt")[k % 2], "value": " ".join(words[(k + j) % len(words)] for j in range(n))}
                 for k, n in enumerate(counts)]
        record: dict[str, Any] = {"id": f"{comp.name}/{index}", "conversations": turns}
        if comp.folder is not None:
            record["image"] = f"{comp.folder}/{index}.jpg"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        return sources.Example(record, [], [])

    def record_stats(self):
        if self._stats is None:
            rows = [packed_format.record_stats(self[i].record) for i in range(len(self))]
            arr = np.asarray(rows, np.int64)
            self._stats = arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(bool)
        return self._stats


# ----------------------------------------------------------------------------- the train step


class StepTimer:
    """The tiny recipe's stage-2 train step (configs/tiny.py, built by train/program.stage_program as training
    builds it), float32 on this machine's CPU; `image_size` replaces the tiny tower's 56 px (336: LLaVA-1.5's
    576 tokens an image)."""

    def __init__(self, tokenizer: Tokenizer, image_size: int | None = None, total_steps: int = 1000):
        import flax.linen as nn  # pylint: disable=g-import-not-at-top  # jax only where steps are timed
        import jax  # pylint: disable=g-import-not-at-top

        from llava_jax.models.llava import init_params  # pylint: disable=g-import-not-at-top
        from llava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
        from llava_jax.parallel import partition  # pylint: disable=g-import-not-at-top
        from llava_jax.train import defaults, loop, program  # pylint: disable=g-import-not-at-top
        from llava_jax.train.step import to_microbatches  # pylint: disable=g-import-not-at-top

        config = defaults.tiny_config()
        if image_size:
            config.model.vision.image_size = image_size
        stage = config.stages[1]
        self.cfg = program.compute_config(loop.model_config(config, tokenizer), config, stage)
        mesh = make_mesh(**config.mesh.to_dict())
        rules = program.rules_from_config(config)
        shardings = partition.model_param_shardings(self.cfg, mesh, rules)
        params = nn.unbox(init_params(self.cfg, jax.random.key(0), shardings=shardings))
        self.program = program.stage_program(self.cfg, stage, mesh, rules, total_steps, params)
        self.state = self.program.init_state(params)
        self._put = lambda batch: partition.device_batch(to_microbatches(batch, 1), mesh)
        self._seen: set[tuple] = set()
        self._jax = jax

    def __call__(self, batch: dict[str, np.ndarray]) -> float:
        """Seconds of one step on `batch` (its shape's first step, the compile, runs once untimed before)."""
        keys = ("input_ids", "labels", "attention_mask", "pixel_values", "segment_ids", "positions")
        batch = {k: batch[k] for k in keys if k in batch}
        shape = tuple((k, v.shape) for k, v in sorted(batch.items()))
        device = self._put(batch)
        if shape not in self._seen:
            self._seen.add(shape)
            self._run(device)
        t0 = time.perf_counter()
        self._run(self._put(batch))
        return time.perf_counter() - t0

    def _run(self, device_batch) -> None:
        self.state, metrics = self.program.step(self.state, device_batch)
        self._jax.block_until_ready(metrics["loss"])


def shape_batch(cfg, rows: int, seq: int, images: int, packed: bool) -> dict[str, np.ndarray]:
    """A batch of `rows` x `seq` tokens with `images` image slots a row, each row full: packed, `images`
    segments of equal length each starting with its image's tokens; else one sample with one image."""
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    ids = rng.integers(3, cfg.image_token_index, size=(rows, seq)).astype(np.int32)
    segments = images if packed else 1
    span = seq // segments
    seg = np.zeros((rows, seq), np.int32)
    for k in range(segments):
        ids[:, k * span] = 1
        ids[:, k * span + 1:k * span + 1 + n] = cfg.image_token_index
        seg[:, k * span:(k + 1) * span] = k + 1
    labels = np.where(ids == cfg.image_token_index, -100, ids).astype(np.int32)
    size = cfg.vision.image_size
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (seg > 0).astype(np.int32),
             "pixel_values": rng.standard_normal((rows, images, size, size, 3)).astype(np.float32)}
    if packed:
        batch["segment_ids"] = seg
        batch["positions"] = np.where(seg > 0, np.arange(seq)[None] - (seg - 1) * span, 0).astype(np.int32)
    return batch


# ----------------------------------------------------------------------------- (a) the synthetic data


@dataclasses.dataclass
class Line:
    """One way of batching one data set: its epoch's figures."""

    data: str
    batching: str
    rows: int  # rows per epoch, empty ones included
    samples: int
    real: int  # real (non-padding) tokens per epoch
    computed: int  # rows x T, summed over the epoch's batches
    step_s: float | None = None  # seconds of train step for the epoch (None: not timed)
    note: str = ""
    flops_7b: float | None = None  # LLaVA-1.5-7B stage-2 model FLOPs of the epoch's batches (None: not counted)

    @property
    def fraction(self) -> float:
        """Real tokens over computed tokens."""
        return self.real / self.computed


def synthetic_lines(args, steps: bool) -> list[Line]:
    """(a): one epoch of the synthetic stage-2 data through the pipeline, packed and bucketed, steps timed."""
    from llava_jax.train import defaults  # pylint: disable=g-import-not-at-top

    config = defaults.tiny_config()
    stage = config.stages[1]
    syn = dict(config.data.synthetic_args)
    syn["num_train"] = args.num_train or syn["num_train"]
    paths = synthetic.build(args.data_dir, num_train=syn["num_train"], num_val=0, image_size=syn["image_size"],
                            seed=syn["seed"], vocab_size=syn["vocab_size"])
    tokenizer = Tokenizer(paths["tokenizer"])
    size = config.model.vision.image_size
    cfg = image_lib.ImageProcessorConfig(size=size, crop_size=size, pad_to_square=config.data.pad_to_square)
    timer = StepTimer(tokenizer) if steps else None
    b, t = stage.global_batch, stage.max_length
    # (label, make_dataset arguments): the recipe's rows both ways, and packed rows 4x longer in batches 4x
    # smaller (the same tokens a step), where most of its samples (43-136 tokens) no longer fill a row alone.
    ways = (("packed", dict(packing=True, batch_size=b, max_length=t)),
            (f"packed, rows of {4 * t}", dict(packing=True, batch_size=b // 4, max_length=t, row_length=4 * t,
                                              max_images_per_row=8)),
            ("bucketed", dict(length_buckets=config.data.length_buckets, batch_size=b, max_length=t)))
    lines = []
    for batching, kwargs in ways:
        ds = pipeline.make_dataset(
            paths["stage2"], paths["image_folder"], tokenizer, stage.template, cfg,
            num_image_tokens=(size // config.model.vision.patch_size) ** 2, image_token_index=tokenizer.vocab_size,
            seed=config.seed + 1, num_epochs=1, shard_index=0, shard_count=1, **kwargs)
        it = iter(ds)
        rows = real = computed = slots = 0
        step_s = 0.0
        for batch in it:
            rows += batch["input_ids"].shape[0]
            real += int(batch["attention_mask"].sum())
            computed += batch["input_ids"].size
            slots = batch["pixel_values"].shape[1]
            if timer is not None:
                step_s += timer(batch)
        buckets = pipeline.bucket_list(kwargs.get("length_buckets"), kwargs.get("row_length") or kwargs["max_length"])
        lines.append(Line("synthetic stage 2 (tiny recipe)", batching, rows, it.stats.samples, real, computed,
                          step_s if timer else None,
                          f"{kwargs['batch_size']} rows a batch, T in {buckets}, {slots} image slots a row"))
    return lines


# ----------------------------------------------------------------------------- (b) the modelled 665K mix


def flops_7b(rows: int, seq: int, slots: int) -> float:
    """LLaVA-1.5-7B stage-2 FLOPs (train/flops.py: LLM trained, tower frozen) of `rows` rows of `seq` tokens and
    `slots` image slots, as the compiled step computes them: every slot through the tower, every row's whole
    causal attention (a packed row's segments see each other's keys masked, not skipped, on the XLA path)."""
    from llava_jax.config import LLAVA_15_7B  # pylint: disable=g-import-not-at-top
    from llava_jax.train.flops import train_step_flops  # pylint: disable=g-import-not-at-top

    return train_step_flops(LLAVA_15_7B, tokens=rows * seq, seq_len=seq, tiles=rows * slots, train_vision=False,
                            train_text=True)


def mix_lines(args, tokenizer: Tokenizer, steps: bool) -> tuple[list[Line], dict[str, Any]]:
    """(b): the modelled mix planned packed (the pipeline's planner) and bucketed (the recipe's plan)."""
    source = ModelledMix(tokenizer, args.mix_fraction, seed=args.seed)
    geometry = anyres.AnyresConfig.flat(336, 24)
    timer = StepTimer(tokenizer, image_size=336) if steps else None
    per_row: dict[tuple[int, int, bool], float] = {}

    def seconds(rows: int, seq: int, slots: int, is_packed: bool) -> float | None:
        # Step time of `rows` rows at this shape, from one step of --step-rows rows (measured once a shape).
        if timer is None:
            return None
        key = (seq, slots, is_packed)
        if key not in per_row:
            batch = shape_batch(timer.cfg, args.step_rows, seq, slots, is_packed)
            per_row[key] = float(np.median([timer(batch) for _ in range(args.repeats)])) / args.step_rows
        return rows * per_row[key]

    lines, info = [], {"plan_s": {}}
    # The recipe's rows, and rows 2 and 4 times as long in batches as many times smaller (the same tokens a
    # step; samples still truncated at 2048, `row_length`): with 94% of the records carrying 576 image tokens,
    # a 2048 row mostly holds two samples. The records' sizes are planned once (the planner's render of every
    # record, its cost), then packed three ways.
    t0 = time.perf_counter()
    sizes = pipeline.planned_sizes(source, tokenizer, "vicuna_v1", geometry, image_token_index=tokenizer.vocab_size,
                                   max_length=MIX_MAX_LENGTH, max_images=1)
    info["plan_s"]["sizes"] = time.perf_counter() - t0
    for scale in (1, 2, 4):
        t0 = time.perf_counter()
        seq, b = MIX_MAX_LENGTH * scale, MIX_BATCH // scale
        images = pipeline.images_per_row(geometry, seq, 1, None)
        packed, tokens = pipeline.plan_packing(source, tokenizer, "vicuna_v1", geometry,
                                               image_token_index=tokenizer.vocab_size, max_length=MIX_MAX_LENGTH,
                                               max_images_per_sample=1, images_per_row=images, seed=args.seed,
                                               shuffle=True, row_length=seq, sizes=sizes)
        info["plan_s"][seq] = time.perf_counter() - t0
        rows = b * pipeline.num_global_batches(np.ones(len(packed)), batch_size=b, shard_count=1,
                                               group_by_modality_length=False)
        lines.append(Line("modelled LLaVA-1.5 665K mix", "packed" if scale == 1 else f"packed, rows of {seq}", rows,
                          len(source), int(tokens.sum()), rows * seq, seconds(rows, seq, images, True),
                          f"{b} rows a batch of {seq}, {images} image slots a row", flops_7b(rows, seq, images)))
    info["mean_tokens"] = {c.name: float(tokens[source.component == k].mean()) for k, c in enumerate(MIX_665K)}
    b = MIX_BATCH
    buckets = pipeline.bucket_list(MIX_BUCKETS, MIX_MAX_LENGTH)
    lengths = source.lengths(geometry)
    for group in (True, False):
        plan = pipeline.epoch_plan(lengths, batch_size=b, shard_count=1, seed=args.seed, epoch=0, shuffle=True,
                                   group_by_modality_length=group)[:, 0]
        longest = np.where(plan >= 0, tokens[np.maximum(plan, 0)], 0).max(1)
        t = np.asarray([pipeline.bucket_length(buckets, int(x)) for x in longest])
        step_s = sum(seconds(b, int(x), 1, False) for x in t) if timer else None
        what = "grouped by modality and length (the recipe's)" if group else "shuffled, not grouped"
        shapes = ", ".join(f"{(t == x).sum()} x {x}" for x in buckets)
        lines.append(Line("modelled LLaVA-1.5 665K mix", f"bucketed, {what}", plan.size, len(source), int(tokens.sum()),
                          int(b * t.sum()), step_s, f"{b} rows a batch, T in {buckets}: {shapes}",
                          sum(flops_7b(b, int(x), 1) for x in t)))
    info["row_step_s"] = {f"T={k[0]}, {k[1]} slots{', packed' if k[2] else ''}": v for k, v in per_row.items()}
    return lines, info


# ----------------------------------------------------------------------------- anyres planning's header reads


def header_cost(folder: str, count: int = 40) -> dict[str, float]:
    """Microseconds an image to read its size from the header (`sources.header_size`, what packing plans an
    anyres image with) and to decode it (`image.load_image`, what loading does), over `count` 640 x 480 JPEGs
    and PNGs (COCO's usual size) written to `folder` (a warm page cache: a cold disk adds its seek to both)."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[:480, :640]
    out = {}
    for ext in ("jpg", "png"):
        files = []
        for k in range(count):
            file = os.path.join(folder, f"{k}.{ext}")
            pixels = np.stack([(x * (k + 1)) % 256, (y * 3 + k) % 256, (x + y) % 256], -1).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(file)
            files.append(file)
        for what, fn in (("header", sources.header_size), ("decode", image_lib.load_image)):
            t0 = time.perf_counter()
            for file in files:
                fn(file)
            out[f"{ext} {what} us"] = (time.perf_counter() - t0) / count * 1e6
    return out


# ----------------------------------------------------------------------------- the table


def table(lines: list[Line]) -> str:
    """The markdown table of the lines, then each bucketed line against each packed one of its data."""
    out = ["| data | batching | rows per epoch | real / computed tokens | computed per real token | "
           "train step: real tokens/s | 7B FLOPs an epoch | batches |", "|---|---|---|---|---|---|---|---|"]
    for line in lines:
        speed = f"{line.real / line.step_s:,.0f}" if line.step_s else "not timed"
        flops = f"{line.flops_7b:.3g}" if line.flops_7b else "-"
        out.append(f"| {line.data} | {line.batching} | {line.rows:,} | {line.fraction:.1%} | "
                   f"{line.computed / line.real:.2f} | {speed} | {flops} | {line.note} |")
    out.append("")
    for ref in (x for x in lines if x.batching.startswith("packed")):
        for line in (x for x in lines if x.data == ref.data and not x.batching.startswith("packed")):
            # Per real token: the two ways may truncate differently (rows of another max_length).
            ratio = (line.computed / line.real) / (ref.computed / ref.real)
            speed = (f", {(ref.real / ref.step_s) / (line.real / line.step_s):.2f}x the real tokens a second"
                     if line.step_s and ref.step_s else "")
            if line.flops_7b and ref.flops_7b:
                speed += f", {(line.flops_7b / line.real) / (ref.flops_7b / ref.real):.2f}x fewer 7B FLOPs a real token"
            out.append(f"- {ref.data}: {ref.batching} against {line.batching}: {ratio:.2f}x fewer computed tokens "
                       f"a real token{speed}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[Line]:
    """Runs both data sets, prints the table; returns its lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "llava_jax_bench_packing"),
                   help="where the synthetic data is built (cached)")
    p.add_argument("--num-train", type=int, default=0, help="synthetic images (0: the tiny recipe's 2000)")
    p.add_argument("--mix-fraction", type=float, default=0.1,
                   help="share of each 665K component to model (1: all 665,298 records, ~1 ms each to plan)")
    p.add_argument("--step-rows", type=int, default=2, help="rows a timed step at the 665K mix's shapes")
    p.add_argument("--repeats", type=int, default=3, help="timed steps a shape of the 665K mix (the median kept)")
    p.add_argument("--no-steps", action="store_true", help="count tokens and rows only; time no train step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    steps = not args.no_steps
    lines = synthetic_lines(args, steps)
    tokenizer = Tokenizer(os.path.join(args.data_dir, "tokenizer.model"))
    mix, info = mix_lines(args, tokenizer, steps)
    lines += mix
    print(f"\nbench.packing: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end, "
          f"{time.perf_counter() - t0:.0f} s; the modelled mix's {mix[0].samples:,} records planned in "
          + ", ".join(f"{s:.1f} s ({'their sizes' if t == 'sizes' else f'rows of {t}'})"
                      for t, s in info["plan_s"].items()) + "\n")
    print(table(lines))
    print("\nmodelled mix, mean rendered tokens a record (synthetic tokenizer, image 576): " +
          ", ".join(f"{k} {v:.0f}" for k, v in info["mean_tokens"].items()))
    if steps:
        info["headers"] = header_cost(os.path.join(args.data_dir, "header_cost"))
        print("anyres planning reads each image's size from its header: " + ", ".join(
            f"{k} {v:.0f}" for k, v in info["headers"].items()))
    write_json(args.json, {"benchmark": "packing", "lines": [dataclasses.asdict(x) for x in lines], **info})
    return lines


if __name__ == "__main__":
    main()
