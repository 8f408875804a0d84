"""`python -m llava_jax.eval score` gives the original scorers' numbers on the same files.

The original LLaVA scripts are vendored unchanged in tests/reference (see its README) and run here
as subprocesses on fixtures built by hand in each benchmark's real format (tests/_eval_fixtures.py),
with answers a real model writes. Where the original tool cannot be vendored (MME's
`calculation.py`, GQA's `eval.py`), the test says how its figures were obtained.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import zipfile
from xml.etree import ElementTree

import pytest

from llava_jax.eval import get_benchmark
from llava_jax.eval.__main__ import main as eval_main
from llava_jax.eval import mmbench, scienceqa
from llava_jax.eval.vqa_accuracy import normalize_answer
from tests import _eval_fixtures as F

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def reference(script: str, *args: str, cwd: str | None = None) -> str:
    """Run a vendored original script; its stdout."""
    r = subprocess.run([sys.executable, os.path.join(REF, script), *args], capture_output=True, text=True,
                       cwd=cwd, env=dict(os.environ, PYTHONPATH=REF), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ours(capsys, *argv: str) -> tuple[dict, str]:
    """`python -m llava_jax.eval score ...` in process: (the --output-json result, stdout)."""
    out = os.path.join(os.environ["PYTEST_TMP"], "ours_result.json")
    capsys.readouterr()
    assert eval_main(["score", *argv, "--output-json", out]) == 0
    with open(out) as f:
        return json.load(f), capsys.readouterr().out


@pytest.fixture(autouse=True)
def _result_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_TMP", str(tmp_path))


# --- POPE -------------------------------------------------------------------------------------------


def _pope_blocks(text: str) -> dict[str, str]:
    blocks = [b.strip() for b in text.split("====================================") if b.strip()]
    return {re.match(r"Category: (\w+)", b).group(1): b for b in blocks}


def test_pope_equals_eval_pope(tmp_path, capsys):
    fx = F.pope(str(tmp_path))
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"), fx["answers"])
    args = ["--annotation-dir", fx["annotation_dir"], "--question-file", fx["question_file"], "--result-file", result_file]
    expected = reference("llava/eval/eval_pope.py", *args)
    result, printed = ours(capsys, "pope", *args)
    # The same printout, category by category (the original's order is os.listdir's).
    assert _pope_blocks(printed) == _pope_blocks(expected)
    for category, block in _pope_blocks(expected).items():
        for label, key in (("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"),
                           ("F1 score", "f1"), ("Yes ratio", "yes_ratio")):
            assert result[category][key] == float(re.search(rf"{label}: (\S+)", block).group(1))
        assert result[category]["count"] == int(re.search(r"# samples: (\d+)", block).group(1))
    assert sorted(result) == ["adversarial", "popular", "random"]
    assert all(set(m) == {"count", "accuracy", "precision", "recall", "f1", "yes_ratio"} for m in result.values())


def test_pope_missing_answer_pairs_with_its_own_label(tmp_path, capsys):
    """Without answer 4 we score what the original scores on files where question 4 never existed
    (the original, given the answers file with a hole, would pair every later answer with the
    label before its own)."""
    fx = F.pope(str(tmp_path))
    dropped = 4
    answers = [a for a in fx["answers"] if a["question_id"] != dropped]
    result, _ = ours(capsys, "pope", "--annotation-dir", fx["annotation_dir"], "--question-file", fx["question_file"],
                     "--result-file", F.write_jsonl(str(tmp_path / "answers.jsonl"), answers))
    # The same files without question 4: it is the 4th question of the first category.
    category = fx["questions"][dropped - 1]["category"]
    position = [q["question_id"] for q in fx["questions"] if q["category"] == category].index(dropped)
    label_file = os.path.join(fx["annotation_dir"], f"coco_pope_{category}.json")
    with open(label_file) as f:
        labels = f.readlines()
    with open(label_file, "w") as f:
        f.writelines(labels[:position] + labels[position + 1 :])
    expected = _pope_blocks(reference("llava/eval/eval_pope.py", "--annotation-dir", fx["annotation_dir"],
                                      "--question-file", fx["question_file"], "--result-file",
                                      str(tmp_path / "answers.jsonl")))
    assert result[category]["count"] == 8
    assert result[category]["f1"] == float(re.search(r"F1 score: (\S+)", expected[category]).group(1))
    assert result[category]["accuracy"] == float(re.search(r"Accuracy: (\S+)", expected[category]).group(1))


# --- ScienceQA --------------------------------------------------------------------------------------


def _cqm_a_reference(base_dir: str) -> list[dict]:
    """llava_test_CQM-A.json as the original converter writes it (fire is only its CLI: stubbed)."""
    code = ("import sys, types; sys.modules['fire'] = types.ModuleType('fire'); "
            f"sys.path.insert(0, {os.path.join(REF, 'scripts')!r}); import convert_sqa_to_llava as c; "
            f"c.convert_to_llava({base_dir!r}, 'test', 'CQM-A')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(base_dir, "llava_test_CQM-A.json")) as f:
        return json.load(f)


def test_scienceqa_questions_equal_the_converter_and_model_vqa_science(tmp_path):
    fx = F.scienceqa(str(tmp_path))
    records = _cqm_a_reference(fx["base_dir"])
    built = scienceqa.cqm_a_records(fx["base_dir"], "test")
    assert built == records
    # model_vqa_science with --single-pred-prompt, read off its code for the first (image) problem.
    q = scienceqa.science_question(records[0], single_pred_prompt=True)
    expected = ("Context: N/A\nQuestion: Which of these states is farthest north?\nOptions: (A) West Virginia "
                "(B) Louisiana (C) Arizona (D) Oklahoma\nAnswer with the option's letter from the given choices directly.")
    assert q.text == "<image>\n" + expected and q.line["prompt"] == "<image>\n" + expected
    assert q.images == ["100/image.png"] and q.line["question_id"] == "100"
    # The hint's double spaces are collapsed once, as the converter does ("  Read it  carefully").
    assert "describes an experiment. Read it carefully." in built[2]["conversations"][0]["value"]
    text_only = scienceqa.science_question(records[1], single_pred_prompt=False)
    assert text_only.images == [] and not text_only.text.startswith("<image>")
    # `eval run scienceqa` takes the converted file or problems.json (then builds the same questions).
    bench, ns = get_benchmark("scienceqa"), argparse.Namespace(single_pred_prompt=True, split="test")
    converted = F.write_json(os.path.join(fx["base_dir"], "llava_test_CQM-A.json"), records)
    from_problems = bench.questions(os.path.join(fx["base_dir"], "problems.json"), ns)
    assert [(q.text, q.images, q.line) for q in from_problems] == [
        (q.text, q.images, q.line) for q in bench.questions(converted, ns)]
    assert len(from_problems) == 8


def test_scienceqa_equals_eval_science_qa(tmp_path, capsys):
    fx = F.scienceqa(str(tmp_path))
    records = {r["id"]: r for r in _cqm_a_reference(fx["base_dir"])}
    answers = []
    for pid, text in zip(fx["test"], F.SCIENCEQA_TEXTS):
        if text is not None:
            q = scienceqa.science_question(records[pid], single_pred_prompt=True)
            answers.append(F.answer(pid, q.line["prompt"], text))
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"), answers)
    out = {k: str(tmp_path / f"{k}.json") for k in ("orig_output", "orig_result", "our_output", "our_result")}
    printed = reference("llava/eval/eval_science_qa.py", "--base-dir", fx["base_dir"], "--result-file", result_file,
                        "--output-file", out["orig_output"], "--output-result", out["orig_result"])
    result, ours_printed = ours(capsys, "scienceqa", "--base-dir", fx["base_dir"], "--result-file", result_file,
                                "--output-file", out["our_output"], "--output-result", out["our_result"])
    assert ours_printed == printed
    with open(out["orig_result"]) as f:
        orig = json.load(f)
    assert (result["count"], result["correct"], result["accuracy"]) == (orig["count"], orig["correct"], orig["acc"])
    assert f"IMG-Accuracy: {result['img_accuracy']:.2f}%" in printed
    for a, b in (("orig_output", "our_output"), ("orig_result", "our_result")):
        with open(out[a]) as f, open(out[b]) as g:
            assert json.load(f) == json.load(g)
    assert set(result) == {"count", "correct", "accuracy", "img_accuracy"}
    assert 0 < result["correct"] < result["count"] == 8  # the fixture has right, wrong, FAILED and missing


# --- TextVQA ----------------------------------------------------------------------------------------


def test_textvqa_equals_eval_textvqa(tmp_path, capsys):
    fx = F.textvqa(str(tmp_path))
    result_file = F.write_jsonl(str(tmp_path / "llava-v1.5-7b.jsonl"), fx["answers"])
    printed = reference("llava/eval/eval_textvqa.py", "--annotation-file", fx["annotation_file"],
                        "--result-file", result_file)
    result, ours_printed = ours(capsys, "textvqa", "--annotation-file", fx["annotation_file"],
                                "--result-file", result_file)
    assert ours_printed == printed
    assert result["count"] == len(fx["answers"])
    assert f"Accuracy: {result['accuracy']:.2f}%" in printed
    assert 0 < result["accuracy"] < 100


def test_normalisation_equals_m4c_on_awkward_answers():
    """EvalAI normalisation, quirks included, equals the vendored m4c_evaluator's on awkward strings."""
    texts = ["Dakota.", "the coca-cola", "10,000", "2.5", "5.", "I'm", "dont", "none", "a b. c", "yes!", "(stop)",
             "Two dogs", "x" + "." * 40 + "y", "somebody'd", "it's", "u.s.a.", "hello , world", "$10", "45 mph",
             "don't know", "an apple", "n/a", "left-hand", "3:00", "one\ttwo\nthree"]
    code = ("import json, sys; from llava.eval.m4c_evaluator import EvalAIAnswerProcessor as P; "
            "p = P(); print(json.dumps([p(t) for t in json.load(sys.stdin)]))")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REF), timeout=60)
    assert r.returncode == 0, r.stderr
    assert [normalize_answer(t) for t in texts] == json.loads(r.stdout)


# --- GQA ----------------------------------------------------------------------------------------------


def test_gqa_predictions_equal_convert_gqa_for_eval(tmp_path, capsys):
    texts = ["Yes.", "left", "The Man.", "white...", "no", "", "Red", "table."]
    answers = [F.answer(str(20100000 + i), f"Q{i}?\nAnswer the question using a single word or phrase.", t)
               for i, t in enumerate(texts)]
    result_file = F.write_jsonl(str(tmp_path / "merge.jsonl"), answers)
    reference("scripts/convert_gqa_for_eval.py", "--src", result_file, "--dst", str(tmp_path / "orig.json"))
    gold = ["yes", "left", "the man", "black", "yes", "chair", "red", "table"]
    structural = ["verify", "query", "query", "query", "logical", "query", "choose", "query"]
    questions = {a["question_id"]: {"answer": g, "isBalanced": True, "types": {"structural": s}}
                 for a, g, s in zip(answers, gold, structural)}
    questions["20199999"] = {"answer": "no", "isBalanced": False, "types": {"structural": "verify"}}
    F.write_json(str(tmp_path / "testdev_balanced_questions.json"), questions)
    result, _ = ours(capsys, "gqa", "--src", result_file, "--dst", str(tmp_path / "ours.json"),
                     "--questions", str(tmp_path / "testdev_balanced_questions.json"))
    with open(tmp_path / "orig.json") as f, open(tmp_path / "ours.json") as g:
        assert json.load(f) == json.load(g)
    # eval.py's accuracy: exact string match of the prediction, over the balanced questions only.
    assert result["count"] == 8 and result["missing"] == 1
    assert result["accuracy"] == 100.0 * 5 / 8
    assert result["binary"] == 100.0 * 1 / 2 and result["open"] == 100.0 * 4 / 6


# --- VQAv2 --------------------------------------------------------------------------------------------


def test_vqav2_submission_equals_convert_vqav2_for_submission(tmp_path, capsys):
    split, ckpt = "llava_vqav2_mscoco_test-dev2015", "llava-v1.5-7b"
    texts = ["Yes", "2", "Two.", "the red one", "10,000", "dont know", "Frisbee!", "left-hand"]
    test_split = [{"question_id": 100 + i, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"Q{i}?",
                   "category": "default"} for i in range(10)]
    for base in ("orig", "ours"):
        d = tmp_path / base
        os.makedirs(d / "answers" / split / ckpt)
        F.write_jsonl(str(d / "llava_vqav2_mscoco_test2015.jsonl"), test_split)
        with open(d / "answers" / split / ckpt / "merge.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps(F.answer(100 + i, f"Q{i}?", t)) + "\n")
            f.write('{"question_id": 109, "text": "torn\n')  # a line that is not JSON
    printed = reference("scripts/convert_vqav2_for_submission.py", "--dir", str(tmp_path / "orig"), "--ckpt", ckpt,
                        "--split", split)
    # Val-format annotations for the local figure.
    annotations = [{"question_id": 100 + i, "answer_type": "other" if i % 2 else "yes/no",
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(gts)]}
                   for i, gts in enumerate([["yes"] * 10, ["2"] * 6 + ["two"] * 2 + ["3"] * 2, ["2"] * 10,
                                            ["red"] * 5 + ["red one"] * 5, ["10000"] * 3 + ["10,000"] * 7,
                                            ["no"] * 10, ["frisbee"] * 9 + ["disc"], ["left hand"] * 2 + ["left"] * 8])]
    F.write_json(str(tmp_path / "val_annotations.json"), {"annotations": annotations})
    result, ours_printed = ours(capsys, "vqav2", "--dir", str(tmp_path / "ours"), "--ckpt", ckpt, "--split", split,
                                "--annotation-file", str(tmp_path / "val_annotations.json"))
    upload = os.path.join("answers_upload", split, f"{ckpt}.json")
    with open(tmp_path / "orig" / upload) as f, open(tmp_path / "ours" / upload) as g:
        assert json.load(f) == json.load(g)
    assert printed.strip() in ours_printed
    assert result["error_lines"] == 1 and result["submitted"] == 10
    # The local figure is m4c's TextVQAAccuracyEvaluator on the same answers.
    code = ("import json, sys; from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator as E; "
            "print(repr(E().eval_pred_list(json.load(sys.stdin))))")
    pred_list = [{"pred_answer": t, "gt_answers": [a["answer"] for a in ann["answers"]]}
                 for t, ann in zip(texts, annotations)]
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(pred_list), capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REF), timeout=60)
    assert r.returncode == 0, r.stderr
    assert result["accuracy"] == pytest.approx(100 * float(r.stdout.strip().splitlines()[-1]), rel=1e-12)


# --- MME ----------------------------------------------------------------------------------------------

# What LLaVA's convert_answer_to_mme.py (eval.zip) followed by MME's official eval_tool/calculation.py
# (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch, tools/eval_tool.zip;
# sklearn 1.9.1) printed for tests/_eval_fixtures.mme, run once by hand on 2026-11-28: neither script
# is in the LLaVA repository and MME's has no license, so neither is vendored. The converter's
# eval_tool files were byte-identical to ours (`--results-dir`).
MME_PRINTED = (
    "=========== Perception ===========\ntotal score: 483.3333333333333 \n\n\t existence  score: 99.99999999999999\n"
    "\t count  score: 0.0\n\t position  score: 99.99999999999999\n\t color  score: 16.666666666666664\n"
    "\t posters  score: 50.0\n\t celebrity  score: 0.0\n\t scene  score: 99.99999999999999\n\t landmark  score: 0.0\n"
    "\t artwork  score: 99.99999999999999\n\t OCR  score: 16.666666666666664\n\n\n=========== Cognition ===========\n"
    "total score: 216.66666666666663 \n\n\t commonsense_reasoning  score: 99.99999999999999\n"
    "\t numerical_calculation  score: 0.0\n\t text_translation  score: 99.99999999999999\n"
    "\t code_reasoning  score: 16.666666666666664\n\n\n"
)


def test_mme_equals_calculation_py(tmp_path, capsys):
    fx = F.mme(str(tmp_path))
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"), fx["answers"])
    result, printed = ours(capsys, "mme", "--data-dir", fx["data_dir"], "--result-file", result_file,
                           "--results-dir", str(tmp_path / "eval_tool"))
    assert printed == MME_PRINTED
    assert result["perception"] == 483.3333333333333 and result["cognition"] == 216.66666666666663
    assert result["tasks"]["color"] == {"score": 16.666666666666664, "acc": 1 / 6, "acc_plus": 0.0, "count": 6,
                                        "images": 3}
    with open(tmp_path / "eval_tool" / "color.txt") as f:  # the double-space ground truth was found
        assert "item 3-1-0?  Please answer yes or no.\tYes\tnone\n" in f.read()


def test_mme_missing_answer_counts_as_wrong(tmp_path, capsys):
    """The original needs every answer (pairs consecutive lines); a missing one is a wrong one here."""
    fx = F.mme(str(tmp_path))
    answers = [a for a in fx["answers"] if not (a["question_id"] == "existence/00000.jpg" and "0-0-0" in a["prompt"])]
    result, _ = ours(capsys, "mme", "--data-dir", fx["data_dir"], "--result-file",
                     F.write_jsonl(str(tmp_path / "answers.jsonl"), answers))
    assert result["missing"] == 1
    assert result["tasks"]["existence"]["count"] == 6
    assert result["tasks"]["existence"]["score"] < 99.99999999999999


# --- MMBench ------------------------------------------------------------------------------------------


def test_mmbench_prompts_follow_model_vqa_mmbench(tmp_path):
    fx = F.mmbench(str(tmp_path))
    qs = mmbench.mmbench_questions(fx["annotation_file"], single_pred_prompt=True, all_rounds=True, lang="en")
    by_id = {}
    for q in qs:
        by_id.setdefault(q.line["question_id"], []).append(q)
    suffix = "\nAnswer with the option's letter from the given choices directly."
    # Row 0: hint "nan" is missing; four options, four rounds, options rotated, letters kept.
    r0 = by_id[0]
    assert [q.line["round_id"] for q in r0] == [0, 1, 2, 3]
    assert r0[0].line["prompt"] == "What is the main color of the car?\nA. red\nB. blue\nC. green\nD. white"
    assert r0[0].text == "<image>\n" + r0[0].line["prompt"] + suffix
    assert r0[1].line["prompt"] == "What is the main color of the car?\nA. blue\nB. green\nC. white\nD. red"
    assert r0[1].line["options"] == ["blue", "green", "white", "red"]
    assert r0[1].line["option_char"] == ["B", "C", "D", "A"]
    # Row 1: the hint goes first; "NA" (pandas' missing value) ends the options after B.
    assert by_id[1][0].line["prompt"] == ("The person just heard good news.\nWhich emotion does the person show?"
                                          "\nA. sad\nB. happy")
    assert len(by_id[1]) == 2
    assert list(by_id[1][0].line)[:3] == ["question_id", "round_id", "prompt"]
    assert isinstance(by_id[0][0].images[0], bytes)
    single = mmbench.mmbench_questions(fx["annotation_file"], single_pred_prompt=True, all_rounds=False, lang="cn")
    assert len(single) == 5 and single[0].text.endswith("\n请直接回答选项字母。")


def test_mmbench_circular_accuracy_and_submission(tmp_path, capsys):
    fx = F.mmbench(str(tmp_path))
    qs = mmbench.mmbench_questions(fx["annotation_file"], True, True, "en")
    # Right in every round of row 0 (B = blue in round 0, then blue is at A, D, C), in letters,
    # "X." forms, parenthesised letters and option text; row 1 wrong in round 1; rows 2 and its
    # circular copy 1000002: right in all rounds but the copy's round 2 is missing.
    texts = {(0, 0): "B", (0, 1): "A.", (0, 2): "(D) white", (0, 3): "C. blue",
             (1, 0): "happy", (1, 1): "B",
             (2, 0): "C", (2, 1): "B", (2, 2): "A",
             (3, 0): "A", (3, 1): "B. yes",
             (1000002, 0): "B", (1000002, 1): "A"}
    answers = [dict(q.line, text=texts[(q.line["question_id"], q.line["round_id"])], answer_id="x", model_id="m")
               for q in qs if (q.line["question_id"], q.line["round_id"]) in texts]
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"), answers)
    result, printed = ours(capsys, "mmbench", "--annotation-file", fx["annotation_file"], "--result-file",
                           result_file, "--upload-file", str(tmp_path / "upload.tsv"))
    # Groups: 0 right; 1 wrong; 2 + 1000002 wrong (a missing round); 3 right.
    assert result["count"] == 4 and result["accuracy"] == 50.0
    assert result["missing"] == 1 and result["rows"] == 4 + 2 + 3 + 2 + 3
    with open(tmp_path / "upload.tsv") as f:
        header, *lines = [line.rstrip("\n").split("\t") for line in f]
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [line[6] for line in lines] == ["C. blue", "B", "A", "B. yes", "A"]  # the last round's answer
    # The .xlsx the original uploads (written without openpyxl): the same table, integers as numbers.
    ours(capsys, "mmbench", "--annotation-file", fx["annotation_file"], "--result-file", result_file,
         "--upload-file", str(tmp_path / "upload.xlsx"))
    with zipfile.ZipFile(tmp_path / "upload.xlsx") as z:
        sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    cells = [[(c.get("t"), "".join(c.itertext())) for c in row.findall("m:c", ns)] for row in sheet.iter(f"{{{ns['m']}}}row")]
    assert [text for _, text in cells[0]] == header
    assert cells[1][0] == (None, "0") and cells[1][6] == ("inlineStr", "C. blue")
    assert len(cells[2]) == 7  # row 1: C and D are empty cells (missing options), not written


def test_mmbench_letter_parsing():
    options = ["red", "blue", "green"]
    assert [mmbench.parse_letter(t, options) for t in ("B", "B.", "(C)", "C) green", "Blue.", "D", "purple", "")] == [
        "B", "B", "C", "C", "B", None, None, None]


# --- the command line -----------------------------------------------------------------------------------


def test_score_cli_bad_file_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llava_jax.eval", "score", "textvqa", "--annotation-file",
                        str(tmp_path / "missing.json"), "--result-file", str(tmp_path / "missing.jsonl")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0], r.stderr


def test_every_benchmark_has_a_layout_and_suite_flags(tmp_path):
    """The suite's score flags parse with each benchmark's `eval score` parser (no flag drift)."""
    from llava_jax.eval import BENCHMARKS
    from llava_jax.eval.harness import add_score_flags

    for name, bench in BENCHMARKS.items():
        layout = bench.layout(str(tmp_path))
        assert layout.question_file.startswith(str(tmp_path)), name
        argv = bench.suite_score_argv(str(tmp_path), "answers.jsonl", str(tmp_path / "out"))
        add_score_flags(bench, argparse.ArgumentParser()).parse_args(argv)
        assert get_benchmark(name) is bench


# --- VizWiz and SEED-Bench ------------------------------------------------------------------------------


def test_vizwiz_submission_equals_convert_vizwiz_for_submission(tmp_path, capsys):
    questions = [{"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg",
                  "text": "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                          "\nAnswer the question using a single word or phrase."} for i in range(6)]
    texts = ["Unanswerable", "a can of soup.", "Two", "the remote", "dont know", "10,000"]
    question_file = F.write_jsonl(str(tmp_path / "llava_test.jsonl"), questions)
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"),
                                [F.answer(q["question_id"], q["text"], t) for q, t in zip(questions, texts)])
    printed = reference("scripts/convert_vizwiz_for_submission.py", "--annotation-file", question_file,
                        "--result-file", result_file, "--result-upload-file", str(tmp_path / "orig" / "up.json"))
    result, ours_printed = ours(capsys, "vizwiz", "--annotation-file", question_file, "--result-file", result_file,
                                "--result-upload-file", str(tmp_path / "ours" / "up.json"))
    assert ours_printed == printed
    with open(tmp_path / "orig" / "up.json") as f, open(tmp_path / "ours" / "up.json") as g:
        assert json.load(f) == json.load(g)
    assert result == {"count": 6, "submitted": 6, "error_lines": 0, "missing": 0}


def test_seed_equals_convert_seed_for_submission(tmp_path, capsys):
    types = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
    questions, answers = [], []
    texts = ["A", "B", "A.", "c", "C", "D", None, "The answer is A", "B", "D", "A", None]
    for i, text in enumerate(texts):
        kind = 10 if i >= 9 else 1 + i % 2
        q = {"question_id": str(100 + i), "answer": "ABCD"[i % 4], "data_type": "video" if kind == 10 else "image",
             "question_type_id": kind, "question": f"Q{i}?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "data_id": f"{i}.jpg"}
        questions.append(q)
        if text is not None:
            answers.append(F.answer(100 + i, f"Q{i}?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from "
                                             "the given choices directly.", text))
    annotation = F.write_json(str(tmp_path / "SEED-Bench.json"), {"question_type": types, "questions": questions})
    result_file = F.write_jsonl(str(tmp_path / "merge.jsonl"), answers)
    # With two questions unanswered the original prints its accuracies (counting them wrong), then
    # fails writing the upload file (KeyError); its printout is what we compare.
    r = subprocess.run([sys.executable, os.path.join(REF, "scripts/convert_seed_for_submission.py"),
                        "--annotation-file", annotation, "--result-file", result_file, "--result-upload-file",
                        str(tmp_path / "orig.jsonl")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "KeyError" in r.stderr  # the upload step, after the accuracies are printed
    result, ours_printed = ours(capsys, "seed", "--annotation-file", annotation, "--result-file", result_file,
                                "--result-upload-file", str(tmp_path / "ours.jsonl"))
    assert ours_printed == r.stdout
    assert result["missing"] == 2 and result["count"] == 12
    # Only exact letters count: "A.", "c" and "The answer is A" are wrong.
    assert result["image_accuracy"] == 2 / 9 * 100 and result["video_accuracy"] == 0.0
    # With every question answered the original writes its upload file: ours is the same.
    complete = answers + [F.answer(106, "Q6?", "C"), F.answer(111, "Q11?", "D")]
    result_file = F.write_jsonl(str(tmp_path / "complete.jsonl"), complete)
    printed = reference("scripts/convert_seed_for_submission.py", "--annotation-file", annotation, "--result-file",
                        result_file, "--result-upload-file", str(tmp_path / "orig.jsonl"))
    result, ours_printed = ours(capsys, "seed", "--annotation-file", annotation, "--result-file", result_file,
                                "--result-upload-file", str(tmp_path / "ours.jsonl"))
    assert ours_printed == printed
    with open(tmp_path / "orig.jsonl") as f, open(tmp_path / "ours.jsonl") as g:
        assert f.read() == g.read()


def test_score_printout_into_a_closed_pipe_ends_quietly(tmp_path):
    """`eval score pope ... | head -1`: the broken pipe is not reported as a user error (exit 2) nor as a traceback."""
    from llava_jax import cli

    fx = F.pope(str(tmp_path))
    result_file = F.write_jsonl(str(tmp_path / "answers.jsonl"), fx["answers"])
    argv = ["score", "pope", "--annotation-dir", fx["annotation_dir"], "--question-file", fx["question_file"],
            "--result-file", result_file]
    repo = os.path.dirname(os.path.dirname(REF))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    read, write = os.pipe()
    os.close(read)
    try:  # unbuffered: the first printed line fails inside the scorer, where a user error would be caught
        r = subprocess.run([sys.executable, "-m", "llava_jax.eval", *argv], stdout=write, stderr=subprocess.PIPE,
                           text=True, cwd=repo, env=env, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == cli.EXIT_BROKEN_PIPE, r.stderr
    assert "error:" not in r.stderr and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_pope_metric_names_what_its_result_holds(tmp_path, capsys):
    """`metric` is a key of every category's result, and the headline is its mean over them, in percent."""
    fx = F.pope(str(tmp_path))
    result, _ = ours(capsys, "pope", "--annotation-dir", fx["annotation_dir"], "--question-file", fx["question_file"],
                     "--result-file", F.write_jsonl(str(tmp_path / "answers.jsonl"), fx["answers"]))
    bench = get_benchmark("pope")
    assert all(bench.metric in m for m in result.values()), (bench.metric, result)
    assert bench.headline(result) == pytest.approx(100 * sum(m["f1"] for m in result.values()) / 3)
