"""Train-step time: llava_jax vs the PyTorch reference (transformers LlavaForConditionalGeneration +
torch AdamW, gradient checkpointing), same shapes and trainable set, same run.

    python -m bench.train_step                                   # CPU, small config, stage 2
    python -m bench.train_step --shape llava-1.5-7b --stage 1 --dtype bfloat16 --batch 8 --seq 2048  # GPU
    python -m bench.train_step --lora 128     # stage 2 as LoRA (r 128, projector trained fully) vs full, both sides

Random weights on both sides (timing only). Prints step time, tokens/s, TFLOP/s and MFU (model
FLOPs from the shapes, causal attention at half; see llava_jax/train/flops.py). `--skip-torch` /
`--skip-ours` run one side (bench/suite.py runs each in its own process); `--json` writes the
figures; `--layers` cuts the LLaMA depth (the 7B's widths with 16 layers fit one H200).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from bench.common import device_memory_gib, with_layers, write_json
from bench.forward import SHAPES, hf_model
from llava_jax.models.llava import init_params
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel import xla_flags
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.partition import device_batch, jit_sharded, model_param_shardings, state_shardings
from llava_jax.train.flops import peak_tflops, train_step_flops
from llava_jax.train.optimizer import make_optimizer, split_params
from llava_jax.train.step import create_state, make_train_step, to_microbatches

TRAINABLE = {1: ["projector/.*"], 2: ["projector/.*", "language_model/.*"]}


def batch(cfg, rows: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids = rng.integers(3, min(cfg.text.vocab_size, cfg.image_token_index), size=(rows, seq)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n] = cfg.image_token_index
    labels = ids.copy()
    labels[:, : 1 + n] = -100
    px = rng.standard_normal((rows, 1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids), "pixel_values": px}


def time_steps(fn, iters: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lora_spec(rank: int, dropout: float):
    from llava_jax.models.lora import DECODER_LINEARS, LoraSpec

    return LoraSpec(rank=rank, alpha=2.0 * rank, targets=DECODER_LINEARS, dropout=dropout)


def ours(cfg, b, stage: int, iters: int, remat: str, lora_rank: int = 0, lora_dropout: float = 0.05) -> tuple[float, float]:
    # The state and step are built here as train/program.stage_program builds them, not through it:
    # that module (and the stage configs) import ml_collections, which the GPU machine's bench suite
    # does not have (tests/test_bench_suite.py).
    cfg = cfg.replace(remat=remat, param_dtype="float32", lora=lora_spec(lora_rank, lora_dropout) if lora_rank else None)
    mesh = make_mesh()
    rules = rules_lib.DEFAULT_RULES
    params = nn.unbox(init_params(cfg, jax.random.key(0), shardings=model_param_shardings(cfg, mesh, rules)))
    tx, schedule = make_optimizer(learning_rate=1e-5, total_steps=1000, other_learning_rate=2e-5 if lora_rank else None,
                                  other=TRAINABLE[1])
    trainable, frozen = split_params(params, TRAINABLE[1] + [".*/lora_[ab]"] if lora_rank else TRAINABLE[stage])
    frozen = jax.tree.map(lambda x: x.astype(cfg.dtype), frozen)
    abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    sh = state_shardings(abstract, cfg, mesh, rules, tx)
    state = jax.jit(lambda p, f: create_state(p, f, tx), out_shardings=sh)(trainable, frozen)
    del params, trainable, frozen
    step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (sh, None),
                       (sh, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), donate_argnums=(0,))
    dev = device_batch(to_microbatches(b, 1), mesh)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], dev)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    return time_steps(run, iters), compile_s


def torch_reference(cfg, b, stage: int, iters: int, dtype: str, lora_rank: int = 0, lora_dropout: float = 0.05) -> float:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, dtype, dev).train()
    model.gradient_checkpointing_enable()
    if lora_rank:  # the original's finetune_lora.sh: peft on the LLM's Linear layers, the projector trained too
        from peft import LoraConfig, get_peft_model

        from llava_jax.weights.peft import target_modules

        spec = lora_spec(lora_rank, lora_dropout)
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                 target_modules=target_modules(cfg, spec)))
    for name, p in model.named_parameters():
        p.requires_grad = ("multi_modal_projector" in name or "lora_" in name
                           or (stage == 2 and not lora_rank and "language_model" in name))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    kw = {
        "input_ids": torch.as_tensor(b["input_ids"], dtype=torch.long, device=dev),
        "labels": torch.as_tensor(b["labels"], dtype=torch.long, device=dev),
        "attention_mask": torch.as_tensor(b["attention_mask"], dtype=torch.long, device=dev),
        "pixel_values": torch.as_tensor(b["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy(), device=dev).to(model.dtype),
    }

    def run():
        loss = model(**kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    return time_steps(run, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="LLaMA layers (default: the shape's)")
    ap.add_argument("--stage", type=int, choices=[1, 2], default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default="auto", help="auto | xla | cudnn | splash")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--no-xla-flags", action="store_true")
    ap.add_argument("--lora", type=int, default=0, metavar="RANK",
                    help="stage 2 as LoRA of this rank (alpha 2r; projector trained), timed beside full")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="(the original's 0.05)")
    args = ap.parse_args()
    xla_flags.apply(not args.no_xla_flags)

    cfg = with_layers(SHAPES[args.shape], args.layers).replace(dtype=args.dtype, attention=args.attention)
    b = batch(cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    # Model FLOPs: a LoRA step computes no weight gradients for the frozen LLM (the adapters' own are ~r/d of it).
    flops = {rank: train_step_flops(cfg, tokens=tokens, seq_len=args.seq, tiles=args.batch, train_vision=False,
                                    train_text=args.stage == 2 and not rank) for rank in {0, args.lora}}
    rows = []
    for rank in ([0, args.lora] if args.lora else [0]):
        kind = f"LoRA r={rank} dropout {args.lora_dropout:g}" if rank else "full"
        if not args.skip_ours:
            device = jax.devices()[0].device_kind
            t, compile_s = ours(cfg, b, args.stage, args.iters, args.remat, rank, args.lora_dropout)
            rows.append(dict(impl=f"llava_jax {kind}", time_s=t, device=device, devices=jax.device_count(),
                             memory_gib=device_memory_gib(), flops=flops[rank], lora_rank=rank,
                             note=f"remat={args.remat}, attention={args.attention}, compile {compile_s:.1f} s, "
                                  f"{jax.device_count()} device(s)"))
        if not args.skip_torch:
            import torch

            peer = "transformers + peft" if rank else "transformers"
            t = torch_reference(cfg, b, args.stage, args.iters, args.dtype, rank, args.lora_dropout)
            cuda = torch.cuda.is_available()
            rows.append(dict(impl=f"{peer} {kind} + torch AdamW (torch {torch.__version__})", time_s=t, devices=1,
                             device=torch.cuda.get_device_name() if cuda else "cpu", flops=flops[rank], lora_rank=rank,
                             memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                             note="gradient checkpointing, sdpa attention"))
    print(f"\ntrain step, shape={args.shape} layers={cfg.text.num_layers} stage={args.stage} dtype={args.dtype} "
          f"batch={args.batch}x{args.seq} ({cfg.num_image_tokens} image tokens per row)")
    print("| implementation | device | step time (ms) | tokens/s | TFLOP/s per device | MFU | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tf = r["flops"] / r["time_s"] / 1e12 / r["devices"]
        peak = peak_tflops(r["device"])
        mfu = f"{tf / peak:.1%}" if peak else "n/a"
        print(f"| {r['impl']} | {r['device']} | {r['time_s'] * 1e3:.0f} | {tokens / r['time_s']:,.0f} | {tf:.3f} | "
              f"{mfu} | {r['note']} |")
    if not args.skip_ours and not args.skip_torch:
        for ours_row, peer_row in zip(rows[::2], rows[1::2]):
            print(f"\nspeed-up of {ours_row['impl']} over the PyTorch reference: "
                  f"{peer_row['time_s'] / ours_row['time_s']:.2f}x")
    write_json(args.json, dict(benchmark="train_step", shape=args.shape, layers=cfg.text.num_layers, stage=args.stage,
                               dtype=args.dtype, batch=args.batch, seq=args.seq, tokens=tokens, flops=flops[0], rows=rows))


if __name__ == "__main__":
    main()
