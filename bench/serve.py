"""Serving under load: N concurrent streaming clients against the same requests one at a time.

CPU, the `small` LLaVA of bench/generate.py, and the tests' tiny one (random weights; a few minutes each):
    python -m bench.serve
    python -m bench.serve --shape tiny
One GPU or TPU chip, the LLaVA-1.5-7B shape with random bf16 weights (or a real model directory):
    python -m bench.serve --shape llava-1.5-7b --dtype bfloat16 --requests 64 --max-batch 16 --max-tokens 128
    python -m bench.serve --model-path DIR --dtype bfloat16 --requests 64 --max-batch 16

Starts `python -m llava_jax.serve` on a free local port (or uses `--base-url` of a running server),
and sends `--requests` chat requests (one random image of a varied size and a question of varied
length each, greedy, `--max-tokens` at most) through the official `openai` client twice:
- one at a time (each request waits for the one before: what the original LLaVA's model worker
  does, one `generate` per request), streamed, on a server of one slot (nothing computed for idle
  slots: the best case for one at a time);
- one at a time again, and then all at once from as many client threads (half streamed and half
  not), on a server of `--max-batch` slots.
Random weights (`--shape`) come with bench/eval.py's 300-piece tokenizer and a vocabulary cut to it,
so that answers are text; the server's `--max-context` is 1024 unless given (the cache a slot holds).
Throughput counts completion tokens (from `usage`) over the wall time of the run; TTFT is the time
from sending a streamed request to its first content chunk; latency is the time to its last byte.
Both runs answer greedily, so the answers must agree: the table says how many did. Every request is
sent once before timing (warm-up, compiling each prompt bucket).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import PIL.Image

QUESTIONS = [
    "What is in the image?",
    "Describe the image in detail.",
    "What colours do you see, and where are they in the picture?",
    "Is there anything unusual in this image? Explain what it is and why it stands out from the rest.",
]


def parse_args() -> argparse.Namespace:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate import SHAPES  # bench/generate.py's model shapes

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES) + ["tiny"], default="small",
                   help="random weights of this shape (tiny: the tests' model)")
    p.add_argument("--model-path", default=None, help="serve this model directory instead of random weights")
    p.add_argument("--base-url", default=None, help="a running server's /v1 address (nothing is started)")
    p.add_argument("--api-key", default="bench")
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: the checkpoint's; float32 for --shape)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=8, help="the server's decode slots")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-context", type=int, default=1024,
                   help="the server's --max-context: cache slots a request has (prompt + answer); 0: the model's")
    p.add_argument("--server-args", default="", help="more flags for the server, e.g. '--int8 --tensor-parallel 2'")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to be healthy")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKENIZER_PIECES = 300  # bench/eval.py's tokenizer


def tiny_shape():
    """The tests' tiny LLaVA (tests/_inference.py's sizes: 2 + 2 layers, 64 wide, 28 px images): a step costs
    little beside its dispatch, as a large model's does on an accelerator."""
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig

    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=68, num_layers=2, num_heads=4, image_size=28),
        text=TextConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, max_position_embeddings=1024),
        vision_feature_layer=-2)


def random_model_dir(root: str, shape: str) -> str:
    """Random weights of `shape` saved with a tokenizer and image settings (bench/eval.py's directory).

    The vocabulary is cut to the tokenizer's pieces plus the image token (a random model's answers are
    then text, which streams: 32000 rows would mostly decode to nothing); at 7B that is 2% fewer weights.
    """
    import torch
    from transformers import LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration

    from eval import model_dir
    from generate import SHAPES
    from llava_jax.config import llava_config_to_hf

    cfg = tiny_shape() if shape == "tiny" else SHAPES[shape]
    cfg = cfg.replace(dtype="float32", param_dtype="float32", image_token_index=TOKENIZER_PIECES)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=TOKENIZER_PIECES + 1))
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration._from_config(HFLlavaConfig(**llava_config_to_hf(cfg)), dtype=torch.float32)
    return model_dir(root, hf, cfg.vision.image_size)


def start_server(args: argparse.Namespace, model_path: str, log_path: str, max_batch: int
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llava_jax.serve", "--model-path", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--api-key", args.api_key]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.max_context:
        cmd += ["--max-context", str(args.max_context)]
    cmd += args.server_args.split()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log: {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, f"{url}/v1"
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server was not healthy after {args.timeout} s; its log: {log_path}")


def make_requests(n: int, seed: int = 0) -> list[list[dict]]:
    """n user messages: a PNG data URL of a random image (48 to 640 px a side) and a question."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(48, 640, 2))
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}])
    return out


def one(client, model: str, messages: list[dict], max_tokens: int, stream: bool) -> dict:
    """Send one request; its answer, completion tokens, TTFT (streamed only) and latency."""
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        return {"text": r.choices[0].message.content, "tokens": r.usage.completion_tokens, "ttft": None,
                "latency": time.perf_counter() - t0}
    ttft, parts, tokens = None, [], 0
    chunks = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in chunks:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(choice.delta.content)
    return {"text": "".join(parts), "tokens": tokens, "ttft": ttft, "latency": time.perf_counter() - t0}


def run(args: argparse.Namespace, model_path: str | None, root: str, max_batch: int, send) -> tuple[list[dict], float]:
    """Start a server of `max_batch` slots (unless --base-url), send every request once to warm it up (each prompt
    bucket compiles), then time `send(client, model)`; (its results, wall seconds)."""
    from openai import OpenAI

    proc, base_url = None, args.base_url
    if base_url is None:
        proc, base_url = start_server(args, model_path, os.path.join(root, f"server{max_batch}.log"), max_batch)
    try:
        client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
        model = client.models.list().data[0].id
        send(client, model)  # warm-up
        t0 = time.perf_counter()
        results = send(client, model)
        return results, time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(name: str, results: list[dict], wall: float) -> list[str]:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    lat = [r["latency"] for r in results]
    ms = lambda x: f"{1000 * x:.0f}"  # noqa: E731
    return [name, str(len(results)), f"{wall:.2f}", f"{tokens / wall:.1f}", f"{len(results) / wall:.2f}",
            f"{ms(pct(ttfts, 50))} / {ms(pct(ttfts, 99))}" if ttfts else "-", f"{ms(pct(lat, 50))} / {ms(pct(lat, 99))}"]


def main() -> None:
    args = parse_args()
    requests = make_requests(args.requests)
    with tempfile.TemporaryDirectory() as root:
        model_path = None
        if args.base_url is None:
            model_path = args.model_path or random_model_dir(root, args.shape)
            if args.model_path is None and args.dtype is None:
                args.dtype = "float32"
        # One at a time on a server of one slot (the best case for one request at a time: no idle slots to
        # compute), then all at once on a server of --max-batch slots; the same server for both with --base-url.
        sequential, seq_wall = run(args, model_path, root, 1, lambda c, m: [
            one(c, m, r, args.max_tokens, stream=True) for r in requests])

        def all_at_once(client, model):
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(requests)) as pool:
                futures = [pool.submit(one, client, model, r, args.max_tokens, i % 2 == 0)
                           for i, r in enumerate(requests)]
                return [f.result() for f in futures]

        def both(client, model):
            t0 = time.perf_counter()
            alone = [one(client, model, r, args.max_tokens, stream=True) for r in requests]
            t1 = time.perf_counter()
            return alone, t1 - t0, all_at_once(client, model), time.perf_counter() - t1

        (slotted, slot_wall, concurrent_results, con_wall), _ = run(args, model_path, root, args.max_batch, both)
    same = sum(a["text"] == b["text"] == c["text"] for a, b, c in zip(sequential, slotted, concurrent_results))
    rows = [summary("one at a time (streamed), 1 slot", sequential, seq_wall),
            summary(f"one at a time (streamed), {args.max_batch} slots", slotted, slot_wall),
            summary(f"{len(requests)} concurrent (half streamed), {args.max_batch} slots", concurrent_results,
                    con_wall)]
    print(f"{args.model_path or args.shape}, {len(requests)} requests, {args.max_tokens} tokens at most, greedy; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| mode | requests | wall s | completion tokens/s | requests/s | TTFT p50 / p99 ms | latency p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    rate = lambda results, wall: sum(r["tokens"] for r in results) / wall  # noqa: E731
    print(f"throughput, concurrent / one at a time: {rate(concurrent_results, con_wall) / rate(sequential, seq_wall):.2f}x"
          f" (1 slot), {rate(concurrent_results, con_wall) / rate(slotted, slot_wall):.2f}x ({args.max_batch} slots); "
          f"answers equal in all three runs: {same}/{len(requests)}; mean completion tokens "
          f"{statistics.mean(r['tokens'] for r in sequential):.1f}")


if __name__ == "__main__":
    main()
