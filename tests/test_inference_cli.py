"""`python -m llava_jax.generate` and `python -m llava_jax.chat`, run as subprocesses on a tiny model
directory (HF weights + tokenizer.model + preprocessor_config.json), checked against transformers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llava_jax.data.image import ImageProcessorConfig, load_image, preprocess
from llava_jax.data.templates import render_prompt
from llava_jax.data.tokenizer import Tokenizer
from tests._inference import IMAGE_TOKEN, NUM_IMAGE_TOKENS, hf_generate, make_model_dir, write_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is in the picture?"
NEW = 10
GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW)]
# Every test starts CLIs in subprocesses (seconds each) on the module's model directory.
pytestmark = pytest.mark.slow(seconds=15)


def run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava-tiny"))
    _, hf = make_model_dir(d, seed=5)
    images = {
        name: write_image(os.path.join(d, name), seed=i, size=(40 + 7 * i, 30))
        for i, name in enumerate(["a.png", "b.jpg"])
    }
    return d, hf, images


@pytest.fixture(scope="module")
def single(model_dir):
    """`generate --json` on one image and QUESTION, greedy."""
    d, _, images = model_dir
    args = ["--model-path", d, "--image-file", images["a.png"], "--prompt", QUESTION, "--json", *GREEDY]
    r = run("llava_jax.generate", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_generate_json_equals_transformers(model_dir, single):
    d, hf, images = model_dir
    assert set(single) >= {"prompt_ids", "token_ids", "text", "logprobs"}
    tok = Tokenizer.from_pretrained(d)
    conv = [{"from": "human", "value": "<image>\n" + QUESTION}]
    expected = render_prompt(conv, "vicuna_v1", tok, image_token_index=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS)
    assert single["prompt_ids"] == expected.tolist()
    assert single["prompt_ids"].count(IMAGE_TOKEN) == NUM_IMAGE_TOKENS
    pixels = preprocess(load_image(images["a.png"]), ImageProcessorConfig.from_pretrained(d))[None]
    ref_ids, ref_lp = hf_generate(hf, expected[None], pixels, max_new_tokens=NEW, eos=2)
    assert single["token_ids"] == ref_ids[0].tolist()
    np.testing.assert_allclose(single["logprobs"], ref_lp[0], atol=1e-4)
    assert single["text"] == tok.decode(single["token_ids"])


@pytest.fixture(scope="module")
def converted_dir(model_dir, tmp_path_factory):
    """The model directory converted to ours (Orbax params + llava_jax_config.json)."""
    d, _, _ = model_dir
    dst = str(tmp_path_factory.mktemp("converted") / "llava-tiny-jax")
    r = run("llava_jax.convert", "--src", d, "--dst", dst)
    assert r.returncode == 0, r.stderr
    return dst


def test_chat_through_stdin(model_dir, converted_dir, single):
    """Chat on the converted directory: its first answer is the one `generate` gave on the HF directory."""
    d, hf, images = model_dir
    script = f"{QUESTION}\n/image {d}/missing.png\n/image {images['b.jpg']}\nAnd this one?\n/reset\nHello\n/exit\n"
    r = run("llava_jax.chat", "--model-path", converted_dir, "--image-file", images["a.png"], *GREEDY, stdin=script)
    assert r.returncode == 0, r.stderr
    answers = re.findall(r"ASSISTANT: (.*?)\nUSER: ", r.stdout, re.S)
    assert len(answers) == 3, r.stdout
    assert "(conversation reset)" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.png" in errors[0]
    # Turn 1 is the single-question prompt; turn 2 carries turn 1, its answer and a second image.
    assert answers[0].strip() == single["text"].strip()
    tok = Tokenizer.from_pretrained(d)
    conv = [
        {"from": "human", "value": "<image>\n" + QUESTION},
        {"from": "gpt", "value": answers[0].strip()},
        {"from": "human", "value": "<image>\nAnd this one?"},
    ]
    ids = render_prompt(conv, "vicuna_v1", tok, image_token_index=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS)
    cfg = ImageProcessorConfig.from_pretrained(d)
    pixels = np.stack([preprocess(load_image(images[n]), cfg) for n in ("a.png", "b.jpg")])
    ref_ids, _ = hf_generate(hf, ids[None], pixels, max_new_tokens=NEW, eos=2)
    assert answers[1] == tok.decode(ref_ids[0])


def _questions(d: str, images: dict) -> str:
    path = os.path.join(d, "questions.jsonl")
    long_text = " ".join(["describe the small red car near the tree"] * 40)  # far beyond 256 tokens
    records = [
        {"question_id": "q1", "image": "a.png", "text": QUESTION},
        {"question_id": "q2", "image": "b.jpg", "text": "Describe it."},
        {"question_id": 3, "text": "Hello there"},  # text only, integer id
        {"question_id": "q4", "image": "missing.png", "text": "What?"},
        {"question_id": "q5", "image": "a.png", "text": long_text},
        {"question_id": "q6", "image": "a.png", "text": "<image> or <image>?"},
        {"question_id": "q7", "image": "b.jpg", "text": "Two?"},
    ]
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.write("{not json\n")
    return path


def _answers(path: str) -> dict:
    with open(path) as f:
        return {json.dumps(a["question_id"]): a for a in map(json.loads, f)}


def test_batch_mode_reports_bad_questions_and_resumes(model_dir, single, tmp_path):
    d, _, images = model_dir
    questions = _questions(d, images)
    answers_file = str(tmp_path / "out" / "answers.jsonl")
    args = ["--model-path", d, "--questions-file", questions, "--image-folder", d, "--answers-file", answers_file]
    args += ["--batch-size", "2", *GREEDY]
    r = run("llava_jax.generate", *args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, r.stderr
    assert any("question q4" in e and "missing.png" in e for e in errors)
    assert any("question q5" in e and "context" in e for e in errors)
    assert any("question q6" in e and "2 <image> markers but 1 image" in e for e in errors)
    assert any("record 7 (line 8): not valid JSON" in e for e in errors)
    first = _answers(answers_file)
    assert sorted(first) == sorted(['"q1"', '"q2"', "3", '"q7"'])
    for a in first.values():
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["model_id"] == os.path.basename(d)
    # In a padded batch of two, q1 gets the answer it gets alone.
    assert first['"q1"']["text"] == single["text"].strip()
    assert first['"q1"']["prompt"] == QUESTION

    # Interrupted run: two answers kept, the third torn mid-line. Resuming answers only the rest.
    with open(answers_file) as f:
        lines = f.readlines()
    with open(answers_file, "w") as f:
        f.writelines(lines[:2])
        f.write(lines[2][:15])
    r = run("llava_jax.generate", *args)
    assert r.returncode == 2, r.stderr
    assert "2 answered, 2 already in" in r.stderr
    second = _answers(answers_file)
    assert sorted(second) == sorted(first)
    for k, a in second.items():
        assert a["text"] == first[k]["text"]
    kept = [json.loads(line)["answer_id"] for line in lines[:2]]
    assert [a["answer_id"] for a in second.values()][:2] == kept


@pytest.mark.parametrize(
    "case,expected",
    [("missing_image", "missing.png"), ("too_long", "context"), ("too_many_markers", "2 <image> markers but 1 image")],
)
def test_single_bad_input_one_line_exit_2(model_dir, case, expected):
    d, _, images = model_dir
    image, prompt = images["a.png"], QUESTION
    if case == "missing_image":
        image = os.path.join(d, "missing.png")
    elif case == "too_long":
        prompt = "describe the red car " * 100
    else:
        prompt = "<image> and <image>: which?"
    r = run("llava_jax.generate", "--model-path", d, "--image-file", image, "--prompt", prompt, *GREEDY)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.stderr
    assert r.stdout == ""


def test_chat_commands_are_case_insensitive_and_unknown_ones_never_reach_the_model():
    """ChatSession.handle alone (no model): what each typed line becomes."""
    from llava_jax.inference.chat import Action, ChatSession

    chat = ChatSession(pipe=None, params=None)
    for line in ("/exit", "/EXIT", " /Quit "):
        assert chat.handle(line).kind == "exit", line
    shown = chat.handle("/HELP")
    assert shown.kind == "say" and "/image PATH" in shown.text and "//TEXT" in shown.text
    chat.turns = [{"from": "human", "value": "hi"}]
    assert chat.handle("/Reset").kind == "say" and chat.turns == []
    assert chat.handle("/IMAGE").kind == "error"  # needs a file, as /image does
    for line in ("/bogus", "/bogus what is this?", "/exi"):
        action = chat.handle(line)
        assert action.kind == "error", line
        assert action.text.startswith(f"unknown command {line.split()[0]}, /help lists them"), action.text
        assert "\n" not in action.text
    # Messages that start with "/" still reach the model: a path, or the "//" escape.
    assert chat.handle("/usr/share/cat.png what is this?") == Action("ask", "/usr/share/cat.png what is this?")
    assert chat.handle("//exit now") == Action("ask", "/exit now")
    assert chat.handle("what does /exit do?") == Action("ask", "what does /exit do?")


def test_generate_json_into_a_closed_pipe_ends_quietly(model_dir):
    """`generate --json ... | head -c0`: the broken pipe is not reported as bad input (exit 2) nor as a traceback."""
    from llava_jax import cli

    d, _, images = model_dir
    read, write = os.pipe()
    os.close(read)
    args = ["--model-path", d, "--image-file", images["a.png"], "--prompt", QUESTION, "--json", *GREEDY]
    try:
        r = subprocess.run([sys.executable, "-m", "llava_jax.generate", *args], stdout=write, stderr=subprocess.PIPE,
                           text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
                           timeout=300)
    finally:
        os.close(write)
    assert r.returncode == cli.EXIT_BROKEN_PIPE, r.stderr
    assert "error:" not in r.stderr and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_chat_lets_a_broken_pipe_through_to_exit_with(monkeypatch, capsys):
    """A closed stdout mid-answer ends the chat (cli.exit_with), not reported as the model's error and ignored."""
    from llava_jax import chat as chat_cli
    from llava_jax.inference.chat import Action

    class Session:
        def __init__(self, pipe, params, num_frames=None):
            del pipe, params

        def handle(self, line):
            return Action("ask", line)

        def ask(self, text):
            yield "A"
            raise BrokenPipeError(32, "Broken pipe")

    lines = iter(["hello"])
    monkeypatch.setattr(chat_cli, "load_pipeline", lambda args: None)
    monkeypatch.setattr(chat_cli, "sampling_from_args", lambda pipe, args: None)
    monkeypatch.setattr(chat_cli, "ChatSession", Session)
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))  # a second prompt: StopIteration
    with pytest.raises(BrokenPipeError):
        chat_cli.main(["--model-path", "unused"])
