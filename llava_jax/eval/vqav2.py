"""VQAv2: the test-dev submission file for the EvalAI server, and VQA accuracy locally on val.

Data: COCO test2015 images, and LLaVA's question files `llava_vqav2_mscoco_test-dev2015.jsonl`
(answered) and `llava_vqav2_mscoco_test2015.jsonl` (the whole test split the server expects), from
eval.zip; for a local figure, the official val annotations (`v2_mscoco_val2014_annotations.json`,
visualqa.org) and a question file of val questions.

Submission, as LLaVA's `scripts/convert_vqav2_for_submission.py`: one `{"question_id", "answer"}`
per question of the test split, the answer EvalAI-normalised (`vqa_accuracy.normalize_answer`), ""
where there is none; answer lines that are not JSON are counted and skipped. The original's flags
(`--dir`, `--ckpt`, `--split`) derive its paths; each can also be given (`--result-file`,
`--test-file`, `--upload-file`).

Local accuracy (`--annotation-file`, val format): the mean VQA accuracy of the answers against
their 10 human answers (leave-one-out min(1, n / 3), EvalAI normalisation on both sides, as
`m4c_evaluator.TextVQAAccuracyEvaluator` computes it). The paper's figure is test-dev, from the
server only. Result: {"count", "submitted", "error_lines", "accuracy" (with annotations), ...}.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.eval.vqa_accuracy import normalize_answer, soft_scores
from llava_jax.inference.answering import read_jsonl


def read_results(path: str) -> tuple[dict[Any, str], int]:
    """{question_id: text} of an answers file, and how many lines were not JSON (as the original)."""
    results, errors = {}, 0
    with paths.open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                errors += 1
                continue
            results[record["question_id"]] = record["text"]
    return results, errors


def submission(results: dict[Any, str], test_questions: list[dict]) -> list[dict]:
    """The upload file's entries: every test question, its normalised answer or ""."""
    out = []
    for q in test_questions:
        text = results.get(q["question_id"])
        out.append({"question_id": q["question_id"], "answer": "" if text is None else normalize_answer(text)})
    return out


def local_accuracy(results: dict[Any, str], annotation_file: str) -> dict[str, Any]:
    """Mean VQA accuracy (percent) of the answered questions found in a val-format annotation file."""
    with paths.open(annotation_file) as f:
        annotations = {a["question_id"]: a for a in json.load(f)["annotations"]}
    scores, per_type = [], {}
    for qid, text in results.items():
        ann = annotations.get(qid)
        if ann is None:
            continue
        score = soft_scores([a["answer"] for a in ann["answers"]]).get(normalize_answer(text), 0.0)
        scores.append(score)
        per_type.setdefault(ann.get("answer_type", "other"), []).append(score)
    out: dict[str, Any] = {"accuracy_count": len(scores), "accuracy": 100.0 * sum(scores) / len(scores) if scores else 0.0}
    for kind, values in sorted(per_type.items()):
        out[f"accuracy/{kind}"] = 100.0 * sum(values) / len(values)
    return out


def score_files(result_file: str, test_file: str, upload_file: str | None, annotation_file: str | None = None,
                log: Log = print) -> dict[str, Any]:
    """Write the submission (when `upload_file`) and score locally (when `annotation_file`)."""
    results, errors = read_results(result_file)
    test_split = read_jsonl(test_file)
    log(f"total results: {len(results)}, total split: {len(test_split)}, error_line: {errors}")
    entries = submission(results, test_split)
    if upload_file:
        paths.makedirs(os.path.dirname(paths.absolute(upload_file)))
        with paths.open(upload_file, "w") as f:
            json.dump(entries, f)
        log(f"submission for EvalAI: {upload_file}")
    out: dict[str, Any] = {"count": len(results), "submitted": len(entries), "error_lines": errors}
    if annotation_file:
        out.update(local_accuracy(results, annotation_file))
        log(f"Accuracy (local, {out['accuracy_count']} questions): {out['accuracy']:.2f}%")
    return out


@register
class VQAv2(Benchmark):
    name = "vqav2"
    title = "VQAv2"
    metric = None  # test-dev is scored by the EvalAI server
    metric_label = "test-dev accuracy (EvalAI server)"
    paper = (78.5, 80.0)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default="./playground/data/eval/vqav2", help="the original's data folder")
        p.add_argument("--ckpt", default=None, help="the original's experiment name (answers/SPLIT/CKPT/merge.jsonl)")
        p.add_argument("--split", default="llava_vqav2_mscoco_test-dev2015")
        p.add_argument("--result-file", default=None, help="answers (default: DIR/answers/SPLIT/CKPT/merge.jsonl)")
        p.add_argument("--test-file", default=None, help="default: DIR/llava_vqav2_mscoco_test2015.jsonl")
        p.add_argument("--upload-file", default=None, help="default: DIR/answers_upload/SPLIT/CKPT.json")
        p.add_argument("--annotation-file", default=None, help="val annotations, for a local VQA accuracy")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        if not args.result_file or not args.upload_file:
            if not args.ckpt:
                raise ValueError("give --ckpt (the original's layout under --dir) or --result-file and --upload-file")
        result_file = args.result_file or os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl")
        test_file = args.test_file or os.path.join(args.dir, "llava_vqav2_mscoco_test2015.jsonl")
        upload = args.upload_file or os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")
        return score_files(result_file, test_file, upload, args.annotation_file, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl"), join(root, "vqav2", "test2015"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--result-file", answers_file, "--test-file", join(root, "vqav2", "llava_vqav2_mscoco_test2015.jsonl"),
                "--upload-file", join(out_dir, "vqav2_test-dev_upload.json")]
