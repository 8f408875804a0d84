"""Benchmark answering speed: `eval run` (batched) against one question at a time, as the original answers.

CPU, the `small` LLaVA of bench/generate.py (random weights, shared by both implementations):
    python bench/eval.py

A POPE-style question file (one image each, "...\\nAnswer the question using a single word or
phrase.") is answered greedily, up to `--new-tokens` tokens, three ways in the same process:
`python -m llava_jax.eval run`'s code with `--batch-size`; the same with batch size 1 (our engine in
the original's loop); and transformers' `generate` called once per question, which is what the
original's `model_vqa_loader.py` does (prompt ids and pixels prepared as ours, so that only the
generation differs). Each of ours runs twice over the file and the second run is timed (the first
compiles); the first run's time is reported too. Questions/s = questions / wall time of the run,
image loading and preprocessing included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image

from llava_jax.config import llava_config_to_hf
from llava_jax.data import synthetic
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.eval import get_benchmark
from llava_jax.eval.harness import run_benchmark
from llava_jax.inference import answering
from llava_jax.inference.pipeline import Pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import SHAPES  # noqa: E402  (bench/generate.py's model shapes)

OBJECTS = ["dog", "cat", "bus", "car", "bench", "chair", "person", "bottle", "cup", "kite", "boat", "clock"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--questions", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    return p.parse_args()


def make_data(root: str, n: int, image_size: int) -> str:
    """n POPE-style questions on 32 random images of varied sizes; returns the question file."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    for i in range(32):
        w, h = int(rng.integers(image_size // 2, 2 * image_size)), int(rng.integers(image_size // 2, 2 * image_size))
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "images", f"{i:04d}.png"))
    path = os.path.join(root, "questions.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            text = f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?\nAnswer the question using a single word or phrase."
            f.write(json.dumps({"question_id": i, "image": f"{i % 32:04d}.png", "text": text, "category": "random"}) + "\n")
    return path


def model_dir(root: str, hf, image_size: int) -> str:
    """The shared random weights as a model directory every command takes (weights, tokenizer, image settings)."""
    d = os.path.join(root, "model")
    hf.save_pretrained(d)
    sentences = [f"Is there a {o} in the image? Answer the question using a single word or phrase." for o in OBJECTS]
    sentences += [synthetic.TEMPLATE_TEXT[0]] * 4
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(synthetic.train_tokenizer(sentences * 20, vocab_size=300))
    ImageProcessorConfig(size=image_size, crop_size=image_size, pad_to_square=True).save(d)
    return d


def time_ours(pipe: Pipeline, questions: str, folder: str, out: str, batch: int, new: int) -> tuple[float, float]:
    """(first run s, second run s) of `eval run pope` on the question file."""
    times = []
    for k in range(2):
        t0 = time.perf_counter()
        run_benchmark(get_benchmark("pope"), pipe, questions, folder, f"{out}.{k}.jsonl", batch_size=batch,
                      max_new_tokens=new, progress=False)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def time_hf(hf, pipe: Pipeline, questions: str, folder: str, new: int) -> tuple[float, list[str]]:
    """Wall time of the original's loop: per question, load and preprocess the image, `generate`, decode."""
    import torch

    qs = get_benchmark("pope").questions(questions, argparse.Namespace())
    texts = []

    def one(q) -> str:
        prompt = answering.build_prompt(pipe, q, folder)
        ids = torch.as_tensor(np.asarray(prompt.ids)[None], dtype=torch.long)
        pixels = torch.as_tensor(prompt.images.transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=pipe.tokenizer.eos_id)
        return pipe.tokenizer.decode(out[0, ids.shape[1]:].tolist()).strip()

    one(qs[0])  # warm-up
    t0 = time.perf_counter()
    for q in qs:
        texts.append(one(q))
    return time.perf_counter() - t0, texts


def main() -> None:
    import torch
    from transformers import LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration

    args = parse_args()
    cfg = SHAPES[args.shape].replace(dtype="float32", param_dtype="float32")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = LlavaForConditionalGeneration._from_config(HFLlavaConfig(**llava_config_to_hf(cfg)), dtype=torch.float32)
    hf.eval()
    with tempfile.TemporaryDirectory() as root:
        size = cfg.vision.image_size
        questions = make_data(root, args.questions, size)
        pipe = Pipeline.from_pretrained(model_dir(root, hf, size))  # the same weights on both sides
        folder = os.path.join(root, "images")
        n, rows = args.questions, []
        first, second = time_ours(pipe, questions, folder, os.path.join(root, "batched"), args.batch_size, args.new_tokens)
        rows.append((f"`eval run`, batch {args.batch_size}", n / second, n / first))
        first1, second1 = time_ours(pipe, questions, folder, os.path.join(root, "single"), 1, args.new_tokens)
        rows.append(("`eval run`, batch 1 (the original's loop, our engine)", n / second1, n / first1))
        seconds, texts = time_hf(hf, pipe, questions, folder, args.new_tokens)
        rows.append(("transformers `generate`, one question at a time (as model_vqa_loader)", n / seconds, None))
        with open(os.path.join(root, "batched.1.jsonl")) as f:
            ours_texts = [json.loads(line)["text"] for line in f]
        agree = sum(a == b for a, b in zip(ours_texts, texts)) / n
        print(f"{n} questions, {args.new_tokens} new tokens at most, shape {args.shape}, float32, "
              f"{cfg.num_image_tokens} image tokens; load average {os.getloadavg()[0]:.2f}")
        print("| implementation | questions/s | questions/s, first run (compiles) |")
        print("|---|---|---|")
        for name, qps, qps_first in rows:
            print(f"| {name} | {qps:.2f} | {'—' if qps_first is None else f'{qps_first:.2f}'} |")
        print(f"batched vs transformers one at a time: {rows[0][1] / rows[2][1]:.2f}x; vs our batch 1: "
              f"{rows[0][1] / rows[1][1]:.2f}x; greedy answers equal to transformers': {agree:.0%}")


if __name__ == "__main__":
    main()
