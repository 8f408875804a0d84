"""Answering and scoring one benchmark: what `eval run`, `eval score`, `eval suite` and the training
loop's end-of-stage evaluation share.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Log
from llava_jax.inference import answering

if TYPE_CHECKING:
    from llava_jax.inference.pipeline import Pipeline


def run_flags_parser(bench: Benchmark) -> argparse.ArgumentParser:
    """A parser of the benchmark's own `eval run` flags (a parent parser: no help, no required flags)."""
    p = argparse.ArgumentParser(add_help=False)
    bench.add_run_flags(p)
    return p


def add_score_flags(bench: Benchmark, p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's `eval score` flags (the original scorer's) and --output-json, added to `p`."""
    bench.add_score_flags(p)
    p.add_argument("--output-json", default=None, help="write the result here as JSON")
    return p


def module_summary(bench: Benchmark) -> str:
    """The first line of the benchmark module's docstring."""
    return (sys.modules[type(bench).__module__].__doc__ or "").split("\n")[0]


def run_benchmark(
    bench: Benchmark,
    pipe: "Pipeline",
    question_file: str,
    image_folder: str,
    answers_file: str,
    options: argparse.Namespace | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    strict: bool = False,
    num_chunks: int = 1,
    chunk_idx: int = 0,
    model_id: str | None = None,
    progress: bool = True,
    on_error=None,
) -> answering.AnswerReport:
    """Answer a benchmark's questions greedily, with its prompt convention, into `answers_file`.

    `options` holds the benchmark's own run flags (default: their defaults). Resumable; questions
    that cannot be asked are reported by id (fatal with `strict`); see `answering.answer_questions`.
    Any of the paths may be `gs://`.
    """
    if options is None:
        options = run_flags_parser(bench).parse_args([])
    questions = bench.questions(question_file, options)
    if num_chunks > 1:
        questions = answering.chunk(questions, num_chunks, chunk_idx)
    params = answering.greedy(max_new_tokens or bench.max_new_tokens)
    with local_answers_file(answers_file) as local:
        return answering.answer_questions(
            pipe, questions, local, params, image_folder=image_folder, batch_size=batch_size, strict=strict,
            model_id=model_id, progress=progress, on_error=on_error,
        )


@contextlib.contextmanager
def local_answers_file(answers_file: str) -> Iterator[str]:
    """`answers_file` itself if local; for a `gs://` one, a local copy that goes back to GCS at the end.

    Answers are appended line by line so that a killed run resumes, and GCS has no append: the
    local copy starts from the answers already on GCS and is uploaded whole when answering ends,
    also when it ends in an error, so that what was answered is kept.
    """
    if not paths.is_remote(answers_file):
        yield answers_file
        return
    tmp_dir = tempfile.mkdtemp(prefix="llava_jax_answers_")
    local = os.path.join(tmp_dir, os.path.basename(answers_file))
    try:
        if paths.exists(answers_file):
            paths.copy(answers_file, local)
        yield local
    finally:
        if os.path.exists(local):
            paths.copy(local, answers_file)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def score_benchmark(bench: Benchmark, argv: list[str], log: Log = print) -> dict[str, Any]:
    """Score with `eval score` flags given as a list (what the suite and the training loop use)."""
    args = add_score_flags(bench, argparse.ArgumentParser(prog=f"eval score {bench.name}")).parse_args(argv)
    return bench.score(args, log)


def quiet_log() -> tuple[Log, io.StringIO]:
    """A log that collects the scorer's printout instead of printing it."""
    buffer = io.StringIO()
    return (lambda line: buffer.write(line + "\n")), buffer
