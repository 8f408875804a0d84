"""Packed input pipeline (`make_dataset(..., packing=True)`): every sample exactly once an epoch, each
segment equal to the same sample unpacked (ids, labels, positions, images in order; anyres tiles and
image_index as the model places them), rows within their tokens and image slots, deterministic, exact
resume, tight packing of a long-tailed mix, and the same train-step loss as the unpacked samples."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llava_jax.data import image as image_lib
from llava_jax.data import pack, pipeline, records, sources
from tests._seeds import fresh_seed
from tests.test_data_pipeline import (CROP, _assert_same, _dataset, _model_config, _next_dataset, _take, data,  # noqa: F401
                                      multi, next_data)


def _by_id(batches):
    """{record id: (input_ids, labels, pixels [n, ...], image_mask count)} of unpacked batches' rows."""
    out = {}
    for batch, ids in batches:
        for row, rid in enumerate(ids):
            if rid is not None:
                n, m = int(batch["attention_mask"][row].sum()), int(batch["image_mask"][row].sum())
                out[rid] = (batch["input_ids"][row, :n], batch["labels"][row, :n], batch["pixel_values"][row, :m])
    return out


def _segments(batch, ids):
    """[(record id, row, start, length)] of a packed batch's samples in order, checking the rows' layout."""
    out = []
    for row, row_ids in enumerate(ids):
        seg = batch["segment_ids"][row]
        lengths = np.bincount(seg, minlength=len(row_ids) + 1)[1:]
        assert len(lengths) == len(row_ids), "segments are numbered 1.. in row order, one a sample"
        at = 0
        for k, (rid, n) in enumerate(zip(row_ids, lengths)):
            np.testing.assert_array_equal(seg[at:at + n], k + 1)
            np.testing.assert_array_equal(batch["positions"][row, at:at + n], np.arange(n))
            out.append((rid, row, at, int(n)))
            at += n
        assert (seg[at:] == 0).all() and (batch["positions"][row, at:] == 0).all()
        np.testing.assert_array_equal(batch["attention_mask"][row], seg != 0)
    return out


def _check_packed_equals_unpacked(packed, unpacked):
    """Every unpacked sample is one segment of the packed epoch, with the same ids, labels and images."""
    seen = []
    for batch, ids in packed:
        used = np.zeros(len(ids), int)  # image slots taken so far, by row
        for rid, row, at, n in _segments(batch, ids):
            want_ids, want_labels, want_pixels = unpacked[rid]
            np.testing.assert_array_equal(batch["input_ids"][row, at:at + n], want_ids)
            np.testing.assert_array_equal(batch["labels"][row, at:at + n], want_labels)
            m = len(want_pixels)
            np.testing.assert_array_equal(batch["pixel_values"][row, used[row]:used[row] + m], want_pixels)
            used[row] += m
            seen.append(rid)
        images = batch["image_mask"].sum(1)
        np.testing.assert_array_equal(images, used)
        # A row's images fill its first slots, and unused slots are zero.
        np.testing.assert_array_equal(batch["image_mask"], np.arange(batch["image_mask"].shape[1]) < images[:, None])
        assert (batch["pixel_values"][~batch["image_mask"]] == 0).all()
    assert sorted(seen) == sorted(unpacked), "every sample exactly once"
    return seen


@pytest.mark.parametrize("max_length, row_length", [(256, None), (52, None), (52, 156)])
def test_packed_epoch_holds_every_sample_once_as_unpacked(data, max_length, row_length):
    """At 52 tokens samples are truncated (and some emptied): packed and unpacked cut and count them alike,
    also in rows of 156 (`row_length`: samples still truncated at 52, three rows' worth sharing one)."""
    unpacked_it = iter(_dataset(data, max_length=max_length))
    unpacked = _by_id(_take(unpacked_it))
    ds = _dataset(data, max_length=max_length, packing=True, num_epochs=2, row_length=row_length)
    it = iter(ds)
    packed = _take(it)
    assert len(packed) == 2 * ds.batches_per_epoch
    first = _check_packed_equals_unpacked(packed[:ds.batches_per_epoch], unpacked)
    second = _check_packed_equals_unpacked(packed[ds.batches_per_epoch:], unpacked)
    assert first != second, "each epoch shuffles the rows"
    assert all(b["input_ids"].shape[1] == (row_length or max_length) for b, _ in packed)
    if row_length:
        short = _dataset(data, max_length=max_length, packing=True)
        assert ds.batches_per_epoch < short.batches_per_epoch, "longer rows hold more samples"
        with pytest.raises(ValueError, match="row_length=51: a packed row's length, for packing=True and at least"):
            _dataset(data, max_length=max_length, packing=True, row_length=51)
        with pytest.raises(ValueError, match="row_length=156: a packed row's length, for packing=True"):
            _dataset(data, max_length=max_length, row_length=156)
    assert it.stats.skipped == {k: 2 * n for k, n in unpacked_it.stats.skipped.items()}
    assert it.stats.samples == 2 * unpacked_it.stats.samples
    if max_length == 52:
        assert unpacked_it.stats.skipped and unpacked, "the short max_length must truncate some samples to nothing"
    else:
        rows = ds.batches_per_epoch * 4
        assert rows < len(unpacked) / 2, f"{rows} rows for {len(unpacked)} samples: packing must pack"


def test_rows_keep_within_their_image_slots_in_placeholder_order(data, multi):
    """Two-image records with max_images_per_row=2: never more images a row than slots, each in its order."""
    path, recs = multi
    unpacked = _by_id(_take(iter(_dataset(data, path, batch_size=3, shuffle=False, max_images_per_sample=2))))
    batches = _take(iter(_dataset(data, path, batch_size=3, max_images_per_sample=2, packing=True,
                                  max_images_per_row=2)))
    assert batches[0][0]["pixel_values"].shape[1] == 2
    _check_packed_equals_unpacked(batches, unpacked)
    rows = [r for _, ids in batches for r in ids if r]
    assert len(rows) == 2 and not any({"two", "front"} <= set(r) for r in rows)  # 4 images: never one row
    with pytest.raises(ValueError, match="max_images_per_row=1 is less than max_images_per_sample=2"):
        _dataset(data, path, max_images_per_sample=2, packing=True, max_images_per_row=1)
    with pytest.raises(ValueError, match="packing and group_by_modality_length"):
        _dataset(data, packing=True, group_by_modality_length=True)


def test_anyres_packed_rows_are_placed_as_the_model_places_them(next_data):
    """LLaVA-NeXT: each packed row's tiles and image_index are models.llava.place_images' of the row's own
    images in placeholder order (one feature table a row, whichever sample holds the image)."""
    from llava_jax.models.llava import place_images

    nd, mcfg = next_data, _model_config(next_data)
    unpacked = _by_id(_take(iter(_next_dataset(nd, shuffle=False))))
    packed = _take(iter(_next_dataset(nd, packing=True)))
    by_id = {r["id"]: r for r in records.load_records(nd.paths["stage2"])}
    _check_packed_equals_unpacked(packed, unpacked)
    slots = packed[0][0]["pixel_values"].shape[1]
    assert slots == pipeline.images_per_row(nd.geometry, 256, 2, None) * nd.geometry.max_patches
    for batch, ids in packed:
        for row, row_ids in enumerate(ids):
            images = [image_lib.load_image(os.path.join(nd.paths["image_folder"], rel))
                      for rid in row_ids for rel in records.record_images(by_id[rid])]
            if not images:
                continue
            pixels, index = place_images(batch["input_ids"][row:row + 1], [image_lib.preprocess(im, nd.cfg)
                                                                           for im in images], mcfg,
                                         [(im.height, im.width) for im in images], slots)
            np.testing.assert_array_equal(batch["pixel_values"][row], pixels[0])
            np.testing.assert_array_equal(batch["image_index"][row], index[0])


class _SizesUnknown(sources.Source):
    """A source's records and images with no header sizes (as loose files on gs://): anyres plans at the bound."""

    def __init__(self, source):
        self.source, self.name = source, source.name

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return sources.Example(self.source[index].record, self.source[index].images, None)

    def record_stats(self):
        return self.source.record_stats()


def test_anyres_images_are_planned_at_their_exact_counts_and_pack_tighter(next_data):
    """LLaVA-NeXT images of varied sizes: each record is planned at exactly the length its loaded row has
    (each image's count from its header's size), never more than with every image at max_tokens and less for
    most; rows then pack fewer, every packed row within max_length and every sample once as unpacked. A source
    that cannot give sizes plans at the bound and still packs every sample."""
    nd = next_data
    source = sources.open_source(nd.paths["stage2"], nd.paths["image_folder"])
    args = dict(image_token_index=nd.tok.vocab_size, max_length=256, max_images=2)
    exact, images = pipeline.planned_sizes(source, nd.tok, "vicuna_v1", nd.geometry, **args)
    bound, images_b = pipeline.planned_sizes(_SizesUnknown(source), nd.tok, "vicuna_v1", nd.geometry, **args)
    np.testing.assert_array_equal(images, images_b)
    unpacked_it = iter(_next_dataset(nd, shuffle=False, max_length=256))
    unpacked = _by_id(_take(unpacked_it))
    assert not unpacked_it.stats.skipped
    ids = [source[i].record["id"] for i in range(len(source))]
    np.testing.assert_array_equal(exact, [len(unpacked[rid][0]) for rid in ids])  # exact: the loaded length
    has_image = images > 0
    assert (exact <= bound).all() and (exact[has_image] < bound[has_image]).mean() > 0.5
    np.testing.assert_array_equal(exact[~has_image], bound[~has_image])
    max_length, per_row = 192, 4  # rows that two or three samples fill, image slots that do not bind first
    rows = {name: pipeline.pack_rows(np.minimum(t, max_length), images, np.arange(len(t)), max_length=max_length,
                                     max_images=per_row) for name, t in (("exact", exact), ("bound", bound))}
    assert len(rows["exact"]) < len(rows["bound"]), {k: len(v) for k, v in rows.items()}
    # Packed ArrayRecord shards read each size from the image bytes they carry: the same plan.
    shards = pack.pack(nd.paths["stage2"], nd.paths["image_folder"], os.path.join(nd.paths["out_dir"], "packed_plan"))
    assert shards["num_records"] == len(source)
    np.testing.assert_array_equal(pipeline.planned_sizes(sources.PackedSource(os.path.join(
        nd.paths["out_dir"], "packed_plan")), nd.tok, "vicuna_v1", nd.geometry, **args)[0], exact)
    truncated = _by_id(_take(iter(_next_dataset(nd, shuffle=False, max_length=max_length))))
    filled = {}
    for name, src in (("exact", source), ("bound", _SizesUnknown(source))):
        ds = _next_dataset(nd, src, max_length=max_length, max_images_per_row=per_row, packing=True)
        batches = _take(iter(ds))
        assert len(batches) == ds.batches_per_epoch
        assert all(b["attention_mask"].sum(1).max() <= max_length == b["input_ids"].shape[1] for b, _ in batches)
        _check_packed_equals_unpacked(batches, truncated)
        filled[name] = sum(bool(row) for _, ids in batches for row in ids)
    assert filled == {k: len(v) for k, v in rows.items()}, "the pipeline's rows are the planner's"


def test_packed_same_seed_same_batches_and_resume_mid_epoch_is_exact(data):
    a = _take(iter(_dataset(data, packing=True, num_epochs=2, max_length=96)))
    it = iter(_dataset(data, packing=True, num_epochs=2, max_length=96))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    rest = _take(it)  # crosses into the second epoch
    fresh = iter(_dataset(data, packing=True, num_epochs=2, max_length=96))
    fresh.set_state(state)
    resumed = _take(fresh)
    assert len(rest) > 3 and fresh.stats == it.stats
    for got, want in zip([*a[:3], *resumed], a, strict=True):
        assert got[1] == want[1]
        assert got[0].keys() == want[0].keys()
        for k in got[0]:
            np.testing.assert_array_equal(got[0][k], want[0][k])
    other = _take(iter(_dataset(data, packing=True, max_length=96, seed=1)))
    assert [ids for _, ids in other] != [ids for _, ids in a[:len(other)]]


def test_packed_worker_processes_give_the_same_batches(data):
    """The packed rows travel to worker processes (the loader pickles them) and come back the same."""
    reference = _take(iter(_dataset(data, packing=True, max_length=96, batch_size=2)))
    it = iter(_dataset(data, packing=True, max_length=96, batch_size=2, worker_count=2))
    try:
        _assert_same(_take(it), reference)
    finally:
        it.close()


def test_first_fit_fills_rows_of_a_long_tailed_mix():
    """A long-tailed mix (lognormal text, 70% with a 576-token image, some over max_length): >= 90% of the
    tokens of every full batch of 64 rows are real (about 96% of all); rows within tokens and images; every
    record once."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n, max_length, max_images, batch = 4000, 2048, 3, 64  # LLaVA-1.5 stage 2 trains global batches of 128 rows
    images = (rng.random(n) < 0.7).astype(np.int64)
    tokens = np.minimum(np.round(rng.lognormal(4.5, 1.0, n)).astype(np.int64) + 576 * images, max_length)
    rows = pipeline.pack_rows(tokens, images, rng.permutation(n), max_length=max_length, max_images=max_images)
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))
    used = np.array([tokens[r].sum() for r in rows])
    assert used.max() <= max_length and max(images[r].sum() for r in rows) <= max_images
    full = len(rows) // batch * batch  # the epoch's batches of rows, shuffled as epoch_plan does
    per_batch = rng.permutation(used)[:full].reshape(-1, batch).sum(1) / (batch * max_length)
    assert per_batch.min() >= 0.9, f"seed {seed}: worst batch {per_batch.min():.3f} real tokens"
    assert used.sum() / (len(rows) * max_length) >= 0.94, f"seed {seed}"
    # Images bound rows too: one image a row leaves text-only samples to fill the rest.
    one = pipeline.pack_rows(tokens, images, np.arange(n), max_length=max_length, max_images=1)
    assert max(images[r].sum() for r in one) == 1


@pytest.mark.slow(seconds=10)
def test_packed_batch_gives_the_unpacked_loss_through_the_train_step(data):
    """The first packed batch of the real pipeline and the same samples unpacked (one a row), through the
    real train step (float32, tiny random model): the same loss and supervised-token count."""
    import jax
    import optax

    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.train.optimizer import split_params
    from llava_jax.train.step import create_state, make_train_step, to_microbatches
    from tests._params import host_random_params

    seed = fresh_seed()
    batch, ids = _take(iter(_dataset(data, packing=True, max_length=128, batch_size=2)), 1)[0]
    samples = _by_id(_take(iter(_dataset(data, max_length=128))))
    flat = [rid for row in ids for rid in row]
    t = max(len(samples[r][0]) for r in flat)
    unpacked = {"input_ids": np.zeros((len(flat), t), np.int32), "labels": np.full((len(flat), t), -100, np.int32),
                "attention_mask": np.zeros((len(flat), t), np.int32),
                "pixel_values": np.zeros((len(flat), 1, CROP, CROP, 3), np.float32)}
    for b, rid in enumerate(flat):
        ids_, labels, pixels = samples[rid]
        unpacked["input_ids"][b, :len(ids_)], unpacked["labels"][b, :len(ids_)] = ids_, labels
        unpacked["attention_mask"][b, :len(ids_)] = 1
        unpacked["pixel_values"][b, :len(pixels)] = pixels
    packed = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values", "segment_ids",
                                    "positions")}
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                          image_size=CROP, patch_size=14),
                      text=TextConfig(vocab_size=data.image_token + 1, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8),
                      image_token_index=data.image_token, vision_feature_layer=-1, attention="xla")
    params, frozen = split_params(host_random_params(cfg, seed), ["(projector|language_model)/.*"])
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(cfg, tx, optax.constant_schedule(0.0)))
    (_, m_ref), (_, m) = (step(create_state(params, frozen, tx), to_microbatches(b, 1)) for b in (unpacked, packed))
    assert int(m["supervised_tokens"]) == int(m_ref["supervised_tokens"]) > 0
    assert abs(float(m["loss"]) - float(m_ref["loss"])) < 1e-5, (seed, float(m["loss"]), float(m_ref["loss"]))


def test_packing_config_is_checked_and_compile_only_gets_a_packed_batch():
    """Bad data.max_images_per_row, or packing with length grouping: errors name the field. The compile-only batch of a packed run
    carries segment_ids and positions and the pipeline's image slots a row."""
    from llava_jax.parallel.mesh import make_mesh
    from llava_jax.train import aot
    from llava_jax.train.validate import ConfigError, validate
    from tests._train_config import get_config

    c = get_config()
    c.data.packing = True
    validate(c)
    for field, value, message in (
            ("group_by_modality_length", True, r"config.data.packing: True with data.group_by_modality_length=True"),
            ("max_images_per_row", -1, r"config.data.max_images_per_row: -1; expected an integer >= 0")):
        bad = get_config()
        bad.data.packing = True
        bad.data[field] = value
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    for packing, row_length, message in (
            (True, c.stages[0].max_length - 1, r"config.stages\[0\].row_length: \d+; expected 0 \(rows of max_length\)"),
            (False, 4 * c.stages[0].max_length, r"config.stages\[0\].row_length: \d+ without data.packing")):
        bad = get_config()
        bad.data.packing = packing
        bad.stages[0].row_length = row_length
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    cfg = aot.model_config(c)
    images = pipeline.images_per_row(cfg.geometry, 128, 1, 0)
    assert images == 128 // cfg.geometry.tile_tokens
    batch = aot.abstract_batch(cfg, 2, 4, 128, make_mesh(**c.mesh.to_dict()), max_images=images, packed=True)
    assert batch["segment_ids"].shape == batch["positions"].shape == batch["input_ids"].shape == (2, 4, 128)
    assert batch["pixel_values"].shape[2] == images
    assert "segment_ids" not in aot.abstract_batch(cfg, 2, 4, 128, make_mesh(**c.mesh.to_dict()))
