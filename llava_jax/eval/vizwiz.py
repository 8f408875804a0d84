"""VizWiz (test-dev): the submission file for the EvalAI server, as LLaVA's
`scripts/convert_vizwiz_for_submission.py` writes it.

Data: the VizWiz test images (`test/`) and LLaVA's question file `vizwiz/llava_test.jsonl`
(eval.zip; each question with "\\nWhen the provided information is insufficient, respond with
'Unanswerable'.\\nAnswer the question using a single word or phrase.").

Submission: one `{"image", "answer"}` per question of the question file, the answer EvalAI-
normalised (`vqa_accuracy.normalize_answer`); answer lines that are not JSON are counted and
skipped. The original asserts that every question has an answer; here a missing one is written as
"" and counted. Result: {"count", "submitted", "error_lines", "missing"}; the accuracy comes from the
server only.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.eval.vqa_accuracy import normalize_answer
from llava_jax.eval.vqav2 import read_results
from llava_jax.inference.answering import read_jsonl


def score_files(annotation_file: str, result_file: str, upload_file: str, log: Log = print) -> dict[str, Any]:
    """Write the submission; {"count", "submitted", "error_lines", "missing"}."""
    results, errors = read_results(result_file)
    test_split = read_jsonl(annotation_file)
    log(f"total results: {len(results)}, total split: {len(test_split)}, error_line: {errors}")
    entries, missing = [], 0
    for q in test_split:
        text = results.get(q["question_id"])
        missing += text is None
        entries.append({"image": q["image"], "answer": "" if text is None else normalize_answer(text)})
    if missing:
        log(f"warning: {missing} questions have no answer (submitted as '')")
    paths.makedirs(os.path.dirname(paths.absolute(upload_file)))
    with paths.open(upload_file, "w") as f:
        json.dump(entries, f)
    return {"count": len(results), "submitted": len(entries), "error_lines": errors, "missing": missing}


@register
class VizWiz(Benchmark):
    name = "vizwiz"
    title = "VizWiz"
    metric = None  # test-dev is scored by the EvalAI server
    metric_label = "test-dev accuracy (EvalAI server)"
    paper = (50.0, 53.6)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--annotation-file", required=True, help="the question file, llava_test.jsonl")
        p.add_argument("--result-file", required=True, help="answers of `eval run vizwiz`")
        p.add_argument("--result-upload-file", required=True, help="where to write the submission")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.annotation_file, args.result_file, args.result_upload_file, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "vizwiz", "llava_test.jsonl"), join(root, "vizwiz", "test"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--annotation-file", self.layout(root).question_file, "--result-file", answers_file,
                "--result-upload-file", join(out_dir, "vizwiz_upload.json")]
