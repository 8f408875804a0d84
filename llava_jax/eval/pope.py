"""POPE (object hallucination, yes/no), scored as LLaVA's `llava/eval/eval_pope.py`.

Data: the COCO split of POPE (github.com/AoiDragon/POPE, `output/coco`: `coco_pope_adversarial.json`,
`coco_pope_popular.json`, `coco_pope_random.json`, one question a line with its `label`), the
COCO val2014 images, and LLaVA's question file `llava_pope_test.jsonl` (from its eval.zip: each
question with "\\nAnswer the question using a single word or phrase." and its `category`).

Answer parsing (`parse_yes_no`), the original's quirks included: only the text before the first
"." counts; commas are dropped; the rest is split on single spaces, and the answer is "no" when one
of the words is exactly "No", "no" or "not", else "yes". So "NO" is "yes", "no\\nthere is none" is
"yes", "There is no dog." is "no", and an empty answer is "yes".

Metrics per category, "yes" as the positive class: accuracy, precision, recall, F1 and the share
of "yes" answers (fractions), printed as the original prints them. The paper's POPE figure is F1
averaged over the three categories, in percent.

Pairing answers with labels: the original takes a category's answers in answers-file order and
pairs the k-th with the k-th line of `coco_pope_<category>.json`. We pair the k-th question of the
category in the question file with the k-th label: the same pairs when every question is answered,
in order (as `eval run` writes them), and still the right pairs when some answers are missing,
where the original's shift. A missing answer is left out of the counts (the original would count
the shifted pairs); where the original divides by zero (no answers, no "yes"), we report 0.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference.answering import read_jsonl

PREFIX, SUFFIX = "coco_pope_", ".json"


def parse_yes_no(text: str) -> str:
    """The original's reading of an answer: "yes" or "no" (see the module docstring)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def category_metrics(predictions: list[str], labels: list[str]) -> dict[str, Any]:
    """Confusion counts and metrics of parsed predictions against labels ("no" is negative)."""
    pred = [0 if p == "no" else 1 for p in predictions]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    tn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    precision = _div(float(tp), float(tp + fp))
    recall = _div(float(tp), float(tp + fn))
    return {
        "count": len(pred), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(pred.count(1), len(pred)),
    }


def score_files(annotation_dir: str, question_file: str, result_file: str, log: Log = print) -> dict[str, Any]:
    """{category: {count, accuracy, precision, recall, f1, yes_ratio}}, one per coco_pope_*.json."""
    questions = read_jsonl(question_file)
    by_id = {json.dumps(q["question_id"]): q for q in questions}
    answers = {}
    for a in read_jsonl(result_file):
        key = json.dumps(a["question_id"])
        if key not in by_id:
            raise ValueError(f"{result_file}: answer to question {key}, which {question_file} does not have")
        answers[key] = a["text"]
    out: dict[str, Any] = {}
    names = sorted(f for f in paths.listdir(annotation_dir) if f.startswith(PREFIX) and f.endswith(SUFFIX))
    if not names:
        raise FileNotFoundError(f"no {PREFIX}<category>{SUFFIX} files in {annotation_dir}")
    for name in names:
        category = name[len(PREFIX) : -len(SUFFIX)]
        labels = [r["label"] for r in read_jsonl(os.path.join(annotation_dir, name))]
        ids = [json.dumps(q["question_id"]) for q in questions if q.get("category") == category]
        pairs = [(parse_yes_no(answers[k]), label) for k, label in zip(ids, labels) if k in answers]
        m = category_metrics([p for p, _ in pairs], [label for _, label in pairs])
        log(f"Category: {category}, # samples: {m['count']}")
        log("TP\tFP\tTN\tFN\t")
        log(f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}")
        for label, key in (("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"),
                           ("F1 score", "f1"), ("Yes ratio", "yes_ratio")):
            log(f"{label}: {m[key]}")
        log("%.3f, %.3f, %.3f, %.3f, %.3f" % (m["f1"], m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]))
        log("====================================")
        out[category] = {k: m[k] for k in ("count", "accuracy", "precision", "recall", "f1", "yes_ratio")}
    return out


@register
class Pope(Benchmark):
    name = "pope"
    title = "POPE"
    # The result has no top-level figure, one entry per category: `metric` is each category's key, and
    # `headline` averages it over the categories.
    metric = "f1"
    metric_label = "F1, mean of the categories (%)"
    paper = (85.9, 85.9)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json")
        p.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
        p.add_argument("--result-file", required=True, help="answers of `eval run pope`")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.annotation_dir, args.question_file, args.result_file, log)

    def headline(self, result: dict[str, Any]) -> float | None:
        """The paper's POPE figure: the categories' F1, averaged, in percent (None when nothing was scored)."""
        f1 = [m[self.metric] for m in result.values()]
        return 100 * sum(f1) / len(f1) if f1 else None

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "pope", "llava_pope_test.jsonl"), join(root, "pope", "val2014"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--annotation-dir", join(root, "pope", "coco"), "--question-file", self.layout(root).question_file,
                "--result-file", answers_file]
