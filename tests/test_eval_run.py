"""`eval run`, `eval suite`, batch `generate` and `chat` on a tiny model directory (in process).

Properties: batched greedy answers equal one-at-a-time answers (the original's loop); a run is
resumable without half lines and ends in question order; bad images are counted by question id,
fatal only with --strict; image paths cannot leave the image folder; the suite's figures are
`eval score`'s on the answers it wrote; chat commands never reach the model.
"""

from __future__ import annotations

import json
import os

import pytest

from llava_jax import chat as chat_cli
from llava_jax import generate as generate_cli
from llava_jax.eval import get_benchmark
from llava_jax.eval.__main__ import main as eval_main
from llava_jax.eval.harness import run_benchmark
from llava_jax.eval.suite import run_suite
from llava_jax.inference import answering
from llava_jax.inference.chat import ChatSession
from llava_jax.inference.pipeline import Pipeline
from tests import _eval_fixtures as F
from tests._inference import make_model_dir, write_image

NEW = 6  # new tokens per answer: enough to differ, short enough for CI


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava-tiny"))
    make_model_dir(d, seed=5)
    images = str(tmp_path_factory.mktemp("images"))
    for i in range(5):
        write_image(os.path.join(images, f"im{i}.png"), seed=i, size=(40 + 6 * i, 30 + 2 * i))
    with open(os.path.join(images, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot an image")
    write_image(os.path.join(os.path.dirname(images), "outside.png"), seed=9)
    return d, images, Pipeline.from_pretrained(d)


def _loader_questions(path: str, extra: list[dict] = ()) -> str:
    """A model_vqa_loader question file: prompts of several lengths."""
    records = []
    for i in range(7):
        text = "Is there a dog in the image?" + " Look." * (i % 3)
        records.append({"question_id": i, "image": f"im{i % 5}.png",
                        "text": text + "\nAnswer the question using a single word or phrase.", "category": "random"})
    return F.write_jsonl(path, records + list(extra))


def _answers(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_batched_answers_equal_one_at_a_time(model, tmp_path):
    d, images, pipe = model
    questions = _loader_questions(str(tmp_path / "q.jsonl"))
    bench = get_benchmark("pope")
    batched, single = str(tmp_path / "batched.jsonl"), str(tmp_path / "single.jsonl")
    run_benchmark(bench, pipe, questions, images, batched, batch_size=4, max_new_tokens=NEW, progress=False)
    # The original's loop: one question, one generate call.
    run_benchmark(bench, pipe, questions, images, single, batch_size=1, max_new_tokens=NEW, progress=False)
    a, b = _answers(batched), _answers(single)
    assert [x["question_id"] for x in a] == [0, 1, 2, 3, 4, 5, 6]
    assert [x["text"] for x in a] == [x["text"] for x in b]
    assert len({x["text"] for x in a}) > 1  # the answers differ: the check can fail
    for x in a:
        assert list(x) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        assert x["model_id"] == os.path.basename(d)
    assert a[0]["prompt"] == "Is there a dog in the image?\nAnswer the question using a single word or phrase."


def test_bad_images_counted_by_id_resume_and_strict(model, tmp_path, capsys):
    d, images, pipe = model
    bad = [{"question_id": "missing", "image": "nope.png", "text": "Q?"},
           {"question_id": "corrupt", "image": "corrupt.png", "text": "Q?"},
           {"question_id": "escape", "image": "../outside.png", "text": "Q?"}]
    questions = _loader_questions(str(tmp_path / "q.jsonl"), bad)
    answers = str(tmp_path / "out" / "answers.jsonl")
    argv = ["run", "pope", "--model-path", d, "--question-file", questions, "--image-folder", images,
            "--answers-file", answers, "--batch-size", "4", "--max-new-tokens", str(NEW), "--no-progress"]
    assert eval_main(argv) == 0  # not fatal without --strict
    err = capsys.readouterr().err
    assert "7 answered, 0 already in" in err and "3 failed" in err
    for qid, why in (("missing", "nope.png"), ("corrupt", "corrupt.png"), ("escape", "escapes the image folder")):
        assert any(f"question {qid}:" in line and why in line for line in err.splitlines()), err
    first = _answers(answers)
    assert len(first) == 7

    # Killed mid-write after four answers, and one earlier answer lost: the restart answers exactly
    # the missing ones, leaves no half line, and puts the file back in question order.
    with open(answers) as f:
        lines = f.readlines()
    with open(answers, "w") as f:
        f.writelines(lines[:1] + lines[2:4])
        f.write(lines[4][:20])
    assert eval_main(argv) == 0
    assert "4 answered, 3 already in" in capsys.readouterr().err
    second = _answers(answers)
    assert [x["question_id"] for x in second] == [x["question_id"] for x in first]
    assert [x["text"] for x in second] == [x["text"] for x in first]
    assert [x["answer_id"] for x in second][:1] == [x["answer_id"] for x in first][:1]

    # --strict: the first bad question stops the run with one line and status 2.
    strict = argv[:argv.index("--answers-file")] + ["--answers-file", str(tmp_path / "strict.jsonl"), "--strict"]
    strict += argv[argv.index("--answers-file") + 2:]
    assert eval_main(strict) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "question missing:" in lines[0]


def test_generate_batch_uses_the_safe_resolver(model, tmp_path, capsys):
    """Issue 12, bug 4: an image path with '..' is refused, not read from the parent folder."""
    d, images, _ = model
    questions = F.write_jsonl(str(tmp_path / "q.jsonl"), [
        {"question_id": "ok", "image": "im0.png", "text": "What?"},
        {"question_id": "up", "image": "../outside.png", "text": "What?"},
        {"question_id": "abs", "image": os.path.join(os.path.dirname(images), "outside.png"), "text": "What?"}])
    answers = str(tmp_path / "a.jsonl")
    status = generate_cli.main(["--model-path", d, "--questions-file", questions, "--image-folder", images,
                                "--answers-file", answers, "--temperature", "0", "--max-new-tokens", str(NEW),
                                "--batch-size", "4"])
    assert status == 2
    err = capsys.readouterr().err
    assert "question up: image path '../outside.png' escapes the image folder" in err
    assert "question abs:" in err and "is absolute" in err
    assert [a["question_id"] for a in _answers(answers)] == ["ok"]


def test_mmbench_run_inline_images_and_rounds(model, tmp_path):
    """`eval run mmbench`: images decoded from the tsv, one answer line per round, resumable by round."""
    d, images, pipe = model
    mmb = F.mmbench(str(tmp_path))
    out = str(tmp_path / "mmb.jsonl")
    args = argparse_namespace(single_pred_prompt=True, all_rounds=True, lang="en")
    bench = get_benchmark("mmbench")
    report = run_benchmark(bench, pipe, mmb["annotation_file"], "", out, args, batch_size=4, max_new_tokens=NEW,
                           progress=False)
    assert report.answered == 4 + 2 + 3 + 2 + 3 and not report.failed
    answers = _answers(out)
    assert [(a["question_id"], a["round_id"]) for a in answers][:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert list(answers[0]) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                                "model_id", "metadata"]
    with open(out, "w") as f:  # rounds are resumed one by one
        f.writelines(json.dumps(a) + "\n" for a in answers if a["round_id"] != 1)
    report = run_benchmark(bench, pipe, mmb["annotation_file"], "", out, args, batch_size=4, max_new_tokens=NEW,
                           progress=False)
    assert (report.answered, report.skipped) == (5, 9)
    assert [a["text"] for a in _answers(out)] == [a["text"] for a in answers]


def argparse_namespace(**kw):
    import argparse

    return argparse.Namespace(**kw)


def test_suite_figures_are_the_scorers(model, tmp_path):
    """`eval suite` on a POPE layout: results.md/json hold `eval score pope`'s figure on its answers."""
    d, images, pipe = model
    root = str(tmp_path / "data")
    fx = F.pope(os.path.join(root, "pope"))
    os.makedirs(os.path.join(root, "pope", "val2014"))
    for i, q in enumerate(fx["questions"]):
        path = os.path.join(root, "pope", "val2014", q["image"])
        if not os.path.exists(path):
            write_image(path, seed=i)
    out = str(tmp_path / "out")
    rows = run_suite(pipe, root, ["pope"], out, batch_size=4, progress=False)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert results["pope"]["answered"] == 27 and results["pope"]["paper"] == {"LLaVA-1.5-7B": 85.9,
                                                                              "LLaVA-1.5-13B": 85.9}
    assert "| POPE | F1, mean of the categories (%) |" in table and "| 85.9 | 85.9 |" in table
    scored = get_benchmark("pope").score(argparse_namespace(
        annotation_dir=os.path.join(root, "pope", "coco"), question_file=fx["question_file"],
        result_file=os.path.join(out, "answers", "pope.jsonl")), log=lambda _: None)
    assert results["pope"]["result"] == scored
    f1 = [m["f1"] for m in scored.values()]
    assert rows[0].ours == pytest.approx(100 * sum(f1) / 3)


def test_chat_lists_commands_and_help_never_reaches_the_model(model, monkeypatch, capsys):
    """Issue 12, bug 9: commands at start, in --help, and /help answered by the chat itself."""
    d, images, pipe = model
    with pytest.raises(SystemExit):
        chat_cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert all(c in help_text for c in ("/image", "/reset", "/exit", "/help"))
    session = ChatSession(pipe, pipe.sampling(max_new_tokens=NEW))
    asked = []
    monkeypatch.setattr(session, "ask", lambda text: asked.append(text) or iter(()))
    assert session.handle("/help").kind == "say" and "/image PATH" in session.handle("/help").text
    assert session.handle("/image").kind == "error"
    assert session.handle(f"/image {images}/im0.png").kind == "say" and len(session.pending) == 1
    assert session.handle("/reset").kind == "say" and not session.pending
    assert session.handle("  /exit ").kind == "exit"
    assert session.handle("What is /help?").kind == "ask"
    # The command line: the list at start, /help printed, nothing sent to the model.
    lines = iter(["/help", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(chat_cli, "ChatSession", lambda *a, **kw: session)
    assert chat_cli.main(["--model-path", d]) == 0
    out = capsys.readouterr().out
    assert out.count("/reset") == 2 and "ASSISTANT:" not in out and asked == []


def test_answers_file_tolerates_foreign_lines(tmp_path):
    """Lines that are not answers are kept and never mistaken for answered questions."""
    path = str(tmp_path / "a.jsonl")
    with open(path, "w") as f:
        f.write('{"note": "not an answer"}\n{"question_id": 3, "text": "x"}\n{"question_id": 4, "te')
    records = answering.read_answers(path, repair=True)
    assert [answering.answer_key(r) for r in records] == ["3"]
    with open(path) as f:
        assert f.read().endswith('"x"}\n')
