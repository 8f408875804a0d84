"""SEED-Bench: accuracy per question type and the upload file, as LLaVA's
`scripts/convert_seed_for_submission.py`.

Data: `SEED-Bench.json` and the images (`SEED-Bench-image/`) from github.com/AILab-CVC/SEED-Bench,
the middle frame of each video (`SEED-Bench-video-image/`, LLaVA's `extract_video_frames.py`), and
LLaVA's question file `seed_bench/llava-seed-bench.jsonl` (eval.zip; options "A. ...", then
"Answer with the option's letter from the given choices directly.").

Scoring, as the original: an answer is right when its text equals the question's answer letter
exactly ("A", not "A." or "a"); a question with no answer is wrong. Accuracy per question type
(printed by type id order), overall, and over image and video questions; the paper's SEED figure
is the image accuracy. The upload file (`--result-upload-file`) has one `{"question_id",
"prediction"}` line per question (the original stops at a question without an answer; here its
prediction is ""). Result: {"accuracy", "image_accuracy", "video_accuracy", "per_type", "count",
"missing"} (percent).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference.answering import read_jsonl


def _qid(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _accuracy(data: dict, results: dict, only: str | None, log: Log) -> tuple[float, dict[str, float]]:
    """The original's eval_single: (total accuracy, {type name: accuracy}) in percent."""
    names = {i: n for n, i in data["question_type"].items()}
    counts: dict[int, int] = {}
    correct: dict[int, int] = {}
    for q in data["questions"]:
        if only is not None and q["data_type"] != only:
            continue
        kind = q["question_type_id"]
        counts[kind] = counts.get(kind, 0) + 1
        row = results.get(_qid(q["question_id"]))
        correct[kind] = correct.get(kind, 0) + (row is not None and row["text"] == q["answer"])
    per_type = {}
    total_count = total_correct = 0
    for kind in sorted(counts):
        per_type[names[kind]] = correct[kind] / counts[kind] * 100
        if only is None:
            log(f"{names[kind]}: {per_type[names[kind]]:.2f}%")
        total_count += counts[kind]
        total_correct += correct[kind]
    total = total_correct / total_count * 100 if total_count else 0.0
    log(f"Total accuracy: {total:.2f}%" if only is None else f"{only} accuracy: {total:.2f}%")
    return total, per_type


def score_files(annotation_file: str, result_file: str, upload_file: str | None, log: Log = print) -> dict[str, Any]:
    """Per-type, overall, image and video accuracy; the upload file when asked."""
    with paths.open(annotation_file) as f:
        data = json.load(f)
    results = {row["question_id"]: row for row in read_jsonl(result_file)}
    total, per_type = _accuracy(data, results, None, log)
    image, _ = _accuracy(data, results, "image", log)
    video, _ = _accuracy(data, results, "video", log)
    missing = 0
    if upload_file:
        paths.makedirs(os.path.dirname(paths.absolute(upload_file)))
        with paths.open(upload_file, "w") as fp:
            for q in data["questions"]:
                row = results.get(q["question_id"], results.get(_qid(q["question_id"])))
                missing += row is None
                fp.write(json.dumps({"question_id": q["question_id"], "prediction": "" if row is None else row["text"]})
                         + "\n")
    return {"accuracy": total, "image_accuracy": image, "video_accuracy": video, "per_type": per_type,
            "count": len(data["questions"]), "missing": missing}


@register
class SEED(Benchmark):
    name = "seed"
    title = "SEED-Bench"
    metric = "image_accuracy"
    metric_label = "accuracy, image questions (%)"
    paper = (58.6, 61.6)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--annotation-file", required=True, help="SEED-Bench.json")
        p.add_argument("--result-file", required=True, help="answers of `eval run seed`")
        p.add_argument("--result-upload-file", default=None, help="where to write the upload file")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.annotation_file, args.result_file, args.result_upload_file, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "seed_bench", "llava-seed-bench.jsonl"), join(root, "seed_bench"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--annotation-file", join(root, "seed_bench", "SEED-Bench.json"), "--result-file", answers_file,
                "--result-upload-file", join(out_dir, "seed_upload.jsonl")]
