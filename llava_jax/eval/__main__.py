"""Evaluate a LLaVA on the LLaVA-1.5 benchmarks: answer with the batched engine, score as the original.

    python -m llava_jax.eval run BENCHMARK --model-path M --question-file Q --image-folder I \\
        --answers-file A [--conv-mode vicuna_v1] [--batch-size N]
    python -m llava_jax.eval score BENCHMARK <the original scorer's flags> [--output-json OUT]
    python -m llava_jax.eval suite --model-path M --data-root D --benchmarks pope,scienceqa,...

`run` answers greedily with the benchmark's prompt convention and writes the original's answer
lines (resumable; a question whose image is missing or bad is reported by id and skipped, fatal
with --strict). `score` takes the original script's flags and prints what it prints.
`python -m llava_jax.eval score BENCHMARK --help` lists a benchmark's flags. Exit status 2 on a
user error (a missing file, a bad record), with one line saying which.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llava_jax import cli, paths
from llava_jax.eval import BENCHMARKS, get_benchmark
from llava_jax.eval.harness import add_score_flags, module_summary, run_benchmark, run_flags_parser
from llava_jax.inference.answering import QuestionError
from llava_jax.inference.flags import EXIT_BAD_INPUT, USER_ERRORS, add_model_flags, load_pipeline

PROG = "python -m llava_jax.eval"


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--question-file", "--questions-file", required=True)
    p.add_argument("--image-folder", default="", help="where the questions' images are (they may not leave it)")
    p.add_argument("--answers-file", required=True, help="jsonl to append answers to (resumable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None,
                   help="default: the original's for the benchmark")
    p.add_argument("--strict", action="store_true", help="stop at the first question that cannot be asked")
    p.add_argument("--num-chunks", type=int, default=1, help="answer chunk --chunk-idx of this many (as the original)")
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--model-id", default=None, help="model_id written in answers (default: model directory name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    names = sorted(BENCHMARKS)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=f"benchmarks: {', '.join(names)}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a benchmark's questions")
    run_sub = run.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in names:
        bench = BENCHMARKS[name]
        q = run_sub.add_parser(name, parents=[run_flags_parser(bench)], help=bench.title,
                               description=module_summary(bench), prog=f"{PROG} run {name}")
        _add_run_flags(q)

    score = sub.add_parser("score", help="score answers with the original's rules")
    score_sub = score.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in names:
        bench = BENCHMARKS[name]
        add_score_flags(bench, score_sub.add_parser(name, help=bench.title, description=module_summary(bench),
                                                    prog=f"{PROG} score {name}"))

    suite = sub.add_parser("suite", help="run and score several benchmarks; results.md and results.json")
    add_model_flags(suite)
    suite.add_argument("--data-root", required=True, help="the original's playground/data/eval folder")
    suite.add_argument("--benchmarks", required=True, help=f"comma-separated: {','.join(names)}")
    suite.add_argument("--output-dir", default=None, help="default: eval/<model directory name>")
    suite.add_argument("--batch-size", type=int, default=16)
    suite.add_argument("--strict", action="store_true")
    suite.add_argument("--model-id", default=None)
    suite.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        p.error("--batch-size must be >= 1")
    return args


def _run(args: argparse.Namespace) -> int:
    bench = get_benchmark(args.benchmark)
    pipe = load_pipeline(args)
    report = run_benchmark(
        bench, pipe, args.question_file, args.image_folder, args.answers_file, args,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, strict=args.strict,
        num_chunks=args.num_chunks, chunk_idx=args.chunk_idx, model_id=args.model_id, progress=not args.no_progress,
    )
    print(report.summary(args.answers_file), file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    bench = get_benchmark(args.benchmark)
    result = bench.score(args)
    if args.output_json:
        paths.makedirs(os.path.dirname(paths.absolute(args.output_json)))
        paths.write_text(args.output_json, json.dumps(result, indent=1))
    return 0


def _suite(args: argparse.Namespace) -> int:
    from llava_jax.eval.suite import results_table, run_suite

    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    for name in names:
        get_benchmark(name)
    pipe = load_pipeline(args)
    output_dir = args.output_dir or os.path.join("eval", pipe.model_id)
    rows = run_suite(pipe, args.data_root, names, output_dir, batch_size=args.batch_size, strict=args.strict,
                     progress=not args.no_progress, model_id=args.model_id)
    print(results_table(rows), end="")
    print(f"results: {os.path.join(output_dir, 'results.md')}, {os.path.join(output_dir, 'results.json')}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return {"run": _run, "score": _score, "suite": _suite}[args.command](args)
    except KeyError as e:  # ours carry a sentence; a bare key is a record without that field
        what = e.args[0] if e.args else e
        message = what if isinstance(what, str) and " " in what else f"a record has no field {what!r}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # an OSError, but not bad input: the reader of stdout left (cli.exit_with)
        raise
    except (QuestionError, ValueError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    cli.exit_with(main)
