"""Synthetic shapes dataset: answers agree with the pixels, balance, determinism, caching, scoring."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import time

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image
from scipy import ndimage

from llava_jax.data import records, synthetic


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    """The embedded training default's size: 2000 train + 200 val images at 56 px."""
    start = time.perf_counter()
    paths = synthetic.build(tmp_path_factory.mktemp("syn") / "d", num_train=2000, num_val=200, image_size=56)
    return paths, time.perf_counter() - start


def _digest(out_dir: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, out_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_build_is_fast_and_files_are_valid_llava_records(default_build):
    paths, seconds = default_build
    assert seconds < 30, f"build took {seconds:.1f}s"  # ~2 s alone on this machine; generous when shared
    stage1, stage2, val = (records.load_records(paths[k]) for k in ("stage1", "stage2", "val"))
    assert len(stage1) == 2000 and len(stage2) == 2000 + 200 and len(val) > 3 * 200
    for r in stage1:
        assert len(r["conversations"]) == 2 and r["conversations"][0]["value"].count("<image>") == 1
    text_only = [r for r in stage2 if "image" not in r]
    assert len(text_only) == 200 and all(len(r["conversations"]) >= 2 for r in text_only)
    assert max(len(r["conversations"]) for r in stage2) >= 6  # multi-turn
    train_images = {r["image"] for r in stage1} | {r["image"] for r in stage2 if "image" in r}
    val_images = {r["image"] for r in val}
    assert len(val_images) == 200 and not train_images & val_images
    assert len(os.listdir(paths["image_folder"])) == 2200
    for r in val:
        assert r["conversations"][1]["value"] == r["answer"] and r["qtype"] in synthetic.QTYPES


def _measure(path: str) -> dict[str, str]:
    """Reads colour, count, shape and position back from the pixels, independently of the generator."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    mask = np.abs(pixels - np.array(synthetic.BACKGROUND)).sum(-1) > 30
    labels, count = ndimage.label(mask)
    mean = pixels[mask].mean(0)
    color = min(synthetic.COLORS, key=lambda c: np.abs(np.array(synthetic.COLORS[c]) - mean).sum())
    ys, xs = np.nonzero(labels == 1)
    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # circle ~0.79, square 1, triangle ~0.5
    shape = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
    out = {"color": color, "count": str(count), "shape": shape}
    if count == 1:
        height, width = pixels.shape[:2]
        cy, cx = ys.mean() / height, xs.mean() / width
        out["position"] = min(synthetic.POSITIONS, key=lambda p: np.hypot(cx - synthetic.POSITIONS[p][0],
                                                                        cy - synthetic.POSITIONS[p][1]))
    return out


def test_val_answers_agree_with_the_pixels(default_build):
    paths, _ = default_build
    val = records.load_records(paths["val"])
    measured = {}
    for r in val:
        if r["image"] not in measured:
            measured[r["image"]] = _measure(os.path.join(paths["image_folder"], r["image"]))
        assert measured[r["image"]][r["qtype"]] == r["answer"], (r["id"], measured[r["image"]])
    # Position questions exactly for single-object images.
    for image, m in measured.items():
        asked = {r["qtype"] for r in val if r["image"] == image}
        assert ("position" in asked) == (m["count"] == "1")


def test_answers_are_balanced_and_from_a_closed_set(default_build):
    paths, _ = default_build
    answers = collections.defaultdict(collections.Counter)
    for r in records.load_records(paths["stage2"]):
        if "image" not in r:
            continue
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
            answers[_qtype(q["value"])][a["value"]] += 1
    # Two or three quadrants in reading order: "top left and bottom right", "top left, top right and bottom left".
    quadrants = {f"{a} and {b}" for a, b in itertools.combinations(synthetic.QUADRANT_NAMES, 2)}
    quadrants |= {f"{a}, {b} and {c}" for a, b, c in itertools.combinations(synthetic.QUADRANT_NAMES, 3)}
    expected = {"color": set(synthetic.COLORS), "shape": set(synthetic.SHAPES), "count": {"1", "2", "3", "4"},
                "position": set(synthetic.POSITIONS), "quadrants": quadrants}
    assert set(answers) == set(expected)
    for qtype, counter in answers.items():
        assert set(counter) == expected[qtype]
        share = np.array(list(counter.values())) / sum(counter.values())
        # Uniform up to sampling noise (+-35% relative).
        assert np.all(np.abs(share * len(counter) - 1) < 0.35), (qtype, counter)


def _qtype(question: str) -> str:
    """The question type of a stage-2 question, by its wording ("quadrants": the training-only one)."""
    question = question.replace("<image>", "").strip()
    if question in synthetic.QUADRANT_QUESTIONS:
        return "quadrants"
    return next(t for t, qs in synthetic.QUESTIONS.items() if question in qs)


def test_stage2_asks_where_the_objects_are_and_the_pixels_agree(default_build):
    """Every stage-2 image record asks where its objects are, unless the answer is no information (four
    objects fill every quadrant): position for one object, the occupied quadrants for two or three.
    Stage 2 freezes the tower, and without this the default's position answers stayed at chance."""
    paths, _ = default_build
    checked = collections.Counter()
    for r in records.load_records(paths["stage2"]):
        if "image" not in r:
            continue
        asked = {_qtype(q["value"]): a["value"] for q, a in zip(r["conversations"][::2], r["conversations"][1::2])}
        pixels = np.asarray(Image.open(os.path.join(paths["image_folder"], r["image"])).convert("RGB")).astype(int)
        mask = np.abs(pixels - np.array(synthetic.BACKGROUND)).sum(-1) > 30
        size = pixels.shape[0]
        seen = [name for name, (fx, fy) in zip(synthetic.QUADRANT_NAMES, synthetic.QUADRANTS)
                if mask[int(fy * size) - 2 : int(fy * size) + 3, int(fx * size) - 2 : int(fx * size) + 3].mean() > 0.5]
        count = ndimage.label(mask)[1]
        if count == 1:
            assert "position" in asked and "quadrants" not in asked, (r["id"], asked)
            checked["position"] += 1
        elif len(seen) in (2, 3):
            assert "quadrants" in asked and "position" not in asked, (r["id"], asked)
            named = [q for q in synthetic.QUADRANT_NAMES if q in asked["quadrants"]]
            assert named == seen, (r["id"], asked["quadrants"], seen)
            checked["quadrants"] += 1
        else:
            assert len(seen) == 4 and not {"position", "quadrants"} & set(asked), (r["id"], asked, seen)
        assert len(asked) >= 2 and len(asked) == len(r["conversations"]) // 2, (r["id"], asked)
    assert checked["position"] > 300 and checked["quadrants"] > 600, checked


def test_tokenizer_is_llama_like_and_answers_are_single_pieces(default_build):
    paths, _ = default_build
    sp = spm.SentencePieceProcessor(model_file=paths["tokenizer"])
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 1024
    assert sp.encode("é", out_type=str) == ["▁", "<0xC3>", "<0xA9>"]  # byte fallback
    assert sp.encode("12", out_type=str) == ["▁", "1", "2"]  # digits split
    words = [*synthetic.COLORS, *synthetic.SHAPES, *synthetic.POSITIONS]
    assert [w for w in words if len(sp.encode(w)) != 1] == []


def test_build_is_deterministic_and_seeded(tmp_path):
    kwargs = dict(num_train=30, num_val=8, image_size=32, vocab_size=400)
    a = _digest(synthetic.build(tmp_path / "a", **kwargs)["out_dir"])
    b = _digest(synthetic.build(tmp_path / "b", **kwargs)["out_dir"])
    c = _digest(synthetic.build(tmp_path / "c", seed=1, **kwargs)["out_dir"])
    assert a == b
    assert len(a) == 30 + 8 + 5
    assert a["stage2.json"] != c["stage2.json"] and a["images/train_00000.png"] != c["images/train_00000.png"]


def test_build_is_cached_and_rebuilt_when_arguments_change(tmp_path, monkeypatch):
    out = tmp_path / "d"
    paths = synthetic.build(out, num_train=12, num_val=4, image_size=28, vocab_size=400)
    manifest = open(paths["manifest"]).read()

    def fail(*args, **kwargs):
        raise AssertionError("a cached build must not draw")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "draw_scene", fail)
        assert synthetic.build(out, num_train=12, num_val=4, image_size=28, vocab_size=400) == paths
    assert open(paths["manifest"]).read() == manifest
    # Other arguments: rebuilt, and no stale images from the larger build remain.
    synthetic.build(out, num_train=5, num_val=2, image_size=28, vocab_size=400)
    assert sorted(os.listdir(paths["image_folder"])) == [f"train_{i:05d}.png" for i in range(5)] + [
        f"val_{i:05d}.png" for i in range(2)]
    assert json.load(open(paths["manifest"]))["args"]["num_train"] == 5
    # An interrupted build (no manifest) is redone.
    os.remove(paths["manifest"])
    with monkeypatch.context() as m:
        calls = []
        original = synthetic.draw_scene
        m.setattr(synthetic, "draw_scene", lambda *a: calls.append(1) or original(*a))
        synthetic.build(out, num_train=5, num_val=2, image_size=28, vocab_size=400)
    assert len(calls) == 7 and os.path.exists(paths["manifest"])


def test_scene_options_are_respected(tmp_path):
    scene = synthetic.SceneConfig(shapes=("circle",), colors=("red", "blue"), max_count=1, positions=("left",))
    paths = synthetic.build(tmp_path / "d", num_train=20, num_val=5, image_size=40, vocab_size=400, scene=scene)
    val = records.load_records(paths["val"])
    assert {(r["qtype"], r["answer"]) for r in val} <= {("shape", "circle"), ("color", "red"), ("color", "blue"),
                                                       ("count", "1"), ("position", "left")}
    assert Image.open(os.path.join(paths["image_folder"], "val_00000.png")).size == (40, 40)
    with pytest.raises(ValueError, match="unknown shapes"):
        synthetic.SceneConfig(shapes=("hexagon",))


def test_score_exact_match_after_normalisation():
    val = [{"id": "a", "qtype": "color", "answer": "red"}, {"id": "b", "qtype": "count", "answer": "3"},
           {"id": "c", "qtype": "count", "answer": "2"}, {"id": "d", "qtype": "shape", "answer": "circle"}]
    got = synthetic.score(val, {"a": " Red.", "b": "three", "c": "2 shapes"})
    assert got == {"accuracy": 0.5, "n": 4, "accuracy/color": 1.0, "n/color": 1, "accuracy/count": 0.5,
                   "n/count": 2, "accuracy/shape": 0.0, "n/shape": 1}
    assert synthetic.score(val, ["red", "3", "2", "circle!"])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="4 records"):
        synthetic.score(val, ["red"])


def test_captions_name_the_quadrants_the_pixels_show(default_build):
    """Stage-1 captions of multi-object images say where each object is, and the pixels agree."""
    paths, _ = default_build
    checked = 0
    for r in records.load_records(paths["stage1"])[:300]:
        caption = r["conversations"][-1]["value"].lower()
        pixels = np.asarray(Image.open(os.path.join(paths["image_folder"], r["image"])).convert("RGB")).astype(int)
        mask = np.abs(pixels - np.array(synthetic.BACKGROUND)).sum(-1) > 30
        size = pixels.shape[0]
        # Occupied quadrants, read at each quadrant's centre (objects may touch, so no component count).
        seen = {name for name, (fx, fy) in zip(synthetic.QUADRANT_NAMES, synthetic.QUADRANTS)
                if mask[int(fy * size) - 2 : int(fy * size) + 3, int(fx * size) - 2 : int(fx * size) + 3].mean() > 0.5}
        if len(seen) < 2 or len(seen) == len(synthetic.QUADRANTS):
            continue  # single objects name a position; four fill every quadrant and name none
        named = {q for q in synthetic.QUADRANT_NAMES if q in caption}
        assert named == seen, (r["id"], caption, seen)
        checked += 1
    assert checked > 50


NEXT_SIZES = ((56, 112), (112, 56), (84, 84), (70, 140))


def test_next_variant_draws_the_given_sizes_and_answers_agree_with_the_pixels(tmp_path):
    paths = synthetic.build(tmp_path / "next", num_train=40, num_val=40, image_size=56, sizes=NEXT_SIZES)
    val = records.load_records(paths["val"])
    seen = collections.Counter()
    for image in {r["image"] for r in val} | {r["image"] for r in records.load_records(paths["stage1"])}:
        with Image.open(os.path.join(paths["image_folder"], image)) as im:
            seen[(im.height, im.width)] += 1
    assert set(seen) == set(NEXT_SIZES), seen
    measured = {}
    for r in val:  # positions are fractions of each side: "left" on a wide image is in its left part
        if r["image"] not in measured:
            measured[r["image"]] = _measure(os.path.join(paths["image_folder"], r["image"]))
        assert measured[r["image"]][r["qtype"]] == r["answer"], (r["id"], measured[r["image"]])
    assert any(r["qtype"] == "position" for r in val)
    # Sizes have their own random stream: the same seed draws the same scenes and questions with or without
    # them, so the square default is what it was before sizes existed.
    square = synthetic.build(tmp_path / "square", num_train=40, num_val=40, image_size=56)
    for key in ("stage1", "stage2", "val"):
        assert records.load_records(square[key]) == records.load_records(paths[key]), key


def test_sizes_flag_is_parsed_and_a_bad_one_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out-dir", str(tmp_path / "bad"), "--sizes", "28by56"])
    assert e.value.code == 2 and "--sizes '28by56': expected HxW" in capsys.readouterr().err
    synthetic.main(["--out-dir", str(tmp_path / "ok"), "--num-train", "4", "--num-val", "0", "--sizes", "20x40"])
    with Image.open(tmp_path / "ok" / "images" / "train_00000.png") as im:
        assert (im.height, im.width) == (20, 40)


def test_media_tasks_answers_agree_with_the_pixels_and_are_balanced(tmp_path):
    """build_media: valid LLaVA records (LLaVA-Video-178K videos marked <image>, OneVision image lists); the
    frame the answer names is the one red frame of the decoded video, the count of red images is what the
    images show; answers spread over their closed sets; the answers are single pieces of the tokenizer."""
    from llava_jax.data import video as video_lib

    files = synthetic.build_media(tmp_path / "m", num_train=64, num_val=8, image_size=28, num_frames=4)
    train = json.load(open(files["train"]))
    assert all(records.validate_record(r) is None for r in train)
    assert sum(r["qtype"] == "describe" for r in train) == 64  # one a training record; none held out
    answers = collections.defaultdict(collections.Counter)
    red = np.asarray(synthetic.COLORS["red"], float)
    by_id = {r["id"]: r for r in train}
    for r in train:
        if r["qtype"] == "describe":  # the same media, each frame or image named in order
            asked = by_id[r["id"].removesuffix("_describe")]
            assert {k: r.get(k) for k in ("image", "video")} == {k: asked.get(k) for k in ("image", "video")}
            items = r["conversations"][1]["value"].rstrip(".").split(", ")
            if "video" in r:
                assert items.index("red square") == synthetic.ORDINALS.index(asked["answer"])
            else:
                assert sum(item.startswith("red ") for item in items) == int(asked["answer"])
            continue
        answers[r["qtype"]][r["answer"]] += 1
        if r["qtype"] == "frame":
            frames, _ = video_lib.decode_frames(os.path.join(files["image_folder"], r["video"]), 4)
            centre = frames[:, 12:16, 12:16].reshape(4, -1, 3).mean(axis=1)
            reddest = int(np.argmin(np.abs(centre - red).sum(axis=1)))
            assert synthetic.ORDINALS[reddest] == r["answer"], r["id"]
            assert np.abs(centre[reddest] - red).max() < 30  # the encoding keeps the colour
        else:
            assert len(r["image"]) == synthetic.COUNT_IMAGES
            centres = np.stack([np.asarray(Image.open(os.path.join(files["image_folder"], rel)))[12:16, 12:16]
                                .reshape(-1, 3).mean(axis=0) for rel in r["image"]])
            assert str(int(np.sum(np.abs(centres - red).max(axis=1) < 30))) == r["answer"], r["id"]
    assert set(answers["frame"]) == set(synthetic.ORDINALS[:4])
    assert set(answers["count_images"]) == {"0", "1", "2", "3"}
    sp = spm.SentencePieceProcessor(model_file=files["tokenizer"])
    assert all(len(sp.encode(a)) == 1 for a in synthetic.ORDINALS[:4])  # "▁first": the dummy prefix
