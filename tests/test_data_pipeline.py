"""Grain pipeline: rows equal the original LLaVA tokenization/masking, images in order, determinism,
exact resume (also through Orbax and worker processes), sharding, grouping, buckets, bad inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import types

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm

from llava_jax.data import image as image_lib
from llava_jax.data import pipeline, records, synthetic, templates
from llava_jax.data.tokenizer import Tokenizer

N_IMG = 4  # image tokens per image: tiny, the count is what matters
CROP = 28
IGNORE = templates.IGNORE_INDEX


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    paths = synthetic.build(root / "syn", num_train=24, num_val=6, image_size=CROP)
    tok = Tokenizer(paths["tokenizer"])
    return types.SimpleNamespace(paths=paths, tok=tok, root=root, image_token=tok.vocab_size,
                                 cfg=image_lib.ImageProcessorConfig(size=CROP, crop_size=CROP),
                                 sp=spm.SentencePieceProcessor(model_file=paths["tokenizer"]))


def _dataset(data, path=None, template="vicuna_v1", image_folder=None, **kwargs):
    args = dict(num_image_tokens=N_IMG, image_token_index=data.image_token, max_length=256, batch_size=4, seed=0,
                num_epochs=1, shard_index=0, shard_count=1)
    args.update(kwargs)
    return pipeline.make_dataset(path or data.paths["stage2"], image_folder or data.paths["image_folder"], data.tok,
                                 template, data.cfg, **args)


def _take(it, n=None):
    """[(batch, record ids)] for the next n batches (all if None)."""
    out = []
    for batch in it:
        out.append((batch, list(it.last_record_ids)))
        if n is not None and len(out) == n:
            break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (x, ids_x), (y, ids_y) in zip(a, b):
        assert ids_x == ids_y
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _write_records(path, recs):
    with open(path, "w") as f:
        json.dump(recs, f)
    return str(path)


# ----------------------------------------------------------------------- the original's semantics


def _original_prompt(record, template):
    """The training string as the original LLaVA's conversation.py builds it (markers to the front)."""
    convs = record["conversations"]
    if template == "plain":
        return "<image>" * convs[0]["value"].count("<image>") + convs[1]["value"] + "\n"
    text = templates.VICUNA_SYSTEM + " "
    for q, a in zip(convs[::2], convs[1::2]):
        v = q["value"]
        if "<image>" in v:
            v = "<image>\n" * v.count("<image>") + v.replace("<image>", "").strip()
        text += f"USER: {v} ASSISTANT: {a['value']}</s>"
    return text


def _original_ids(sp, prompt, image_token):
    """The original's tokenizer_image_token with the slow LLaMA tokenizer: BOS, then each piece
    between <image> / </s> cuts sentencepiece-encoded with its dummy prefix."""
    ids = [sp.bos_id()]
    for piece in re.split(r"(<image>|</s>)", prompt):
        if piece == "<image>":
            ids += [image_token] * N_IMG
        elif piece == "</s>":
            ids.append(sp.eos_id())
        elif piece:
            ids += sp.encode(piece)
    return ids


def _spans(labels):
    """Contiguous runs of supervised label ids."""
    runs, cur = [], []
    for x in labels:
        if x != IGNORE:
            cur.append(int(x))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template,data_key", [("vicuna_v1", "stage2"), ("plain", "stage1")])
def test_rows_match_the_original_tokenization_masking_and_images(data, template, data_key):
    by_id = {r["id"]: r for r in records.load_records(data.paths[data_key])}
    it = iter(_dataset(data, data.paths[data_key], template, batch_size=5))
    seen = set()
    for batch, ids in _take(it):
        b, t = batch["input_ids"].shape
        assert batch["labels"].shape == batch["attention_mask"].shape == (b, t) == (5, 256)
        assert batch["pixel_values"].shape == (5, 1, CROP, CROP, 3) and batch["image_mask"].shape == (5, 1)
        for row, record_id in enumerate(ids):
            if record_id is None:  # the epoch's last batch is padded with empty rows
                assert batch["attention_mask"][row].sum() == 0 and (batch["labels"][row] == IGNORE).all()
                continue
            seen.add(record_id)
            record = by_id[record_id]
            expected = _original_ids(data.sp, _original_prompt(record, template), data.image_token)
            n = len(expected)
            np.testing.assert_array_equal(batch["input_ids"][row, :n], expected)
            assert (batch["input_ids"][row, n:] == data.tok.pad_id).all()
            np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(t) < n)
            labels = batch["labels"][row]
            assert (labels[n:] == IGNORE).all()
            # Supervised: exactly the answers (+ EOS for vicuna, + "\n" for plain), nothing else.
            answers = [a["value"] for a in record["conversations"][1::2]]
            spans = _spans(labels)
            if template == "plain":
                assert [data.sp.decode(s) for s in spans] == [answers[0] + "\n"]
            else:
                assert [s[-1] for s in spans] == [data.sp.eos_id()] * len(answers)
                assert [data.sp.decode(s[:-1]) for s in spans] == answers
            supervised = labels != IGNORE
            np.testing.assert_array_equal(labels[supervised], batch["input_ids"][row][supervised])
            has_image = "image" in record
            assert batch["image_mask"][row, 0] == has_image
            if has_image:
                img = image_lib.load_image(os.path.join(data.paths["image_folder"], record["image"]))
                np.testing.assert_array_equal(batch["pixel_values"][row, 0], image_lib.preprocess(img, data.cfg))
            else:
                assert (batch["pixel_values"][row] == 0).all()
                assert (batch["input_ids"][row] != data.image_token).all()
    assert seen == set(by_id)
    assert it.stats.samples == len(by_id) and it.stats.num_skipped == 0


@pytest.fixture(scope="module")
def multi(data):
    """Records with several images and one text-only record."""
    two = {"id": "two", "image": ["train_00000.png", "train_00001.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And here?\n<image>"}, {"from": "gpt", "value": "blue"}]}
    front = {"id": "front", "image": ["train_00002.png", "train_00003.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame shape?"}, {"from": "gpt", "value": "yes"}]}
    text = {"id": "text", "conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                            {"from": "gpt", "value": "4"}]}
    return _write_records(data.root / "multi.json", [two, front, text]), {"two": two, "front": front, "text": text}


def test_multi_image_rows_keep_images_in_placeholder_order(data, multi):
    path, recs = multi
    batch, ids = _take(iter(_dataset(data, path, batch_size=3, shuffle=False, max_images_per_sample=3)))[0]
    assert ids == ["two", "front", "text"] and batch["pixel_values"].shape == (3, 3, CROP, CROP, 3)
    np.testing.assert_array_equal(batch["image_mask"], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    for row, name in enumerate(ids[:2]):
        for k, rel in enumerate(recs[name]["image"]):
            img = image_lib.load_image(os.path.join(data.paths["image_folder"], rel))
            np.testing.assert_array_equal(batch["pixel_values"][row, k], image_lib.preprocess(img, data.cfg))
        assert (batch["pixel_values"][row, 2] == 0).all()
        n = int(batch["attention_mask"][row].sum())
        expected = _original_ids(data.sp, _original_prompt(recs[name], "vicuna_v1"), data.image_token)
        np.testing.assert_array_equal(batch["input_ids"][row, :n], expected)
    assert [data.sp.decode(s[:-1]) for s in _spans(batch["labels"][0])] == ["red", "blue"]
    assert (batch["pixel_values"][2] == 0).all() and (batch["input_ids"][2] != data.image_token).all()


def test_truncation_never_cuts_an_image_and_drops_its_pixels(data, multi):
    path, recs = multi
    full = _original_ids(data.sp, _original_prompt(recs["two"], "vicuna_v1"), data.image_token)
    runs = [i for i in range(len(full)) if full[i] == data.image_token and full[i - 1] != data.image_token]
    assert len(runs) == 2
    # A cut two tokens into the second image run moves to just before it.
    ds = _dataset(data, path, batch_size=3, shuffle=False, max_images_per_sample=2, max_length=runs[1] + 2)
    batch, ids = _take(iter(ds))[0]
    assert ids == ["two", "front", "text"]  # the short ones fit whole
    assert int(batch["attention_mask"][0].sum()) == runs[1]
    np.testing.assert_array_equal(batch["input_ids"][0, : runs[1]], full[: runs[1]])
    np.testing.assert_array_equal(batch["image_mask"][0], [True, False])
    assert (batch["pixel_values"][0, 1] == 0).all()
    assert [data.sp.decode(s[:-1]) for s in _spans(batch["labels"][0])] == ["red"]


def test_samples_with_nothing_supervised_are_dropped_and_counted(data):
    it = iter(_dataset(data, max_length=12, batch_size=8))
    batches = _take(it)
    n = len(records.load_records(data.paths["stage2"]))
    assert all(ids == [None] * 8 for _, ids in batches)
    assert all((b["attention_mask"] == 0).all() for b, _ in batches)
    assert it.stats.skipped == {"empty": n} and it.stats.samples == 0
    assert it.stats.metrics()["data/skipped_empty"] == n
    # Strict mode is about broken inputs: truncation-emptied samples are still just counted.
    strict = iter(_dataset(data, max_length=12, batch_size=8, strict=True))
    assert len(_take(strict)) == len(batches) and strict.stats.skipped == {"empty": n}


def test_too_many_images_skipped_and_counted(data, multi):
    path, _ = multi
    it = iter(_dataset(data, path, batch_size=3, shuffle=False, max_images_per_sample=1))
    (batch, ids), = _take(it)
    assert ids == [None, None, "text"] and it.stats.skipped == {"too_many_images": 2}


# ----------------------------------------------------------------------- order, resume, shards


def test_same_seed_same_batches_and_epochs_reshuffle(data):
    a = _take(iter(_dataset(data, num_epochs=2)))
    b = _take(iter(_dataset(data, num_epochs=2)))
    _assert_same(a, b)
    ds = _dataset(data, num_epochs=2)
    per_epoch = ds.batches_per_epoch
    assert len(a) == 2 * per_epoch == 2 * 7  # 26 records / 4, last batch padded
    order = lambda batches: [i for _, ids in batches for i in ids]  # noqa: E731
    epoch1, epoch2 = order(a[:per_epoch]), order(a[per_epoch:])
    assert sorted(filter(None, epoch1)) == sorted(filter(None, epoch2)) and epoch1 != epoch2
    other = order(_take(iter(_dataset(data, seed=1))))
    assert sorted(filter(None, other)) == sorted(filter(None, epoch1)) and other != epoch1
    in_file = [r["id"] for r in records.load_records(data.paths["stage2"])]
    assert [i for i in order(_take(iter(_dataset(data, shuffle=False)))) if i] == in_file


def test_resume_mid_epoch_is_exact(data):
    it = iter(_dataset(data, num_epochs=2, group_by_modality_length=True, length_buckets=[64, 128]))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    rest = _take(it)  # crosses into the second epoch
    assert len(rest) > 5
    fresh = iter(_dataset(data, num_epochs=2, group_by_modality_length=True, length_buckets=[64, 128]))
    fresh.set_state(state)
    assert fresh.stats.batches == 3
    _assert_same(_take(fresh), rest)
    assert fresh.stats == it.stats


def test_resume_through_orbax_checkpoint_manager(data, tmp_path):
    it = iter(_dataset(data, num_epochs=None))
    _take(it, 5)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 4)
    fresh = iter(_dataset(data, num_epochs=None))
    ocp.CheckpointManager(tmp_path / "ckpt").restore(
        5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 4), expected)
    manager.close()


@pytest.mark.slow(seconds=7)
def test_worker_processes_give_the_same_batches_and_resume(data):
    kwargs = dict(num_epochs=2, batch_size=3)
    reference = _take(iter(_dataset(data, **kwargs)))
    it = iter(_dataset(data, worker_count=2, **kwargs))
    try:
        head = _take(it, 4)
        state = it.get_state()
        _assert_same(head + _take(it), reference)
    finally:
        it.close()
    fresh = iter(_dataset(data, worker_count=2, **kwargs))
    try:
        fresh.set_state(state)
        _assert_same(_take(fresh), reference[4:])
    finally:
        fresh.close()


@pytest.mark.parametrize("group", [False, True])
def test_shards_cover_every_record_once_in_lock_step(data, group):
    n_shards = 3
    shards = [_take(iter(_dataset(data, batch_size=2, shard_index=s, shard_count=n_shards,
                                  group_by_modality_length=group))) for s in range(n_shards)]
    assert len({len(batches) for batches in shards}) == 1  # same number of steps everywhere
    ids = [i for batches in shards for _, row_ids in batches for i in row_ids if i is not None]
    all_ids = [r["id"] for r in records.load_records(data.paths["stage2"])]
    assert sorted(ids) == sorted(all_ids)
    if group:
        text_ids = {r["id"] for r in records.load_records(data.paths["stage2"]) if "image" not in r}
        for step in zip(*shards):  # one global batch: a single modality on every shard
            kinds = {i in text_ids for _, row_ids in step for i in row_ids if i is not None}
            assert len(kinds) == 1


def test_epoch_plan_groups_by_modality_and_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 103) * np.where(rng.random(103) < 0.3, -1, 1)
    plan = pipeline.epoch_plan(lengths, batch_size=2, shard_count=2, seed=0, epoch=0,
                               group_by_modality_length=True)
    assert plan.shape == (pipeline.num_global_batches(lengths, batch_size=2, shard_count=2,
                                                      group_by_modality_length=True), 2, 2)
    flat = plan.reshape(-1)
    assert sorted(flat[flat >= 0]) == list(range(103))
    for global_batch in plan.reshape(len(plan), -1):
        members = global_batch[global_batch >= 0]
        assert len(set(np.sign(lengths[members]))) == 1
    # Within a sorting window batches are long-to-short: the spread per batch is small.
    spread = [np.ptp(np.abs(lengths[g[g >= 0]])) for g in plan.reshape(len(plan), -1)]
    assert np.mean(spread) < 0.25 * np.ptp(np.abs(lengths))
    plain = pipeline.epoch_plan(lengths, batch_size=2, shard_count=2, seed=0, epoch=0)
    assert len(plain) == 26 and sorted(plain.reshape(-1))[-103:] == list(range(103))


def test_length_buckets_pick_the_smallest_that_fits(data):
    buckets = [48, 96, 160]
    for batch, _ in _take(iter(_dataset(data, length_buckets=buckets, max_length=200, batch_size=2))):
        t, longest = batch["input_ids"].shape[1], int(batch["attention_mask"].sum(1).max())
        assert t == min(b for b in buckets + [200] if b >= longest)


# ----------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def broken(data):
    """A copy of some images plus: a missing file, a corrupt one, a truncated PNG, a symlink out."""
    folder = data.root / "broken_images"
    folder.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(data.paths["image_folder"], f"train_{i:05d}.png"), folder / f"ok{i}.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    png = (folder / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (data.root / "outside.png").write_bytes(png)
    (folder / "escape.png").symlink_to(data.root / "outside.png")
    names = ["ok0.png", "missing.png", "ok1.png", "corrupt.png", "truncated.png", "escape.png", "ok2.png"]
    recs = [{"id": f"r_{name[:-4]}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is drawn?"}, {"from": "gpt", "value": "circle"}]}
        for name in names]
    return _write_records(data.root / "broken.json", recs), str(folder)


def test_missing_or_corrupt_images_are_skipped_counted_and_reported(data, broken, caplog):
    path, folder = broken
    for workers in (0, 1):
        it = iter(_dataset(data, path, image_folder=folder, batch_size=4, shuffle=False, worker_count=workers))
        with caplog.at_level("WARNING", logger="llava_jax.data.pipeline"):
            batches = _take(it)
        it.close()
        assert [ids for _, ids in batches] == [["r_ok0", None, "r_ok1", None], [None, None, "r_ok2", None]]
        assert it.stats.skipped == {"image": 4} and it.stats.samples == 3 and it.stats.empty_rows == 5
        reported = {p[0]: p[2] for p in it.stats.problems}
        assert set(reported) == {"r_missing", "r_corrupt", "r_truncated", "r_escape"}
        assert "missing.png" in reported["r_missing"] and "outside the image folder" in reported["r_escape"]
        assert all(f"skipped record {i}" in caplog.text for i in reported)
        assert "r_corrupt" in it.stats.summary() and it.stats.metrics()["data/skipped_image"] == 4
        caplog.clear()


def test_strict_mode_raises_naming_file_and_record(data, broken):
    path, folder = broken
    it = iter(_dataset(data, path, image_folder=folder, batch_size=4, shuffle=False, strict=True))
    with pytest.raises(pipeline.DataError, match=r"broken\.json: record 1 \(id 'r_missing'\).*missing\.png"):
        _take(it)


def test_bad_records_fail_at_construction(data, tmp_path):
    good = records.load_records(data.paths["stage2"])[:3]
    bad = _write_records(tmp_path / "bad.json", good + [{"id": "nope", "conversations": []}])
    with pytest.raises(records.RecordError, match=r"record 3 \(id 'nope'\)"):
        _dataset(data, bad)
    absolute = dict(good[0], id="abs", image="/etc/passwd") if "image" in good[0] else None
    absolute = absolute or {"id": "abs", "image": "/etc/passwd", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(records.RecordError, match=r"id 'abs'.*is absolute"):
        _dataset(data, _write_records(tmp_path / "abs.json", good + [absolute]))
    with pytest.raises(ValueError, match="shard_index"):
        _dataset(data, shard_index=2, shard_count=2)


# ----------------------------------------------------------------------- LLaVA-NeXT (anyres)

NEXT_TILE, NEXT_GRID = 28, 2
NEXT_PINPOINTS = ((28, 56), (56, 28), (56, 56))
NEXT_SIZES = ((28, 56), (56, 28), (56, 56), (40, 90), (20, 20))


@pytest.fixture(scope="module")
def next_data(data):
    """Varied-size images (wide, tall, square, odd, smaller than a tile) and LLaVA-NeXT settings for them."""
    from llava_jax import anyres

    paths = synthetic.build(data.root / "syn_next", num_train=16, num_val=4, image_size=56, sizes=NEXT_SIZES)
    cfg = image_lib.ImageProcessorConfig(size=NEXT_TILE, crop_size=NEXT_TILE, pad_to_square=False,
                                         grid_pinpoints=NEXT_PINPOINTS)
    geometry = anyres.AnyresConfig(NEXT_TILE, NEXT_GRID, NEXT_PINPOINTS)
    return types.SimpleNamespace(paths=paths, tok=Tokenizer(paths["tokenizer"]), cfg=cfg, geometry=geometry)


def _next_dataset(nd, path=None, **kwargs):
    args = dict(geometry=nd.geometry, image_token_index=nd.tok.vocab_size, max_length=256, batch_size=4, seed=0,
                num_epochs=1, shard_index=0, shard_count=1, max_images_per_sample=2)
    args.update(kwargs)
    return pipeline.make_dataset(path or nd.paths["stage2"], nd.paths["image_folder"], nd.tok, "vicuna_v1", nd.cfg,
                                 **args)


def _model_config(nd):
    from llava_jax.config import LlavaConfig, VisionConfig

    return LlavaConfig(vision=VisionConfig(image_size=NEXT_TILE, patch_size=NEXT_TILE // NEXT_GRID),
                       image_token_index=nd.tok.vocab_size, anyres=nd.geometry)


def test_anyres_rows_hold_each_images_tiles_and_the_models_image_index(data, next_data):
    """Every row as the model's own host-side placement (models.llava.place_images) lays it out, from the
    images preprocessed on their own: token counts by size, tiles in order, exact-zero padding slots."""
    from llava_jax.models.llava import place_images

    nd, mcfg = next_data, _model_config(next_data)
    by_id = {r["id"]: r for r in records.load_records(nd.paths["stage2"])}
    slots = 2 * nd.geometry.max_patches
    seen_sizes = set()
    for batch, ids in _take(iter(_next_dataset(nd, shuffle=False))):
        assert batch["pixel_values"].shape[1:] == (slots, NEXT_TILE, NEXT_TILE, 3)
        assert batch["image_index"].shape == batch["input_ids"].shape
        for row, rid in enumerate(ids):
            if rid is None:  # the epoch's last batch, filled up with empty rows
                assert not batch["attention_mask"][row].any() and not batch["image_mask"][row].any()
                continue
            rec = by_id[rid]
            images = [image_lib.load_image(os.path.join(nd.paths["image_folder"], rel))
                      for rel in records.record_images(rec)]
            sizes = [(im.height, im.width) for im in images]
            seen_sizes.update(sizes)
            counts = [mcfg.image_layout(s).num_tokens for s in sizes]
            r = templates.render(rec["conversations"], "vicuna_v1", nd.tok, image_token_index=nd.tok.vocab_size,
                                 num_image_tokens=counts, max_length=256)
            n = len(r.input_ids)
            np.testing.assert_array_equal(batch["input_ids"][row, :n], r.input_ids)
            np.testing.assert_array_equal(batch["labels"][row, :n], r.labels)
            pixels, index = place_images(batch["input_ids"][row:row + 1], [image_lib.preprocess(im, nd.cfg)
                                                                           for im in images], mcfg, sizes, slots)
            if images:
                np.testing.assert_array_equal(batch["pixel_values"][row], pixels[0])
                np.testing.assert_array_equal(batch["image_index"][row], index[0])
            else:
                assert (batch["pixel_values"][row] == 0).all() and (batch["image_index"][row] == 0).all()
            tiles = sum(mcfg.image_layout(s).num_patches for s in sizes)
            np.testing.assert_array_equal(batch["image_mask"][row], np.arange(slots) < tiles)
    assert seen_sizes == set(NEXT_SIZES)


def test_anyres_truncation_drops_whole_images_counted_by_their_size(next_data, tmp_path):
    nd = next_data
    recs = [r for r in records.load_records(nd.paths["stage2"]) if "image" in r][:2]
    two = {"id": "two", "image": [recs[0]["image"], recs[1]["image"]], "conversations": [
        {"from": "human", "value": "<image>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And here?\n<image>"}, {"from": "gpt", "value": "blue"}]}
    path = _write_records(tmp_path / "two.json", [two])
    full = _take(iter(_next_dataset(nd, path, batch_size=1)))[0][0]
    is_image = full["input_ids"][0] == nd.tok.vocab_size
    second = int(np.flatnonzero(is_image[1:] & ~is_image[:-1])[-1]) + 1  # where the second image's run starts
    cut = _take(iter(_next_dataset(nd, path, batch_size=1, max_length=second + 3)))[0][0]
    assert int(cut["attention_mask"][0].sum()) == second
    first_tiles = [image_lib.num_patches(image_lib.load_image(os.path.join(nd.paths["image_folder"], rel)).size[::-1],
                                         nd.cfg) for rel in two["image"]]
    assert int(cut["image_mask"][0].sum()) == first_tiles[0] and int(full["image_mask"][0].sum()) == sum(first_tiles)
    np.testing.assert_array_equal(cut["pixel_values"][0, :first_tiles[0]], full["pixel_values"][0, :first_tiles[0]])
    assert (cut["pixel_values"][0, first_tiles[0]:] == 0).all()


def test_flat_geometry_gives_the_num_image_tokens_batches(data):
    from llava_jax import anyres

    flat = anyres.AnyresConfig.flat(CROP, 2)  # 4 tokens an image: N_IMG
    a = _take(iter(_dataset(data, num_image_tokens=N_IMG, max_images_per_sample=2)))
    b = _take(iter(_dataset(data, num_image_tokens=None, geometry=flat, max_images_per_sample=2)))
    _assert_same(a, b)
    with_index = _take(iter(_dataset(data, num_image_tokens=None, geometry=flat, image_index=True)), 1)[0][0]
    ids = with_index["input_ids"]
    expected = np.where(ids == data.image_token, np.cumsum(ids == data.image_token, axis=1) - 1, 0)
    np.testing.assert_array_equal(with_index["image_index"], expected)  # the features in order


def test_anyres_resume_mid_epoch_is_exact(next_data):
    ds = _next_dataset(next_data, num_epochs=2)
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    rest = _take(it)
    it2 = iter(ds)
    it2.set_state(state)
    _assert_same(rest, _take(it2))


def test_geometry_and_image_settings_must_agree(data, next_data):
    from llava_jax import anyres

    other = anyres.AnyresConfig(NEXT_TILE, NEXT_GRID, ((28, 56), (56, 28)))
    with pytest.raises(ValueError, match="pinpoints"):
        _next_dataset(next_data, geometry=other)
    with pytest.raises(ValueError, match="without grid_pinpoints"):
        _next_dataset(next_data, geometry=anyres.AnyresConfig.flat(NEXT_TILE, NEXT_GRID))
    with pytest.raises(ValueError, match="exactly one"):
        _dataset(data, geometry=anyres.AnyresConfig.flat(CROP, 2))
