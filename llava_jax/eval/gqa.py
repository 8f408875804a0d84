"""GQA (testdev-balanced): predictions for GQA's official `eval.py`, and its accuracy locally.

Data: the GQA images and `testdev_balanced_questions.json` (cs.stanford.edu/people/dorarad/gqa),
and LLaVA's question file `llava_gqa_testdev_balanced.jsonl` (eval.zip; each question with
"\\nAnswer the question using a single word or phrase.").

Scoring, as LLaVA's `scripts/convert_gqa_for_eval.py`: each answer's text loses its trailing
periods (`rstrip('.')`) and is lower-cased, and is written as `{"questionId", "prediction"}` in a
JSON list (`--dst`, the official `{tier}_predictions.json`). With `--questions` (the official
`{tier}_questions.json`), the official accuracy is computed here too: a prediction scores 1 when
it equals the question's `answer` string exactly; averaged over the questions marked `isBalanced`,
and split into binary (structural type `verify` or `logical`) and open questions. A question with
no prediction is an error in the official script; here it counts as wrong and is reported.
Result: {"count", "accuracy", "binary", "open", "missing"} (percent).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference.answering import read_jsonl


def to_prediction(text: str) -> str:
    """An answer as convert_gqa_for_eval.py writes it."""
    return text.rstrip(".").lower()


def _percent(scores: list[float]) -> float:
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def score_files(result_file: str, dst: str | None, questions_file: str | None, log: Log = print) -> dict[str, Any]:
    """Write the predictions file (when `dst`) and score against the official questions (when given)."""
    predictions = [{"questionId": r["question_id"], "prediction": to_prediction(r["text"])}
                   for r in read_jsonl(result_file)]
    if dst:
        with paths.open(dst, "w") as f:
            json.dump(predictions, f)
        log(f"predictions for GQA's eval.py: {dst}")
    result: dict[str, Any] = {"count": len(predictions)}
    if not questions_file:
        return result
    with paths.open(questions_file) as f:
        questions = json.load(f)
    by_id = {str(p["questionId"]): p["prediction"] for p in predictions}
    scores: dict[str, list[float]] = {"accuracy": [], "binary": [], "open": []}
    missing = 0
    for qid, question in questions.items():
        if qid not in by_id:
            missing += 1
        if not question.get("isBalanced", True):
            continue
        score = float(by_id.get(qid) == question["answer"])
        scores["accuracy"].append(score)
        structural = question.get("types", {}).get("structural")
        scores["binary" if structural in ("verify", "logical") else "open"].append(score)
    if missing:
        log(f"warning: {missing} questions of {questions_file} have no prediction (counted as wrong)")
    result.update(count=len(scores["accuracy"]), missing=missing, **{k: _percent(v) for k, v in scores.items()})
    log(f"Binary: {result['binary']:.2f}%")
    log(f"Open: {result['open']:.2f}%")
    log(f"Accuracy: {result['accuracy']:.2f}%")
    return result


@register
class GQA(Benchmark):
    name = "gqa"
    title = "GQA"
    metric = "accuracy"
    metric_label = "accuracy, testdev-balanced (%)"
    paper = (62.0, 63.3)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--src", "--result-file", dest="result_file", required=True, help="answers of `eval run gqa`")
        p.add_argument("--dst", default=None, help="where to write the official predictions file")
        p.add_argument("--questions", default=None, help="testdev_balanced_questions.json, for the accuracy")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.result_file, args.dst, args.questions, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "gqa", "llava_gqa_testdev_balanced.jsonl"), join(root, "gqa", "data", "images"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--src", answers_file, "--dst", join(out_dir, "gqa_testdev_balanced_predictions.json"),
                "--questions", join(root, "gqa", "data", "testdev_balanced_questions.json")]
