"""What a benchmark is here, and the registry of them by name.

A benchmark is one small module with one `Benchmark` subclass, decorated with `@register`: it knows
its prompt convention (`questions`: a question file -> the prompts the model answers, in the
original's answer format), how its answers are scored (`add_score_flags` + `score`: the original
scorer's flags, printout and numbers), and where its files sit in the original's
`playground/data/eval` layout (`layout`, `suite_score_argv`), so that `eval suite` can run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any, ClassVar

from llava_jax.inference import answering

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where `eval run` finds a benchmark's questions and images under a data root."""

    question_file: str
    image_folder: str


class Benchmark:
    """Base class; subclasses set the class attributes and implement `add_score_flags` and `score`.

    Attributes:
      name: registry key (`python -m llava_jax.eval run NAME`).
      title: the name papers use.
      max_new_tokens: the original's generation budget (128 in `model_vqa_loader`, 1024 in
        `model_vqa_science` and `model_vqa_mmbench`).
      metric: the key of the headline figure in `score`'s result (None: scored by a server).
      metric_label: what that figure is, for results tables.
      paper: LLaVA-1.5 7B and 13B on this benchmark, as published (None: not in the paper).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 128
    metric: ClassVar[str | None] = None
    metric_label: ClassVar[str] = ""
    paper: ClassVar[tuple[float, float] | None] = None

    # -- answering ------------------------------------------------------------------------------

    def add_run_flags(self, p: argparse.ArgumentParser) -> None:
        """Flags of `eval run NAME` beyond the common ones (the original answering script's)."""

    def questions(self, question_file: str, args: argparse.Namespace) -> list[answering.Question]:
        """The questions of a file, as the model sees them; default: a `model_vqa_loader` question file."""
        return vqa_loader_questions(question_file)

    # -- scoring --------------------------------------------------------------------------------

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        """The original scorer's flags."""
        raise NotImplementedError

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        """Score from files; `log` gets the lines the original prints. Returns the JSON result."""
        raise NotImplementedError

    def headline(self, result: dict[str, Any]) -> float | None:
        """The figure the paper reports, from `score`'s result."""
        return None if self.metric is None else result.get(self.metric)

    # -- the suite ------------------------------------------------------------------------------

    def layout(self, root: str) -> Layout:
        """Question file and image folder under a data root (the original's playground/data/eval)."""
        raise NotImplementedError

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        """`eval score NAME` flags that score `answers_file` against the data under `root`."""
        raise NotImplementedError


BENCHMARKS: dict[str, Benchmark] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make a benchmark available by its name."""
    if cls.name in BENCHMARKS:
        raise ValueError(f"benchmark {cls.name!r} is registered twice")
    BENCHMARKS[cls.name] = cls()
    return cls


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name`; the error lists the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}") from None


def vqa_loader_questions(question_file: str) -> list[answering.Question]:
    """A `model_vqa_loader` question file: `<image>\\n` + the record's text; `prompt` is the text.

    Every LLaVA-1.5 short-answer benchmark file (`llava_pope_test.jsonl`,
    `llava_textvqa_val_v051_ocr.jsonl`, `llava_gqa_testdev_balanced.jsonl`, `llava_mme.jsonl`, ...)
    already carries its answer-format suffix in `text`. A line that is not a question raises
    ValueError naming the file and record.
    """
    out = []
    for _, record, error in answering.read_vqa_questions(question_file):
        if error:
            raise ValueError(error)
        image = record.get("image")
        images = [image] if image else []
        text = "<image>\n" * len(images) + record["text"]
        out.append(answering.Question(text, images, answering.answer_line(record["question_id"], record["text"])))
    return out


def join(root: str, *parts: str) -> str:
    """A path under the data root."""
    return os.path.join(root, *parts)
