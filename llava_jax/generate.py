"""Ask a LLaVA about images, one prompt or a whole questions file.

    python -m llava_jax.generate --model-path DIR --image-file cat.jpg --prompt "What is this?"
    python -m llava_jax.generate --model-path DIR --image-file a.jpg --image-file b.jpg \\
        --prompt "<image> or <image>: which is brighter?" --temperature 0 --json
    python -m llava_jax.generate --model-path DIR --video-file clip.mp4 --prompt "<video>\\nWhat happens?" \\
        --num-frames 16
    python -m llava_jax.generate --model-path DIR --questions-file q.jsonl --image-folder imgs/ \\
        --answers-file a.jsonl --batch-size 16

Flags follow the original LLaVA scripts (`run_llava`, `model_vqa`); their underscore spellings
(`--top_p`, `--max_new_tokens`, `--question-file`, `--query`) are accepted too. The questions
file is `model_vqa`'s: one JSON object a line with `question_id`, `text` and (optionally) `image`;
each answer line holds `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`.
Batch runs are resumable: questions already answered in the answers file are skipped.

Bad input (a missing or unreadable image, an image path leaving --image-folder, a prompt longer
than the context, more `<image>` markers than images) prints one line and exits with status 2; in
batch mode the question is reported by id, the others are answered, and the exit status is 2 at
the end. Batch answering is `llava_jax.inference.answering`, shared with `python -m llava_jax.eval`.
"""

from __future__ import annotations

import argparse
import json
import sys

from llava_jax import cli
from llava_jax.inference import answering
from llava_jax.inference.engine import completion_dict
from llava_jax.inference.flags import (
    EXIT_BAD_INPUT,
    USER_ERRORS,
    add_model_flags,
    add_sampling_flags,
    load_pipeline,
    sampling_from_args,
)
from llava_jax.inference.pipeline import Pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m llava_jax.generate", description=__doc__.split("\n")[0])
    add_model_flags(p)
    add_sampling_flags(p)
    p.add_argument("--image-file", "--image_file", action="append", default=[], help="repeat for several images")
    p.add_argument("--video-file", "--video_file", action="append", default=[],
                   help="a video (OneVision, NeXT-Video; repeat for several); <video> marks where each goes")
    p.add_argument("--prompt", "--query", default=None,
                   help="the question; <image> marks where each image goes, <video> each video")
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


def run_single(pipe: Pipeline, args: argparse.Namespace) -> int:
    """One prompt: stream the answer to stdout, or print it as one JSON object with --json."""
    params = sampling_from_args(pipe, args)
    prompt = pipe.question(args.prompt, pipe.load_images(args.image_file), seed=args.seed,
                           videos=pipe.load_videos(args.video_file, args.num_frames))
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


def run_batch(pipe: Pipeline, args: argparse.Namespace) -> int:
    """Answer every question not yet in the answers file; report bad ones by id and go on (status 2)."""
    questions, bad = [], []
    for index, record, error in answering.read_vqa_questions(args.questions_file):
        if error:
            bad.append(error)
            print(f"error: {error}", file=sys.stderr)
            continue
        images = [record["image"]] if record.get("image") else []
        line = answering.answer_line(record["question_id"], record["text"])
        # Seeded by position in the file: answers do not depend on batching or resuming.
        questions.append(answering.Question(record["text"], images, line, seed=args.seed + index))
    report = answering.answer_questions(
        pipe, questions, args.answers_file, sampling_from_args(pipe, args), image_folder=args.image_folder,
        batch_size=args.batch_size, model_id=args.model_id,
    )
    report.failed = bad + report.failed
    print(report.summary(args.answers_file), file=sys.stderr)
    return EXIT_BAD_INPUT if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    try:
        pipe = load_pipeline(args)
        return run_batch(pipe, args) if args.questions_file else run_single(pipe, args)
    except BrokenPipeError:  # an OSError, but not bad input: the reader of stdout left (cli.exit_with)
        raise
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    cli.exit_with(main)
