"""Records: LLaVA .json/.jsonl reading, validation errors that name the record, image path safety."""

from __future__ import annotations

import json
import os

import pytest

from llava_jax.data import records

GOOD = [
    {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
    {"id": "text1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                      {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye"}]},
    {"id": 7, "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]},
    # A system turn, then an opening answer (the templates drop it, as the original does).
    {"id": "sys", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "Hi!"},
                                    {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yes"}]},
]


def _write(tmp_path, name, records_or_text):
    path = tmp_path / name
    if isinstance(records_or_text, str):
        path.write_text(records_or_text)
    elif name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records_or_text) + "\n\n")
    else:
        path.write_text(json.dumps(records_or_text))
    return str(path)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_load_records_json_and_jsonl(tmp_path, name):
    loaded = records.load_records(_write(tmp_path, name, GOOD))
    assert loaded == GOOD
    assert [records.record_images(r) for r in loaded] == [["00453/004539375.jpg"], [], ["a.png", "b.png"], []]


BAD = [
    ("not a dict", "expected a JSON object"),
    ({"conversations": GOOD[1]["conversations"]}, "missing field 'id'"),
    ({"id": 1.5, "conversations": GOOD[1]["conversations"]}, "field 'id' must be"),
    ({"id": "x", "image": [], "conversations": GOOD[1]["conversations"]}, "field 'image' must be"),
    ({"id": "x", "image": ["a.png", 3], "conversations": GOOD[1]["conversations"]}, "non-empty strings"),
    ({"id": "x", "conversations": []}, "non-empty list"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "conversations[0] must be an object"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "no gpt turn after a human turn"),
    ({"id": "x", "conversations": [{"from": "bot", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "conversations[0].from is 'bot'; expected one of"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"},
                                   {"from": "gpt", "value": "b"}]}, "conversations[1].from is 'system'"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "conversations[1].from is 'human'"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}]}, "no gpt turn"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                   {"from": "gpt", "value": "c"}]}, "conversations[2].from is 'gpt'; expected human"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]},
     "value must be a string"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "no marker"},
                                                     {"from": "gpt", "value": "b"}]}, "found 0 <image> marker"),
    ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "b"}]},
     "found 1 <image> marker(s) in the conversation but 0 image(s)"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> q"},
                                                                {"from": "gpt", "value": "b"}]}, "but 2 image(s)"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "q"},
                                                     {"from": "gpt", "value": "<image>"}]}, "gpt turn with an"),
]


@pytest.mark.parametrize("bad,expected", BAD)
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_bad_record_error_names_file_index_id_and_problem(tmp_path, name, bad, expected):
    path = _write(tmp_path, name, GOOD + [bad] + GOOD)
    with pytest.raises(records.RecordError) as info:
        records.load_records(path)
    message = str(info.value)
    assert path in message and "record 4" in message and expected in message
    assert info.value.index == 4 and info.value.path == path
    line = " (line 5" if name.endswith(".jsonl") else ""
    if isinstance(bad, dict) and "id" in bad:
        assert f"record 4{line + ', ' if line else ' ('}id {bad['id']!r})" in message
    else:
        assert f"record 4{line + ')' if line else ''}: " in message


def test_on_error_collects_every_bad_record_and_keeps_the_rest(tmp_path):
    path = _write(tmp_path, "data.jsonl", [GOOD[0], {"id": "b1"}, GOOD[1], {"id": "b2"}])
    errors = []
    loaded = records.load_records(path, on_error=errors.append)
    assert loaded == [GOOD[0], GOOD[1]]
    assert [(e.index, e.record_id) for e in errors] == [(1, "b1"), (3, "b2")]


def test_jsonl_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, "data.jsonl", json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(records.RecordError, match=r"record 1 \(line 2\): not valid JSON"):
        records.load_records(path)


@pytest.mark.parametrize("text,expected", [("{}", "expected a JSON list"), ("[", "not valid JSON")])
def test_json_file_errors(tmp_path, text, expected):
    with pytest.raises(ValueError, match=expected):
        records.load_records(_write(tmp_path, "data.json", text))
    with pytest.raises(ValueError, match="unknown data file type"):
        records.load_records(_write(tmp_path, "data.txt", "[]"))


def test_resolve_image_path_inside_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    real = os.path.realpath(folder)
    assert records.resolve_image_path(folder, "sub/a.png") == os.path.join(real, "sub", "a.png")
    assert records.resolve_image_path(str(folder), "sub/../b.png") == os.path.join(real, "b.png")
    # A symlink that stays inside the folder is fine.
    (folder / "inner").symlink_to(folder / "sub")
    assert records.resolve_image_path(folder, "inner/a.png") == os.path.join(real, "sub", "a.png")


@pytest.mark.parametrize("rel,expected", [
    ("/etc/passwd", "is absolute"),
    ("../secret.png", "escapes the image folder"),
    ("a/../../secret.png", "escapes the image folder"),
    ("..", "escapes the image folder"),
    ("link/secret.png", "outside the image folder"),
])
def test_resolve_image_path_rejects_escapes(tmp_path, rel, expected):
    folder = tmp_path / "images"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (folder / "link").symlink_to(outside)
    with pytest.raises(records.ImagePathError, match=expected):
        records.resolve_image_path(folder, rel)


def test_training_and_generate_number_records_alike(tmp_path):
    """Records count from 0 everywhere; a .jsonl message also gives the 1-based line (blank lines skipped)."""
    from llava_jax.inference.answering import read_vqa_questions

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({**GOOD[0], "question_id": 1, "text": "q"}) + "\n\n{oops\n")
    with pytest.raises(records.RecordError, match=r"data\.jsonl: record 1 \(line 3\): not valid JSON"):
        records.load_records(path)
    errors = [error for _, _, error in read_vqa_questions(str(path)) if error]
    assert len(errors) == 1 and f"{path}: record 1 (line 3): not valid JSON" in errors[0], errors


def test_json_file_that_does_not_parse_is_a_data_file_error_naming_file_line_and_column(tmp_path):
    path = _write(tmp_path, "data.json", '[\n  {"id": "a", "conversations": []},\n  {"id": "b" "x"}\n]')
    with pytest.raises(records.DataFileError, match=rf"^{path}: not valid JSON: .*line 3 column 14"):
        records.load_records(path)


def test_inspect_cli_on_a_json_file_that_does_not_parse_is_one_line_with_exit_2(tmp_path, capsys):
    """data.inspect reads the file with records.read_raw, as training does: the same one line, exit 2."""
    from llava_jax.data import inspect, synthetic

    built = synthetic.build(tmp_path / "syn", num_train=4, num_val=2, image_size=28)
    bad = _write(tmp_path, "bad.json", '[{"id": "a",]')
    status = inspect.main(["--data-path", bad, "--image-folder", built["image_folder"],
                           "--model-path", os.path.dirname(built["tokenizer"]), "--conv-mode", "plain",
                           "--num-image-tokens", "4", "--image-token-index", "1024"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines()[-1].startswith(f"error: {bad}: not valid JSON: ") and "line 1 column 13" in err, err
    assert "Traceback" not in err
