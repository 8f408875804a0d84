"""LLaVA-OneVision forward (prefill) latency: llava_jax vs transformers' LlavaOnevisionForConditionalGeneration, the
same weights and inputs, in one run.

    python -m bench.onevision                   # CPU: a small SigLIP + Qwen2, one downscaled image / a video
    python -m bench.onevision --iters 10 --frames 16

Both sides load one random-weight llava-hf directory (saved by transformers), so the logits are compared too
(max |difference| is printed; parity itself is the tests' job). Cases: a lone 1000x700 image (anyres_max_9 tiles
it 3x2 of 6x6 and downscales its grid: the weighted gather), three images in one prompt (untiled), and a video of
`--frames` frames (bilinear 2x pooling). Prints median latency and prefill tokens/s per case; `--json` writes them.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.common import write_json
from bench.forward import time_it


def hf_model(tile: int):
    """A small random OneVision: SigLIP 6 x 256 at `tile` px (patch 14), Qwen2 4 x 512, pinpoints (1..6)^2."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                                image_size=tile, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768)
    pins = [[a * tile, b * tile] for a in range(1, 7) for b in range(1, 7)]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=4000, video_token_index=4001,
                               image_grid_pinpoints=pins, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def cases(cfg, tile: int, frames: int, rng: np.random.Generator) -> dict:
    """name -> (input_ids [1, T], pixel_values or None, image_sizes, videos or None, batch_num_images)."""
    from llava_jax import anyres

    g = cfg.geometry
    out = {}
    text = list(rng.integers(3, 3000, 16))
    size = (700, 1000)
    lay = anyres.layout(g, size)
    px = rng.standard_normal((1, g.max_patches, tile, tile, 3)).astype(np.float32)
    px[0, lay.num_patches:] = 0
    out["1 image 700x1000"] = ([4000] * lay.num_tokens + text, px, np.array([size]), None, np.array([1]))
    sizes = [(300, 400), (500, 250), (384, 384)]
    ids = sum(([4000] * anyres.layout(g, s, False).num_tokens + text[:4] for s in sizes), []) + text
    px = rng.standard_normal((3, g.max_patches, tile, tile, 3)).astype(np.float32)
    out["3 images"] = (ids, px, np.array(sizes), None, np.array([3]))
    video = rng.standard_normal((1, frames, tile, tile, 3)).astype(np.float32)
    out[f"video {frames} frames"] = ([4001] * g.video_tokens(frames) + text, None, None, video, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--tile", type=int, default=112, help="tile pixels (SO400M's is 384; 112 = an 8 x 8 grid)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import torch

    from llava_jax import load_pretrained

    hf = hf_model(args.tile)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d)
    rng = np.random.default_rng(0)
    rows = []
    for name, (ids, px, sizes, videos, per_row) in cases(ours.config, args.tile, args.frames, rng).items():
        ids = np.asarray([ids], np.int32)
        kw = dict(image_sizes=sizes, pixel_values_videos=videos, batch_num_images=per_row)
        ours_fn = lambda: jax.block_until_ready(ours(ids, px, **kw).logits)  # noqa: E731
        tkw = {"input_ids": torch.as_tensor(ids, dtype=torch.long)}
        if px is not None:
            tkw.update(pixel_values=torch.as_tensor(px.transpose(0, 1, 4, 2, 3).copy()),
                       image_sizes=torch.as_tensor(sizes), batch_num_images=torch.as_tensor(per_row))
        if videos is not None:
            tkw["pixel_values_videos"] = torch.as_tensor(videos.transpose(0, 1, 4, 2, 3).copy())

        def hf_fn():
            with torch.no_grad():
                return hf(**tkw).logits

        start = time.perf_counter()
        got = np.asarray(ours_fn())
        compile_s = time.perf_counter() - start
        diff = float(np.abs(got - hf_fn().numpy()).max())
        t_ours, t_hf = time_it(ours_fn, args.iters, warmup=1), time_it(hf_fn, args.iters, warmup=1)
        rows.append(dict(case=name, tokens=ids.shape[1], ours_ms=1e3 * t_ours, hf_ms=1e3 * t_hf,
                         speedup=t_hf / t_ours, compile_s=compile_s, max_abs_diff=diff))
    print(f"\nOneVision forward, SigLIP 6 x 256 at {args.tile} px, Qwen2 4 x 512, float32, batch 1, "
          f"{args.iters} iterations (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| case | tokens | llava_jax (ms) | transformers (ms) | speed-up | first call incl. compile (s) "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tokens']} | {r['ours_ms']:.1f} | {r['hf_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |")
    write_json(args.json, dict(benchmark="onevision_forward", tile=args.tile, frames=args.frames, rows=rows))


if __name__ == "__main__":
    main()
