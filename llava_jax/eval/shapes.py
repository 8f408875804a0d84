"""The synthetic shapes data as a VQA-style benchmark: the embedded default's end-of-run evaluation.

Data: `val.json` and `images/` of a synthetic build (`llava_jax.data.synthetic.build`; the default
run writes them to WORKDIR/data): held-out images, one question a record (colour, shape, count or
position) with its one-word `answer` and `qtype`.

Prompt: the record's question as the model was trained on it (`<image>` in front, no suffix),
`question_id` the record id, greedy, 16 new tokens at most. Scoring (`synthetic.score`): exact
match after lower-casing, dropping punctuation and writing number words as digits, overall and per
question type; a question with no answer counts as wrong. Result: {"accuracy", "accuracy/<qtype>",
"n", "n/<qtype>", "answered"}, accuracies as fractions.

Unlike the training loop's teacher-forced `eval/accuracy`, this generates the answers, as every
other benchmark here does: the two agree on questions whose answer is exactly the trained text.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from llava_jax import paths
from llava_jax.data import synthetic
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference import answering


def _records(question_file: str) -> list[dict]:
    return json.loads(paths.read_text(question_file))


@register
class Shapes(Benchmark):
    name = "shapes"
    title = "synthetic shapes"
    max_new_tokens = 16
    metric = "accuracy"
    metric_label = "exact match, held-out (%)"

    def questions(self, question_file: str, args: argparse.Namespace) -> list[answering.Question]:
        out = []
        for record in _records(question_file):
            text = record["conversations"][0]["value"]
            images = [record["image"]] if record.get("image") else []
            prompt = text.replace("<image>", "").strip()
            out.append(answering.Question(text, images, answering.answer_line(record["id"], prompt)))
        return out

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--question-file", required=True, help="the synthetic build's val.json")
        p.add_argument("--result-file", required=True, help="answers of `eval run shapes`")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        records = _records(args.question_file)
        answers = {a["question_id"]: a["text"] for a in answering.read_jsonl(args.result_file)}
        result = synthetic.score(records, answers)
        result["answered"] = sum(1 for r in records if r["id"] in answers)
        per_type = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in result.items() if k.startswith("accuracy/"))
        log(f"Accuracy: {result['accuracy']:.4f} of {result['n']} questions ({per_type})")
        return result

    def headline(self, result: dict[str, Any]) -> float | None:
        return 100.0 * result["accuracy"]

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "val.json"), join(root, "images"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--question-file", self.layout(root).question_file, "--result-file", answers_file]
