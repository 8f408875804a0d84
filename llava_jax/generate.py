"""Ask a LLaVA about images, one prompt or a whole questions file.

    python -m llava_jax.generate --model-path DIR --image-file cat.jpg --prompt "What is this?"
    python -m llava_jax.generate --model-path DIR --image-file a.jpg --image-file b.jpg \\
        --prompt "<image> or <image>: which is brighter?" --temperature 0 --json
    python -m llava_jax.generate --model-path DIR --questions-file q.jsonl --image-folder imgs/ \\
        --answers-file a.jsonl --batch-size 16

Flags follow the original LLaVA scripts (`run_llava`, `model_vqa`); their underscore spellings
(`--top_p`, `--max_new_tokens`, `--question-file`, `--query`) are accepted too. The questions
file is `model_vqa`'s: one JSON object a line with `question_id`, `text` and (optionally) `image`;
each answer line holds `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`.
Batch runs are resumable: questions already answered in the answers file are skipped.

Bad input (a missing or unreadable image, a prompt longer than the context, more `<image>`
markers than images) prints one line and exits with status 2; in batch mode the question is
reported by id, the others are answered, and the exit status is 2 at the end.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from llava_jax.data.image import ImageError
from llava_jax.data.templates import TEMPLATES
from llava_jax.inference.engine import InputError, completion_dict
from llava_jax.inference.pipeline import DEFAULT_CONV_MODE, Pipeline
from llava_jax.weights.safetensors_io import CheckpointError

# Errors whose message is the whole story for the user: printed as one line, exit status 2.
USER_ERRORS = (InputError, ImageError, CheckpointError, OSError)
# What a malformed question may raise while its prompt is built (reported by id in batch mode).
QUESTION_ERRORS = USER_ERRORS + (ValueError, KeyError, TypeError)
EXIT_BAD_INPUT = 2


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with `llava_jax.chat`: the model, the template and sampling."""
    p.add_argument("--model-path", "--model_path", required=True, help="converted or HF LLaVA directory")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory to apply to the model, unmerged "
                                                "(ours, peft's, or the original LLaVA's LoRA output)")
    p.add_argument("--conv-mode", "--conv_mode", default=DEFAULT_CONV_MODE, choices=sorted(TEMPLATES))
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"], default=None, help="override the checkpoint's")
    p.add_argument("--max-context", type=int, default=None, help="longest prompt + answer (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", "--top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int, default=0)


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The model directory of `--model-path`, with the template and image settings of the flags."""
    return Pipeline.from_pretrained(
        args.model_path,
        dtype=args.dtype,
        lora=args.lora,
        conv_mode=args.conv_mode,
        image_aspect_ratio=args.image_aspect_ratio,
        max_context=args.max_context,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m llava_jax.generate", description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument("--image-file", "--image_file", action="append", default=[], help="repeat for several images")
    p.add_argument("--prompt", "--query", default=None, help="the question; <image> marks where each image goes")
    p.add_argument(
        "--max-new-tokens", "--max_new_tokens", type=int, default=None, help="default 512 (128 in batch mode)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--questions-file", "--question-file", default=None, help="model_vqa-style .jsonl")
    p.add_argument("--image-folder", default="", help="where the questions' images are")
    p.add_argument("--answers-file", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model-id", default=None, help="model_id written in answers (default: model directory name)")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.questions_file is None):
        p.error("give either --prompt (one question) or --questions-file (batch mode)")
    if args.questions_file and not args.answers_file:
        p.error("--questions-file needs --answers-file")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.questions_file else 512
    return args


def sampling_from_args(pipe: Pipeline, args: argparse.Namespace):
    """SamplingParams from the flags (plus the template's stop strings)."""
    return pipe.sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def run_single(pipe: Pipeline, args: argparse.Namespace) -> int:
    """One prompt: stream the answer to stdout, or print it as one JSON object with --json."""
    params = sampling_from_args(pipe, args)
    prompt = pipe.question(args.prompt, pipe.load_images(args.image_file), seed=args.seed)
    if args.json:
        completion = pipe.engine.generate([prompt], params)[0]
        print(json.dumps(completion_dict(completion)))
        return 0
    stream = pipe.engine.stream(prompt, params)
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --- batch mode -------------------------------------------------------------------------------


def answered_ids(path: str) -> set[str]:
    """Question ids (as JSON strings) already in an answers file; a torn last line is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):  # a run killed mid-write: drop the partial record
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "wb") as f:
            f.write(data)
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(json.dumps(json.loads(line)["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not ours to judge; the question will simply be answered again
    return done


def read_questions(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(index, record, None) per good line; (index, None, error) for a line that is not a question."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # a JSON list is accepted too
        lines = [json.dumps(r) for r in json.loads(text)]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, None, f"{path}: record {i + 1} is not valid JSON ({e})"
            continue
        if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
            yield i, None, f"{path}: record {i + 1} needs 'question_id' and a string 'text'"
            continue
        yield i, record, None


def run_batch(pipe: Pipeline, args: argparse.Namespace) -> int:
    """Answer every question not yet in the answers file; report bad ones by id and go on."""
    from tqdm import tqdm

    params = sampling_from_args(pipe, args)
    model_id = args.model_id or pipe.model_id
    done = answered_ids(args.answers_file)
    todo, bad, skipped = [], [], 0
    for index, record, error in read_questions(args.questions_file):
        if error:
            bad.append(error)
            print(f"error: {error}", file=sys.stderr)
        elif json.dumps(record["question_id"]) in done:
            skipped += 1
        else:
            todo.append((index, record))

    def prepare(item: tuple[int, dict]):
        index, record = item
        images = None
        if record.get("image"):
            images = pipe.load_images([os.path.join(args.image_folder, record["image"])])
        # Seed by position in the questions file: answers do not depend on batching or resuming.
        return pipe.question(record["text"], images, seed=args.seed + index)

    os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
    answered = 0
    with (
        open(args.answers_file, "a", encoding="utf-8") as out,
        concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool,
        tqdm(total=len(todo), unit="q", desc="answering", file=sys.stderr, dynamic_ncols=True) as bar,
    ):
        # Images of the next batches load in threads while the current batch generates.
        queue: collections.deque = collections.deque()
        upcoming = iter(todo)

        def refill():
            while len(queue) < 2 * args.batch_size:
                item = next(upcoming, None)
                if item is None:
                    return
                queue.append((item[1], pool.submit(prepare, item)))

        refill()
        batch: list[tuple[dict, Any]] = []
        while queue:
            record, future = queue.popleft()
            refill()
            try:
                batch.append((record, future.result()))
            except QUESTION_ERRORS as e:
                message = f"question {record['question_id']}: {e}"
                bad.append(message)
                bar.write(f"error: {message}", file=sys.stderr)
                bar.update(1)
            if batch and (len(batch) == args.batch_size or not queue):
                completions = pipe.engine.generate([p for _, p in batch], params, batch_size=args.batch_size)
                for (rec, _), c in zip(batch, completions):
                    answer = {
                        "question_id": rec["question_id"],
                        "prompt": rec["text"],
                        "text": c.text.strip(),
                        "answer_id": uuid.uuid4().hex,
                        "model_id": model_id,
                        "metadata": {},
                    }
                    out.write(json.dumps(answer) + "\n")
                out.flush()
                answered += len(batch)
                bar.update(len(batch))
                batch = []
    print(
        f"{answered} answered, {skipped} already in {args.answers_file}, {len(bad)} failed",
        file=sys.stderr,
    )
    return EXIT_BAD_INPUT if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    try:
        pipe = load_pipeline(args)
        return run_batch(pipe, args) if args.questions_file else run_single(pipe, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
