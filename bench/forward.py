"""Forward (prefill) latency: llava_jax vs transformers' LlavaForConditionalGeneration, same shapes, same run.

    python -m bench.forward                                   # CPU, a mid-size config, float32
    python -m bench.forward --shape llava-1.5-7b --dtype bfloat16 --batch 8 --last-only   # on a GPU

Both sides get random weights of the same shapes (timing needs no shared weights; parity is the
tests' job). Prints a table: median latency, prefill tokens/s and, where the chip's peak is known,
model FLOPs utilisation (MFU). `--last-only` computes the logits of the last position only, as a
prefill before decoding does (both sides); `--skip-ours` / `--skip-hf` run one side; `--json`
writes the figures (bench/suite.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_memory_gib, with_layers, write_json
from llava_jax.config import LLAVA_15_7B, LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import Llava, init_params
from llava_jax.parallel import xla_flags
from llava_jax.train.flops import forward_flops, peak_tflops

SHAPES = {
    "small": LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=112),
        text=TextConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                        num_kv_heads=8, head_dim=64),
        image_token_index=4000,
    ),
    "llava-1.5-7b": LLAVA_15_7B,
}


def hf_model(cfg: LlavaConfig, dtype: str, device: str):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration

    v, t = cfg.vision, cfg.text
    hc = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                       image_size=v.image_size, patch_size=v.patch_size, projection_dim=512),
        text_config=LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                                rms_norm_eps=t.rms_norm_eps),
        image_token_index=cfg.image_token_index, image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with torch.device(device):
        model = LlavaForConditionalGeneration(hc).to(torch_dtype).eval()
    return model


def inputs(cfg: LlavaConfig, batch: int, text_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids = rng.integers(3, min(cfg.text.vocab_size, cfg.image_token_index), size=(batch, n + text_len))
    ids[:, 0] = 1
    ids[:, 1 : 1 + n] = cfg.image_token_index
    px = rng.standard_normal((batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return ids.astype(np.int32), px


def time_it(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="LLaMA layers (default: the shape's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=64, help="text tokens after the image placeholder run")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--last-only", action="store_true", help="logits of the last position only (a prefill)")
    ap.add_argument("--attention", default="auto", help="auto | xla | cudnn | splash")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--no-xla-flags", action="store_true")
    args = ap.parse_args()
    xla_flags.apply(not args.no_xla_flags)

    cfg = with_layers(SHAPES[args.shape], args.layers).replace(dtype=args.dtype, param_dtype=args.dtype,
                                                               attention=args.attention)
    ids, px = inputs(cfg, args.batch, args.text_len)
    seq = ids.shape[1]
    flops = forward_flops(cfg, tokens=args.batch * seq, seq_len=seq, tiles=args.batch)
    if args.last_only:  # the LM head runs on one position per row
        flops -= 2 * args.batch * (seq - 1) * cfg.text.hidden_size * cfg.text.vocab_size
    rows = []

    if not args.skip_ours:
        params = nn.unbox(init_params(cfg, jax.random.key(0)))  # param_dtype = args.dtype
        module = Llava(cfg)
        fwd = jax.jit(lambda p, i, x, m: module.apply({"params": p}, i, x, m, last_only=args.last_only)[0])
        j_ids, j_px = jnp.asarray(ids), jnp.asarray(px[:, None]).astype(args.dtype)
        j_mask = jnp.ones_like(j_ids)
        t0 = time.perf_counter()
        fwd(params, j_ids, j_px, j_mask).block_until_ready()
        compile_s = time.perf_counter() - t0
        ours = time_it(lambda: fwd(params, j_ids, j_px, j_mask).block_until_ready(), args.iters)
        rows.append(dict(impl="llava_jax (jax.jit)", time_s=ours, device=jax.devices()[0].device_kind,
                         memory_gib=device_memory_gib(), note=f"attention={args.attention}, compile {compile_s:.1f} s"))
        params = None  # free the device memory before transformers allocates its copy

    if not args.skip_hf:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        model = hf_model(cfg, args.dtype, dev)
        t_ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
        t_px = torch.as_tensor(px.transpose(0, 3, 1, 2).copy(), device=dev).to(model.dtype)

        def hf_step():
            with torch.no_grad():
                model(input_ids=t_ids, pixel_values=t_px, logits_to_keep=1 if args.last_only else 0)
            if dev == "cuda":
                torch.cuda.synchronize()

        hf = time_it(hf_step, args.iters)
        rows.append(dict(impl=f"transformers (torch {torch.__version__}, {dev})", time_s=hf,
                         device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                         memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
                         note=f"{model.config._attn_implementation} attention, {torch.get_num_threads()} threads"))

    print(f"\nforward, shape={args.shape} layers={cfg.text.num_layers} dtype={args.dtype} batch={args.batch} seq={seq} "
          f"({cfg.num_image_tokens} image + {args.text_len} text tokens), last_only={args.last_only}")
    print("| implementation | device | median latency (ms) | prefill tokens/s | TFLOP/s | MFU | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tf = flops / r["time_s"] / 1e12
        peak = peak_tflops(r["device"])
        mfu = f"{tf / peak:.1%}" if peak else "n/a"
        print(f"| {r['impl']} | {r['device']} | {r['time_s'] * 1e3:.1f} | {args.batch * seq / r['time_s']:,.0f} | "
              f"{tf:.2f} | {mfu} | {r['note']} |")
    if len(rows) == 2:
        print(f"\nspeed-up of llava_jax over transformers: {rows[1]['time_s'] / rows[0]['time_s']:.2f}x")
    write_json(args.json, dict(benchmark="prefill", shape=args.shape, layers=cfg.text.num_layers, dtype=args.dtype,
                               batch=args.batch, seq=seq, tokens=args.batch * seq, flops=flops,
                               last_only=args.last_only, rows=rows))


if __name__ == "__main__":
    main()
