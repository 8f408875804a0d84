"""ScienceQA, prompted as LLaVA's `model_vqa_science.py` and scored as `llava/eval/eval_science_qa.py`.

Data: `problems.json`, `pid_splits.json` and `images/` from github.com/lupantech/ScienceQA
(`data/scienceqa`), and LLaVA's `llava_test_CQM-A.json` (eval.zip), which
`scripts/convert_sqa_to_llava.py convert_to_llava --split test --prompt-format CQM-A` writes. `eval
run scienceqa` takes either: given `problems.json` it builds the CQM-A questions of `--split` itself,
exactly as that script does ("Context: {hint or N/A}\\nQuestion: {question}\\nOptions: (A) x (B) y",
double spaces collapsed once, stripped; image problems end with "\\n<image>" and their image is
`<pid>/<image>`).

Prompt (model_vqa_science): the question with `<image>` removed and stripped; for an image problem
"<image>\\n" in front; with `--single-pred-prompt` (the LLaVA-1.5 setting, on by default here)
"\\nAnswer with the option's letter from the given choices directly." after it. The answer's
`prompt` is the same text ("<image>\\n" included), and `question_id` is the problem id. Up to 1024
new tokens.

Answer parsing, as the original: the text itself if it is one of the option letters A-E; its first
character if the text starts with "<letter>. "; else the letter of "The answer is X." when that
pattern occurs exactly once (the "." matches any character); otherwise FAILED. A letter beyond the
problem's choices, FAILED, and a problem with no answer at all count as wrong. `img_accuracy`
counts problems whose answer prompt holds "<image>", so a missing answer to an image problem counts
as a wrong non-image one, as in the original (its placeholder prompt is "Unknown").

Result (`--output-json`): {"count", "correct", "accuracy", "img_accuracy"}, accuracies in percent;
`--output-file` and `--output-result` write the original's two files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference import answering

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
OPTIONS = ["A", "B", "C", "D", "E"]
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")


# --- questions ------------------------------------------------------------------------------------


def cqm_a_records(base_dir: str, split: str, options: list[str] = OPTIONS) -> list[dict]:
    """`llava_<split>_CQM-A.json` records built from problems.json and pid_splits.json (module docstring)."""
    with paths.open(os.path.join(base_dir, "pid_splits.json")) as f:
        pids = json.load(f)[split]
    with paths.open(os.path.join(base_dir, "problems.json")) as f:
        problems = json.load(f)
    records = []
    for pid in pids:
        prob = problems[pid]
        context = " ".join([prob["hint"], ""]).strip() or "N/A"
        choices = " ".join(f"({options[i]}) {c}" for i, c in enumerate(prob["choices"]))
        text = f"Context: {context}\nQuestion: {prob['question']}\nOptions: {choices}\n"
        text = text.replace("  ", " ").strip()
        if text.startswith("Question: "):  # the converter's rule; a CQM prompt never starts so
            text = text.replace("Question: ", "")
        answer = f"The answer is {options[prob['answer']]}."
        if prob["image"] is None:
            records.append({"id": pid, "conversations": [{"from": "human", "value": text},
                                                         {"from": "gpt", "value": answer}]})
        else:
            records.append({"id": pid, "image": os.path.join(pid, prob["image"]),
                            "conversations": [{"from": "human", "value": f"{text}\n<image>"},
                                              {"from": "gpt", "value": answer}]})
    return records


def science_question(record: dict, single_pred_prompt: bool) -> answering.Question:
    """One model_vqa_science question from a LLaVA ScienceQA record."""
    qs = record["conversations"][0]["value"].replace("<image>", "").strip()
    prompt = qs
    images = []
    if "image" in record:
        images = [record["image"]]
        qs = "<image>\n" + qs
        prompt = "<image>\n" + prompt
    if single_pred_prompt:
        qs = qs + "\n" + SINGLE_PRED_PROMPT
        prompt = prompt + "\n" + SINGLE_PRED_PROMPT
    return answering.Question(qs, images, answering.answer_line(record["id"], prompt))


# --- scoring --------------------------------------------------------------------------------------


def parse_letter(text: str, options: list[str] = OPTIONS) -> str:
    """The option letter an answer gives, or "FAILED" (module docstring)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = ANSWER_PATTERN.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def _index(letter: str, choices: list, options: list[str]) -> int:
    return options.index(letter) if letter in options[: len(choices)] else -1


def score_files(base_dir: str, result_file: str, split: str = "test", options: list[str] = OPTIONS,
                output_file: str | None = None, output_result: str | None = None, log: Log = print) -> dict:
    """{"count", "correct", "accuracy", "img_accuracy"} (percent) of the answers in `result_file`."""
    with paths.open(os.path.join(base_dir, "pid_splits.json")) as f:
        split_indices = json.load(f)[split]
    with paths.open(os.path.join(base_dir, "problems.json")) as f:
        problems = json.load(f)
    predictions = {p["question_id"]: p for p in answering.read_jsonl(result_file)}
    results: dict[str, list] = {"correct": [], "incorrect": []}
    sqa_results: dict[str, Any] = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for prob_id in split_indices:
        prob = problems[prob_id]
        pred = predictions.get(prob_id, {"text": "FAILED", "prompt": "Unknown"})
        pred_text = pred["text"]
        answer = parse_letter(pred_text, options)
        pred_idx = _index(answer, prob["choices"], options)
        analysis = {"question_id": prob_id, "parsed_ans": answer, "ground_truth": options[prob["answer"]],
                    "question": pred["prompt"], "pred": pred_text, "is_multimodal": "<image>" in pred["prompt"]}
        sqa_results["results"][prob_id] = pred_idx
        sqa_results["outputs"][prob_id] = pred_text
        results["correct" if pred_idx == prob["answer"] else "incorrect"].append(analysis)
    correct = len(results["correct"])
    total = correct + len(results["incorrect"])
    mm_correct = sum(1 for x in results["correct"] if x["is_multimodal"])
    mm_total = mm_correct + sum(1 for x in results["incorrect"] if x["is_multimodal"])
    accuracy = correct / total * 100 if total else 0.0
    img_accuracy = mm_correct / mm_total * 100 if mm_total else 0.0
    log(f"Total: {total}, Correct: {correct}, Accuracy: {accuracy:.2f}%, IMG-Accuracy: {img_accuracy:.2f}%")
    sqa_results.update(acc=accuracy, correct=correct, count=total)
    if output_file:
        with paths.open(output_file, "w") as f:
            json.dump(results, f, indent=2)
    if output_result:
        with paths.open(output_result, "w") as f:
            json.dump(sqa_results, f, indent=2)
    return {"count": total, "correct": correct, "accuracy": accuracy, "img_accuracy": img_accuracy}


@register
class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "ScienceQA-IMG"
    max_new_tokens = 1024
    metric = "img_accuracy"
    metric_label = "accuracy on image problems (%)"
    paper = (66.8, 71.6)

    def add_run_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                       help="ask for the option's letter (the LLaVA-1.5 setting; default on)")
        p.add_argument("--split", default="test", help="with a problems.json question file: the split to ask")

    def questions(self, question_file: str, args: argparse.Namespace) -> list[answering.Question]:
        if os.path.basename(question_file) == "problems.json":
            records = cqm_a_records(os.path.dirname(question_file), args.split)
        else:
            with paths.open(question_file) as f:
                records = json.load(f)
        return [science_question(r, args.single_pred_prompt) for r in records]

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-dir", required=True, help="folder of problems.json and pid_splits.json")
        p.add_argument("--result-file", required=True, help="answers of `eval run scienceqa`")
        p.add_argument("--output-file", default=None, help="the original's per-problem analysis (optional)")
        p.add_argument("--output-result", default=None, help="the original's result json (optional)")
        p.add_argument("--split", default="test")
        p.add_argument("--options", type=list, default=list(OPTIONS), help="option letters, e.g. ABCDE")

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        return score_files(args.base_dir, args.result_file, args.split, args.options, args.output_file,
                           args.output_result, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "scienceqa", "llava_test_CQM-A.json"), join(root, "scienceqa", "images", "test"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--base-dir", join(root, "scienceqa"), "--result-file", answers_file]
