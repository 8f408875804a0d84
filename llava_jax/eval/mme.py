"""MME (yes/no questions, two per image): perception and cognition scores as MME's `calculation.py`.

Data: `MME_Benchmark_release_version` (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models,
Evaluation branch): one folder per task, each image with a `.txt` of its two questions and their
Yes/No answers (in `questions_answers_YN/` when the images are in `images/`), and LLaVA's question
file `llava_mme.jsonl` (eval.zip; `question_id` "<task>/<image file>", each question with
"\\nAnswer the question using a single word or phrase.").

Scoring, as LLaVA's `convert_answer_to_mme.py` (eval.zip) then MME's `eval_tool/calculation.py`:
each answer is matched to its ground truth by task, image and question, the question read back
from the answer's `prompt`: "Answer the question using a single word or phrase." removed and the
rest stripped, " Please answer yes or no." appended when absent (with two spaces where the MME file
has two). The answer is lower-cased and read as "yes"/"no" if it is exactly that, else by its
first four characters: "yes" in them is yes, else "no" in them is no ("not sure" and "none" are no),
else other (always wrong). Per task: acc = share of questions right, acc+ = share of images with
both questions right, score = 100 * acc + 100 * acc+; perception and cognition are the sums of
their tasks' scores (the paper's MME figure is perception).

Differences: the original pairs consecutive answer lines as an image's two questions and needs
all 14 tasks; here questions are grouped by image from the ground truth, which is the same for a
complete run, and a task is scored when it has answers (a missing answer of a scored task counts
as wrong; tasks without answers are listed). `--results-dir` writes the eval_tool files
(`<task>.txt`: image, question, truth, answer) that the official `calculation.py` reads.
"""

from __future__ import annotations

import argparse
import collections
import os
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference.answering import read_jsonl

EVAL_TYPES = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def read_ground_truth(data_dir: str) -> dict[tuple[str, str, str], str]:
    """(task, "<image stem>.txt", question) -> "Yes"/"No", from the MME release folder."""
    gt = {}
    for task in sorted(paths.listdir(data_dir)):
        task_dir = os.path.join(data_dir, task)
        if not paths.isdir(task_dir):
            continue
        qa_dir = task_dir
        if paths.exists(os.path.join(task_dir, "images")):
            qa_dir = os.path.join(task_dir, "questions_answers_YN")
        for name in sorted(paths.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            with paths.open(os.path.join(qa_dir, name)) as f:
                for line in f:
                    if line.strip():
                        question, answer = line.strip().split("\t")
                        gt[(task, name, question)] = answer
    return gt


def ground_truth_key(question_id: str, prompt: str, gt: dict) -> tuple[str, str, str]:
    """The ground-truth key of an answer (module docstring); KeyError if there is none."""
    task = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + YES_NO
        if (task, file, prompt) not in gt:
            prompt = prompt.replace(YES_NO, " " + YES_NO)
    key = (task, file, prompt)
    if key not in gt:
        raise KeyError(f"question {question_id!r}: no ground truth for {prompt!r} in task {task!r}, {file}")
    return key


def parse_yes_no(answer: str) -> str:
    """calculation.py's reading of a lower-cased answer: "yes", "no" or "other"."""
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def task_score(items: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    """acc, acc+ and score of a task's (image file, truth, answer or None) items."""
    by_image: dict[str, list[bool]] = collections.defaultdict(list)
    for file, truth, answer in items:
        pred = "other" if answer is None else parse_yes_no(answer.lower())
        by_image[file].append(truth.lower() == pred)
    right = [ok for oks in by_image.values() for ok in oks]
    acc = sum(right) / len(right)
    acc_plus = sum(1 for oks in by_image.values() if sum(oks) == 2) / len(by_image)
    score = 0
    score += acc * 100  # the original's order of additions: acc, then acc+
    score += acc_plus * 100
    return {"score": score, "acc": acc, "acc_plus": acc_plus, "count": len(right), "images": len(by_image)}


def write_eval_tool_files(results_dir: str, rows: dict[str, list[tuple[str, str, str, str]]]) -> None:
    """`<task>.txt` files of image, question, truth, answer lines, as convert_answer_to_mme.py writes them."""
    paths.makedirs(results_dir)
    for task, lines in rows.items():
        with paths.open(os.path.join(results_dir, f"{task}.txt"), "w") as f:
            for line in lines:
                f.write("\t".join(line) + "\n")


def score_files(data_dir: str, result_file: str, results_dir: str | None = None, log: Log = print) -> dict[str, Any]:
    """{"perception", "cognition", "tasks": {task: {score, acc, acc_plus, ...}}, "missing", "unscored_tasks"}."""
    gt = read_ground_truth(data_dir)
    answered: dict[tuple[str, str, str], str] = {}
    rows: dict[str, list] = collections.defaultdict(list)
    for a in read_jsonl(result_file):
        key = ground_truth_key(str(a["question_id"]), a["prompt"], gt)
        answered[key] = a["text"]
        rows[key[0]].append((key[1], key[2], gt[key], a["text"]))
    if results_dir:
        write_eval_tool_files(results_dir, rows)
    tasks_answered = {key[0] for key in answered}
    out: dict[str, Any] = {"tasks": {}, "missing": 0, "unscored_tasks": []}
    for eval_type, names in EVAL_TYPES.items():
        log(f"=========== {eval_type} ===========")
        total = 0
        scores = {}
        for task in names:
            if task not in tasks_answered:
                out["unscored_tasks"].append(task)
                continue
            items = [(key[1], truth, answered.get(key)) for key, truth in gt.items() if key[0] == task]
            out["missing"] += sum(1 for *_, answer in items if answer is None)
            m = task_score(items)
            out["tasks"][task] = m
            scores[task] = m["score"]
            total += m["score"]
        log(f"total score: {total} \n")
        for task, value in scores.items():
            log(f"\t {task}  score: {value}")
        log("\n")
        out[eval_type.lower()] = total
    if out["unscored_tasks"]:
        log(f"warning: no answers for {', '.join(out['unscored_tasks'])}: not scored")
    if out["missing"]:
        log(f"warning: {out['missing']} questions of the scored tasks have no answer (counted as wrong)")
    return out


@register
class MME(Benchmark):
    name = "mme"
    title = "MME"
    metric = "perception"
    metric_label = "perception score (of 2000)"
    paper = (1510.7, 1531.3)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", required=True, help="MME_Benchmark_release_version (the ground truth)")
        p.add_argument("--result-file", required=True, help="answers of `eval run mme`")
        p.add_argument("--results-dir", default=None, help="also write the eval_tool <task>.txt files here")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.data_dir, args.result_file, args.results_dir, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "MME", "llava_mme.jsonl"), join(root, "MME", "MME_Benchmark_release_version"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--data-dir", self.layout(root).image_folder, "--result-file", answers_file,
                "--results-dir", os.path.join(out_dir, "mme_eval_tool")]

