"""The inspect CLI (run as a subprocess): text and --json output, problem records on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llava_jax.data import inspect as inspect_cli
from llava_jax.data import records, synthetic, templates
from llava_jax.data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    paths = synthetic.build(root / "syn", num_train=6, num_val=2, image_size=28)
    model = root / "model"
    model.mkdir()
    shutil.copy(paths["tokenizer"], model / "tokenizer.model")
    tok = Tokenizer(paths["tokenizer"])
    # What transformers' LlavaConfig.save_pretrained writes, for a tiny 28 px / patch 14 tower.
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # pylint: disable=g-import-not-at-top

    LlavaConfig(vision_config=CLIPVisionConfig(image_size=28, patch_size=14).to_dict(),
                text_config=LlamaConfig(vocab_size=tok.vocab_size + 2).to_dict(),
                image_token_index=tok.vocab_size + 1).save_pretrained(model)
    good = records.load_records(paths["stage2"])[:4]
    bad = [
        {"id": "malformed", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is drawn?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "escape", "image": "../syn/images/train_00000.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is drawn?"}, {"from": "gpt", "value": "circle"}]},
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good[0], bad[0], good[1], bad[1], bad[2], *good[2:]]))
    return {"paths": paths, "model": str(model), "data": str(data), "good": good, "tok": tok}


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llava_jax.data.inspect", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def _args(setup, *extra):
    return ["--data-path", setup["data"], "--image-folder", setup["paths"]["image_folder"],
            "--model-path", setup["model"], "--conv-mode", "vicuna_v1", *extra]


def test_json_mode_gives_render_output_and_reports_problems_by_id(setup):
    result = _run(*_args(setup, "--json"))
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [obj["id"] for obj in lines] == [r["id"] for r in setup["good"]]
    tok = setup["tok"]
    for obj, record in zip(lines, setup["good"]):
        assert set(obj) == {"id", "input_ids", "labels"}
        # Image settings from config.json: (28 / 14)^2 = 4 tokens of id vocab_size + 1.
        expected = templates.render(record["conversations"], "vicuna_v1", tok, image_token_index=tok.vocab_size + 1,
                                    num_image_tokens=4, max_length=2048)
        np.testing.assert_array_equal(obj["input_ids"], expected.input_ids)
        np.testing.assert_array_equal(obj["labels"], expected.labels)
        assert obj["input_ids"].count(tok.vocab_size + 1) == (4 if "image" in record else 0)
    err = result.stderr
    assert "record 1 (line 2, id 'malformed')" in err and "no gpt turn" in err
    assert "record 3 (line 4, id 'missing')" in err and "nope.png" in err
    assert "record 4 (line 5, id 'escape')" in err and "escapes the image folder" in err
    assert "3 problem record(s)" in err


def test_text_mode_marks_supervised_spans(setup):
    result = _run(*_args(setup, "--max-length", "64", "--limit", "2"))
    assert result.returncode == 1  # the problem records before the limit are still reported
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    for block, record in zip(blocks, setup["good"]):
        header, body = block.split("\n", 1)
        assert header.startswith(f"### {record['id']}  (tokens ")
        answers = [a["value"] for a in record["conversations"][1::2]]
        spans = body.split(inspect_cli.OPEN)[1:]
        shown = [s.split(inspect_cli.CLOSE)[0] for s in spans]
        # What survives the 64-token truncation: whole answers, the last one possibly cut short.
        assert shown[:-1] == [f" {a}</s>" for a in answers[: len(shown) - 1]]
        assert f" {answers[len(shown) - 1]}</s>".startswith(shown[-1])
        assert "<image x4>" in body and body.startswith("<s> A chat between")


def test_overrides_work_without_config_and_missing_count_is_an_error(setup, tmp_path):
    shutil.copy(os.path.join(setup["model"], "tokenizer.model"), tmp_path / "tokenizer.model")
    args = ["--data-path", setup["paths"]["stage1"], "--image-folder", setup["paths"]["image_folder"],
            "--model-path", str(tmp_path), "--conv-mode", "plain", "--json"]
    result = _run(*args)
    assert result.returncode == 2 and "pass --num-image-tokens" in result.stderr
    result = _run(*args, "--num-image-tokens", "3", "--image-token-index", "5000")
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])
    assert first["input_ids"][:4] == [1, 5000, 5000, 5000] and first["labels"][:4] == [-100] * 4
    caption = records.load_records(setup["paths"]["stage1"])[0]["conversations"][1]["value"]
    assert setup["tok"].decode([i for i in first["labels"] if i >= 0]) == caption + "\n"


def test_image_settings_from_config_variants(tmp_path):
    def settings(cfg):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return inspect_cli.image_settings(str(tmp_path), 32000)

    hf = {"image_token_index": 32000, "image_seq_length": 576, "vision_config": {"image_size": 336, "patch_size": 14}}
    assert settings(hf) == (576, 32000, [])
    assert settings(dict(hf, vision_feature_select_strategy="full", image_seq_length=None))[:2] == (577, 32000)
    assert settings({"image_seq_length": 100, "image_token_id": 7})[:2] == (100, 7)
    num, token, notes = settings(dict(hf, vision_config={"image_size": 28, "patch_size": 14}))
    assert (num, token) == (4, 32000) and "disagrees" in notes[0]
    original = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_feature": "patch"}
    assert settings(original)[:2] == (576, 32000)
    assert settings({"mm_vision_tower": "openai/clip-vit-large-patch14"})[:2] == (256, 32000)
    assert settings({})[:2] == (None, 32000)
    os.remove(tmp_path / "config.json")
    assert inspect_cli.image_settings(str(tmp_path), 99)[:2] == (None, 99)


@pytest.mark.parametrize("unbuffered", ["0", "1"])
def test_output_into_a_closed_pipe_ends_quietly(setup, unbuffered):
    """`inspect ... | head -1`: the reader has left; a status, no BrokenPipeError traceback.

    Unbuffered, the first write fails inside the loop; buffered, the final flush does.
    """
    from llava_jax import cli  # pylint: disable=g-import-not-at-top

    read, write = os.pipe()
    os.close(read)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED=unbuffered)
    try:
        result = subprocess.run([sys.executable, "-m", "llava_jax.data.inspect", *_args(setup, "--json")],
                                stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == cli.EXIT_BROKEN_PIPE, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_corrupt_image_is_reported_as_pack_and_training_skip_it(setup, tmp_path):
    """A record whose PNG does not decode is a problem record, like a missing one: the check is pack's."""
    from llava_jax.data import image as image_lib  # pylint: disable=g-import-not-at-top
    from llava_jax.data import packed_format  # pylint: disable=g-import-not-at-top

    good = setup["good"][0]
    folder = tmp_path / "images"
    folder.mkdir()
    png = os.path.join(setup["paths"]["image_folder"], good["image"])
    with open(png, "rb") as f:
        data = f.read()
    (folder / "good.png").write_bytes(data)
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])  # a valid header, then nothing
    (folder / "garbage.png").write_bytes(b"not an image at all")
    rows = [dict(good, id="good", image="good.png"), dict(good, id="truncated", image="truncated.png"),
            dict(good, id="garbage", image="garbage.png")]
    data_path = tmp_path / "data.jsonl"
    data_path.write_text("\n".join(json.dumps(r) for r in rows))
    result = _run("--data-path", str(data_path), "--image-folder", str(folder), "--model-path", setup["model"],
                  "--conv-mode", "vicuna_v1", "--json")
    assert result.returncode == 1, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["good"]
    for index, name in ((1, "truncated"), (2, "garbage")):
        assert f"record {index} (line {index + 1}, id '{name}'): ImageError" in result.stderr
        assert f"{name}.png" in result.stderr
        with pytest.raises(image_lib.ImageError):  # what pack (and so training's loader) says of it
            packed_format.read_example(rows[index], str(folder))
    assert "2 problem record(s)" in result.stderr


def test_next_model_counts_each_image_by_its_size(tmp_path):
    """An HF LLaVA-NeXT directory: each image's tokens follow its size (anyres.layout), as training renders it;
    an original LLaVA-NeXT config is refused with what to do."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from llava_jax import anyres

    sizes = ((28, 56), (56, 28), (42, 84))
    paths = synthetic.build(tmp_path / "syn", num_train=6, num_val=2, image_size=56, sizes=sizes)
    tok = Tokenizer(paths["tokenizer"])
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(paths["tokenizer"], model / "tokenizer.model")
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=28, patch_size=14).to_dict(),
                    text_config=LlamaConfig(vocab_size=tok.vocab_size + 2).to_dict(), image_grid_pinpoints=pinpoints,
                    image_token_index=tok.vocab_size + 1).save_pretrained(model)
    geometry, token, notes = inspect_cli.image_settings(str(model), tok.vocab_size)
    assert geometry == anyres.AnyresConfig(28, 2, tuple(map(tuple, pinpoints))) and token == tok.vocab_size + 1
    result = _run("--data-path", paths["stage2"], "--image-folder", paths["image_folder"], "--model-path", str(model),
                  "--conv-mode", "vicuna_v1", "--json")
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in records.load_records(paths["stage2"])}
    counted = set()
    for obj in map(json.loads, result.stdout.splitlines()):
        record = by_id[obj["id"]]
        want = 0
        if "image" in record:
            from PIL import Image

            with Image.open(os.path.join(paths["image_folder"], record["image"])) as im:
                want = anyres.layout(geometry, (im.height, im.width)).num_tokens
                counted.add(want)
        assert obj["input_ids"].count(token) == want
    assert len(counted) > 1  # sizes that tile differently take different counts
    (model / "config.json").write_text(json.dumps({"mm_vision_tower": "openai/clip-vit-large-patch14-336",
                                                   "image_aspect_ratio": "anyres"}))
    result = _run("--data-path", paths["stage2"], "--image-folder", paths["image_folder"], "--model-path", str(model),
                  "--conv-mode", "vicuna_v1")
    assert result.returncode == 2 and "convert it first" in result.stderr, result.stderr
