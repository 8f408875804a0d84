"""Generation speed: time to first token and decode tokens/s, ours vs transformers `generate`.

CPU, a small LLaVA (random weights, shared by both implementations; about 2 minutes):
    python -m bench.generate
GPU, the LLaVA-1.5-7B shape with random bf16 weights (H200: 4.8 TB/s; H100 SXM: 3.35 TB/s):
    python -m bench.generate --shape llava-1.5-7b --dtype bfloat16 --bandwidth-gbs 4800

Each prompt is one image plus `--text-tokens` text tokens; every row generates exactly
`--new-tokens` tokens (EOS ignored), greedy. TTFT is the wall time from the request to the first
token on the host side of the accelerator (image encoding and prefill included). Decode tokens/s
counts the batch's tokens after the first over the time after the first. Roofline fraction:
language-model weight bytes x decode steps/s / bandwidth (a decode step must read every weight
once; at batch 1 steps/s = tokens/s). The KV cache reads are not counted, so this is a lower bound
on the fraction of bandwidth in use. transformers runs in the same process on the same device
(skipped when torch cannot reach it, or with --no-hf; --no-ours runs transformers alone, as
bench/suite.py does in its own process). Numbers are medians of `--repeats` runs; `--json` writes them.

The engine keeps a KV-cache window that doubles as the answer grows (`Engine(first_window=16)`);
"cache slots" is the cache length the last decode program ran with. `--max-new-tokens` gives the
engine a larger budget than the answer (as a chat's max_new_tokens=512 does), and `--full-window`
also times the single whole-budget window (`first_window=None`, the layout before windows) in the
same run:
    python -m bench.generate --no-hf --batch-sizes 1 --new-tokens 32 --max-new-tokens 512 --full-window
`--int8` times the weight-only int8 engine (`Engine(int8=True)`) beside the float one.

LLaVA-NeXT (anyres): `--shape next-small` is the small shape with the v1.6 pinpoints in its 112 px
tiles (transformers' `LlavaNextForConditionalGeneration` on the same weights); each prompt holds one
`--image-size` image (default 150x250: base + 1x2 tiles), its token count from `image_layout`:
    python -m bench.generate --shape next-small --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from bench.common import write_json
from llava_jax.anyres import V16_PINPOINTS, AnyresConfig
from llava_jax.config import LLAVA_15_7B, LlavaConfig, TextConfig, VisionConfig, llava_config_to_hf
from llava_jax.inference.engine import Engine, Prompt
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.llava import LlavaModel, init_params
from llava_jax.parallel import xla_flags

SMALL = LlavaConfig(
    vision=VisionConfig(
        hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=112, patch_size=14
    ),
    text=TextConfig(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64),
)
# The v1.6 grid pinpoints (336 px tiles) in SMALL's 112 px tiles, 8 x 8 features a tile.
NEXT_SMALL = SMALL.replace(
    anyres=AnyresConfig(tile_size=112, grid=8, pinpoints=[(h // 3, w // 3) for h, w in V16_PINPOINTS])
)
SHAPES = {"small": SMALL, "next-small": NEXT_SMALL, "llava-1.5-7b": LLAVA_15_7B}


@dataclasses.dataclass
class Row:
    impl: str
    batch: int
    ttft_ms: float
    decode_tok_s: float
    roofline: float | None
    cache_slots: int | None = None  # ours: the cache length (prompt + window) decode ended with


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--image-size", default="150,250", help="anyres shapes: each prompt's image (height,width)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (small shapes) / 128 (7b)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="ours: the engine's token budget (default --new-tokens); decoding stops at --new-tokens")
    p.add_argument("--int8", action="store_true", help="also time ours with weight-only int8 (Engine(int8=True))")
    p.add_argument("--full-window", action="store_true",
                   help="also time ours with one cache window of the whole budget (first_window=None)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth in GB/s for the roofline column")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--unrolled", action="store_true", help="ours with unrolled layers (scan_layers=False)")
    p.add_argument("--no-ours", action="store_true", help="skip llava_jax (transformers alone)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--no-xla-flags", action="store_true")
    return p.parse_args()


def lm_weight_bytes_of(cfg: LlavaConfig, dtype: str) -> int:
    """Bytes a decode step reads: the language model's weights, less the embedding table (B rows
    gathered; it is read whole when tied to the head)."""
    t = cfg.text
    per_layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim * t.hidden_size
    per_layer += 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    n = t.num_layers * per_layer + t.hidden_size + t.vocab_size * t.hidden_size
    return n * jax.numpy.dtype(dtype).itemsize


def make_prompts(cfg: LlavaConfig, batch: int, text_tokens: int, rng: np.random.Generator,
                 size: tuple[int, int]) -> list[Prompt]:
    """BOS, an image run, text: the shape of a one-image LLaVA question (anyres: an image of `size`, its
    patches padded to the most an image can have, as transformers batches them)."""
    prompts = []
    lay, t = cfg.image_layout(size), cfg.vision.image_size
    for _ in range(batch):
        ids = [1] + [cfg.image_token_index] * lay.num_tokens + list(rng.integers(3, 31000, text_tokens))
        if not cfg.is_anyres:
            pixels = rng.standard_normal((1, t, t, 3)).astype(np.float32)
            prompts.append(Prompt(np.asarray(ids, np.int32), pixels))
            continue
        pixels = np.zeros((1, cfg.geometry.max_patches, t, t, 3), np.float32)
        pixels[0, :lay.num_patches] = rng.standard_normal((lay.num_patches, t, t, 3))
        prompts.append(Prompt(np.asarray(ids, np.int32), pixels, None, [size]))
    return prompts


def time_ours(engine: Engine, prompts: list[Prompt], new_tokens: int, repeats: int,
              budget: int | None = None) -> tuple[float, float, int]:
    """(TTFT seconds, decode seconds, cache slots at the end): medians; the first run compiles and is not counted."""
    params = SamplingParams(max_new_tokens=budget or new_tokens, ignore_eos=True)
    ttfts, decodes = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state = engine.prefill(engine.prepare(prompts, params), params)
        state.tokens.block_until_ready()
        t1 = time.perf_counter()
        state = engine.decode(state, params, stop_at=new_tokens)
        state.tokens.block_until_ready()
        t2 = time.perf_counter()
        assert int(state.step.min()) == new_tokens, f"generated {int(state.step.min())} tokens, expected {new_tokens}"
        if i:
            ttfts.append(t1 - t0)
            decodes.append(t2 - t1)
    return statistics.median(ttfts), statistics.median(decodes), state.kv_mask.shape[1]


def time_hf(model, prompts: list[Prompt], new_tokens: int, repeats: int, device: str) -> tuple[float, float]:
    """(TTFT seconds, decode seconds) medians of transformers `generate` (1 token, then all tokens)."""
    import torch

    ids = torch.as_tensor(np.stack([p.ids for p in prompts]), dtype=torch.long, device=device)
    dtype = next(model.parameters()).dtype
    images = np.concatenate([p.images for p in prompts])
    nchw = images.transpose(0, 1, 4, 2, 3) if images.ndim == 5 else images.transpose(0, 3, 1, 2)
    pixels = torch.as_tensor(nchw.copy(), device=device).to(dtype)
    mask = torch.ones_like(ids)
    extra = {}
    if prompts[0].image_sizes is not None:  # LlavaNext: each image's (height, width)
        sizes = np.concatenate([np.asarray(p.image_sizes) for p in prompts])
        extra["image_sizes"] = torch.as_tensor(sizes, dtype=torch.long, device=device)

    def gen(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    gen(2)  # warm-up
    ttfts = [gen(1) for _ in range(repeats)]
    totals = [gen(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(ttfts)
    return ttft, max(statistics.median(totals) - ttft, 1e-9), None


def build(cfg: LlavaConfig, dtype: str, want_hf: bool, want_ours: bool = True):
    """(our LlavaModel or None, transformers model or None, torch device). Same weights on CPU; random each on GPU."""
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    on_gpu = jax.default_backend() != "cpu"
    hf, device = None, "cpu"
    if want_hf:
        import torch
        from transformers import LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        if on_gpu and device == "cpu":
            print("transformers: torch cannot reach the GPU here; comparison skipped")
        else:
            torch_dtype = getattr(torch, dtype)
            torch.set_num_threads(os.cpu_count() or 1)
            with torch.device(device):
                config_cls, model_cls = ((LlavaNextConfig, LlavaNextForConditionalGeneration) if cfg.is_anyres
                                         else (HFLlavaConfig, LlavaForConditionalGeneration))
                hf = model_cls._from_config(config_cls(**llava_config_to_hf(cfg)), dtype=torch_dtype)
            hf.eval()
    if not want_ours:
        ours = None
    elif hf is not None and device == "cpu":
        from llava_jax.weights.load import load_pretrained

        with tempfile.TemporaryDirectory() as d:  # the same weights in both implementations
            hf.save_pretrained(d)
            ours = load_pretrained(d, dtype, scan_layers=cfg.scan_layers)
    else:
        params = nn.unbox(init_params(cfg, jax.random.key(0)))
        ours = LlavaModel(cfg, params)
    return ours, hf, device


def main() -> None:
    args = parse_args()
    xla_flags.apply(not args.no_xla_flags)
    cfg = SHAPES[args.shape].replace(scan_layers=not args.unrolled)
    new_tokens = args.new_tokens or (128 if "7b" in args.shape else 32)
    t0 = time.perf_counter()
    ours, hf, device = build(cfg, args.dtype, not args.no_hf, not args.no_ours)
    engine = Engine(ours) if ours is not None else None
    full = Engine(ours, first_window=None) if ours is not None and args.full_window else None
    int8 = Engine(ours, int8=True) if ours is not None and args.int8 else None
    weight_bytes = lm_weight_bytes_of(cfg, args.dtype)
    size = tuple(int(x) for x in args.image_size.split(","))
    image_tokens = cfg.image_layout(size).num_tokens
    where = f"{jax.devices()[0].device_kind} ({jax.default_backend()})" if ours is not None else device
    print(
        f"device: {where}, shape {args.shape}, {args.dtype}, "
        f"LM weights {weight_bytes / 1e9:.3f} GB, prompt {1 + image_tokens + args.text_tokens} tokens "
        f"({image_tokens} image{f' of {size[0]}x{size[1]} px' if cfg.is_anyres else ''}), {new_tokens} new tokens, "
        f"built in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    rng = np.random.default_rng(0)
    budget = args.max_new_tokens
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = make_prompts(cfg, batch, args.text_tokens, rng, size)
        impls = []
        if engine is not None:
            impls.append(("llava_jax", lambda: time_ours(engine, prompts, new_tokens, args.repeats, budget)))
        if int8 is not None:
            impls.append(("llava_jax int8", lambda: time_ours(int8, prompts, new_tokens, args.repeats, budget)))
        if full is not None:
            impls.append(("llava_jax (full window)",
                          lambda: time_ours(full, prompts, new_tokens, args.repeats, budget)))
        if hf is not None:
            impls.append(("transformers", lambda: time_hf(hf, prompts, new_tokens, args.repeats, device)))
        for name, timer in impls:
            ttft, decode, slots = timer()
            tok_s = batch * (new_tokens - 1) / decode
            steps_s = (new_tokens - 1) / decode
            roof = weight_bytes * steps_s / (args.bandwidth_gbs * 1e9) if args.bandwidth_gbs else None
            rows.append(Row(name, batch, ttft * 1e3, tok_s, roof, slots))
    print()
    print("| implementation | batch | TTFT (ms) | decode tok/s | roofline | speed-up (decode) | cache slots |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x.impl == "transformers" and x.batch == r.batch), None)
        speedup = f"{r.decode_tok_s / ref.decode_tok_s:.2f}x" if ref and r.impl != "transformers" else ""
        roof = f"{100 * r.roofline:.0f}%" if r.roofline is not None else "-"
        slots = "-" if r.cache_slots is None else str(r.cache_slots)
        print(f"| {r.impl} | {r.batch} | {r.ttft_ms:.1f} | {r.decode_tok_s:.1f} | {roof} | {speedup} | {slots} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    write_json(args.json, dict(benchmark="decode", shape=args.shape, dtype=args.dtype, device=where,
                               new_tokens=new_tokens, max_new_tokens=args.max_new_tokens or new_tokens,
                               prompt_tokens=1 + image_tokens + args.text_tokens,
                               weight_bytes=weight_bytes, bandwidth_gbs=args.bandwidth_gbs,
                               rows=[dataclasses.asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
