"""TextVQA (val), scored as LLaVA's `llava/eval/eval_textvqa.py` (+ `m4c_evaluator.py`).

Data: `TextVQA_0.5.1_val.json` and the train_val images (textvqa.org), and LLaVA's question file
`llava_textvqa_val_v051_ocr.jsonl` (eval.zip). Its prompts carry the OCR tokens:
"{question}\\nReference OCR token: {tokens}\\nAnswer the question using a single word or phrase.",
and its `question_id` is the image id.

Scoring: each answer is matched to its annotation by (image id, question), the question read back
from the answer's `prompt` as the original reads it (the part before "Short answer:" after
"Question: " for an "OCR tokens: " prompt; the non-OCR line of a three-line prompt with a
"Reference OCR token: " line; the first line of a two-line prompt; other prompts are an error),
lower-cased. The answer then scores its VQA accuracy against the annotation's 10 answers after
EvalAI normalisation (`vqa_accuracy`). Result: {"count", "accuracy"} (percent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.eval.vqa_accuracy import normalize_answer, soft_scores
from llava_jax.inference.answering import read_jsonl

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_of_prompt(prompt: str) -> str:
    """The question inside a TextVQA prompt, lower-cased (the original's `prompt_processor`)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"cannot find the question in prompt {prompt!r} (the original asserts here)")
    return question.lower()


def score_files(annotation_file: str, result_file: str, log: Log = print) -> dict[str, Any]:
    """{"count", "accuracy"} (percent) of the answers in `result_file`."""
    log(os.path.splitext(os.path.basename(result_file))[0])
    with paths.open(annotation_file) as f:
        annotations = {(a["image_id"], a["question"].lower()): a for a in json.load(f)["data"]}
    scores = []
    for result in read_jsonl(result_file):
        key = (result["question_id"], question_of_prompt(result["prompt"]))
        if key not in annotations:
            raise ValueError(f"{result_file}: no annotation in {annotation_file} for image {key[0]!r}, question {key[1]!r}")
        gt = annotations[key]["answers"]
        if len(gt) != 10:
            raise ValueError(f"{annotation_file}: question {key[1]!r} has {len(gt)} answers; TextVQA has 10")
        scores.append(soft_scores(gt).get(normalize_answer(result["text"]), 0.0))
    accuracy = 100.0 * (sum(scores) / len(scores)) if scores else 0.0
    log("Samples: {}\nAccuracy: {:.2f}%\n".format(len(scores), accuracy))
    return {"count": len(scores), "accuracy": accuracy}


@register
class TextVQA(Benchmark):
    name = "textvqa"
    title = "TextVQA"
    metric = "accuracy"
    metric_label = "VQA accuracy, val (%)"
    paper = (58.2, 61.3)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
        p.add_argument("--result-file", required=True, help="answers of `eval run textvqa`")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.annotation_file, args.result_file, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "textvqa", "llava_textvqa_val_v051_ocr.jsonl"), join(root, "textvqa", "train_images"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--annotation-file", join(root, "textvqa", "TextVQA_0.5.1_val.json"), "--result-file", answers_file]
