"""Training on many-image and video records (LLaVA-OneVision's and LLaVA-Video-178K's formats): the pipeline's
batches equal what `models.llava.place_images` builds from the same images and frames (the model path is checked
against transformers in test_model_onevision.py), resuming mid-epoch equals no interruption, a bad video is a
counted skip, and held-out evaluation batches equal the pipeline's. That a tiny OneVision-geometry model learns the
synthetic multi-image and video tasks well above its blind baseline is test_train_media.py (the real job)."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from llava_jax import anyres
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data import image as image_lib
from llava_jax.data import pipeline, records, synthetic
from llava_jax.data import video as video_lib
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.models.llava import Llava, init_params, place_images
from tests._seeds import fresh_seed

TILE, GRID, FRAMES = 28, 2, 4
HIDDEN = 64
PINPOINTS = ((28, 28), (28, 56), (56, 28), (56, 56))
# anyres_max_1: a lone 56 x 56 image's 4 x 4 grid is downscaled to 2 x 2, so that weights are not all one-hot.
GEOMETRY = anyres.AnyresConfig(TILE, GRID, PINPOINTS, max_tiles=1, untiled_multi=True, video="bilinear")
IMAGE_CFG = image_lib.ImageProcessorConfig(size=TILE, crop_size=TILE, pad_to_square=False, grid_pinpoints=PINPOINTS,
                                           onevision=True)


def model_config(tok: Tokenizer) -> LlavaConfig:
    """A tiny OneVision-geometry LLaVA sized to the synthetic tokenizer (image and video tokens after its vocab)."""
    vocab = -(-(tok.vocab_size + 2) // 8) * 8
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=TILE,
                            patch_size=14),
        text=TextConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=HIDDEN // 4, max_position_embeddings=256, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id, model_type="qwen2"),
        anyres=GEOMETRY, image_token_index=tok.vocab_size, video_token_index=tok.vocab_size + 1,
        vision_feature_layer=-1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A few synthetic video and multi-image records, plus a lone 56 x 56 image (tiled, downscaled) and a
    record with a video and an image together."""
    root = str(tmp_path_factory.mktemp("media"))
    files = synthetic.build_media(root, num_train=10, num_val=0, image_size=TILE, num_frames=FRAMES,
                                  seed=fresh_seed())
    recs = json.load(open(files["train"]))
    synthetic._save_png(synthetic._one_shape(np.random.default_rng(0), 56, "circle", "red"),
                        os.path.join(root, "images", "big.png"))
    recs.append({"id": "lone", "image": "images/big.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a circle"}]})
    recs.append({"id": "three", "image": ["images/big.png", "images/big.png", "images/big.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nAnd <image>\nHow many?"}, {"from": "gpt", "value": "3"}]})
    recs.append({"id": "both", "image": "images/big.png", "video": recs[0]["video"], "conversations": [
        {"from": "human", "value": "<video>\nand <image>\nSame?"}, {"from": "gpt", "value": "yes"}]})
    data = os.path.join(root, "mixed.json")
    with open(data, "w") as f:
        json.dump(recs, f)
    return dict(files, data=data, records={r["id"]: r for r in recs}, tok=Tokenizer(files["tokenizer"]))


def _dataset(media, data=None, **kw):
    tok = media["tok"]
    cfg = model_config(tok)
    args = dict(geometry=GEOMETRY, image_token_index=cfg.image_token_index, video_token_index=cfg.video_token_index,
                num_frames=FRAMES, max_length=160, batch_size=3, shard_index=0, shard_count=1, seed=7,
                max_images_per_sample=3, num_epochs=1)
    return pipeline.make_dataset(data or media["data"], media["image_folder"], tok, "vicuna_v1", IMAGE_CFG,
                                 **(args | kw))


def _expected(media, batch, ids):
    """place_images' pixel_values and (index, weights) for the rows' records, from the records' files."""
    cfg = model_config(media["tok"])
    video_cfg = pipeline.video_settings(IMAGE_CFG, GEOMETRY, FRAMES)
    images, sizes, videos, per_row = [], [], [], []
    for record_id in ids:
        if record_id is None:
            per_row.append(0)
            continue
        rec = media["records"][record_id]
        rels = records.record_images(rec)
        opened = [image_lib.load_image(os.path.join(media["image_folder"], r)) for r in rels]
        tiled = image_lib.is_tiled(IMAGE_CFG, len(opened))
        images += [image_lib.preprocess(im, IMAGE_CFG, tiled) for im in opened]
        sizes += [(im.height, im.width) for im in opened]
        per_row.append(len(opened))
        if "video" in rec:
            # Exactly as inference reads a video (the video processor's resize and fused normalisation).
            videos.append(video_lib.load_video(os.path.join(media["image_folder"], rec["video"]), video_cfg, FRAMES))
    return place_images(batch["input_ids"], images, cfg, sizes, batch["pixel_values"].shape[1], videos=videos,
                        images_per_row=per_row)


def test_video_and_multi_image_batches_equal_place_images(media):
    it = iter(_dataset(media))
    seen, mixed = set(), False
    for batch in it:
        # Several images untiled (a slot each), a lone one tiled: 3 images need no more than one image's slots.
        assert batch["pixel_values"].shape[1] == max(GEOMETRY.max_patches, 3) + FRAMES
        ids = list(it.last_record_ids)
        seen.update(i for i in ids if i is not None)
        assert batch["image_index"].shape == batch["image_weight"].shape == (*batch["input_ids"].shape, 4)
        pixels, (index, weights) = _expected(media, batch, ids)
        np.testing.assert_array_equal(batch["pixel_values"], pixels, err_msg=str(ids))
        np.testing.assert_array_equal(batch["image_index"], index, err_msg=str(ids))
        np.testing.assert_array_equal(batch["image_weight"], weights, err_msg=str(ids))
        # Slots hold real tiles or frames exactly where image_mask says.
        used = np.any(pixels != 0, axis=(2, 3, 4))
        assert np.all(batch["image_mask"] >= used)
        mixed |= bool(np.any((batch["image_weight"] > 0) & (batch["image_weight"] < 1)))
    assert seen == set(media["records"]) and it.stats.num_skipped == 0
    assert mixed  # the lone 56 x 56 image was downscaled and video frames pooled: tokens mixing rows


def test_video_marked_as_image_expands_to_the_video_tokens(media):
    """LLaVA-Video-178K writes the video's marker as <image>: it takes the video's frames, as the original's
    train.py hands them to that marker."""
    tok, cfg = media["tok"], model_config(media["tok"])
    rec = next(r for r in media["records"].values() if r.get("qtype") == "frame")
    assert "<image>" in rec["conversations"][0]["value"] and "image" not in rec
    it = iter(_dataset(media, batch_size=1, shuffle=False))
    for batch in it:
        if it.last_record_ids == [rec["id"]]:
            break
    assert int(np.sum(batch["input_ids"] == cfg.video_token_index)) == GEOMETRY.video_tokens(FRAMES)
    assert int(np.sum(batch["input_ids"] == cfg.image_token_index)) == 0
    assert int(batch["image_mask"].sum()) == FRAMES
    del tok


def test_resume_mid_epoch_with_video_records_equals_no_interruption(media):
    reference = []
    it = iter(_dataset(media, num_epochs=2, batch_size=2))
    for batch in it:
        reference.append((batch, list(it.last_record_ids)))
    resumed = iter(_dataset(media, num_epochs=2, batch_size=2))
    head = [next(resumed) for _ in range(3)]
    state = json.loads(json.dumps(resumed.get_state()))
    fresh = iter(_dataset(media, num_epochs=2, batch_size=2))
    fresh.set_state(state)
    rest = [(b, list(fresh.last_record_ids)) for b in fresh]
    assert len(head) + len(rest) == len(reference)
    for (x, ids_x), (y, ids_y) in zip(rest, reference[3:]):
        assert ids_x == ids_y
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_missing_or_corrupt_video_is_a_counted_skip(media, tmp_path):
    folder = media["image_folder"]
    with open(os.path.join(folder, "videos", "corrupt.mp4"), "wb") as f:
        f.write(b"not a video at all")
    turns = [{"from": "human", "value": "<video>\nWhich?"}, {"from": "gpt", "value": "first"}]
    recs = [{"id": "gone", "video": "videos/missing.mp4", "conversations": turns},
            {"id": "bad", "video": "videos/corrupt.mp4", "conversations": turns},
            media["records"]["lone"]]
    data = str(tmp_path / "bad.json")
    with open(data, "w") as f:
        json.dump(recs, f)
    it = iter(_dataset(media, data=data, shuffle=False))
    batches = list(it)
    assert it.stats.skipped == {"video": 2} and it.stats.samples == 1
    assert {p[0] for p in it.stats.problems} == {"gone", "bad"}
    assert all("missing.mp4" in m or "corrupt.mp4" in m for _, _, m in it.stats.problems)
    assert len(batches) == 1 and batches[0]["attention_mask"][:2].sum() == 0  # the skipped rows are empty
    with pytest.raises(pipeline.DataError, match="id .gone.*missing.mp4.: no such file"):
        list(iter(_dataset(media, data=data, shuffle=False, strict=True)))


def test_video_path_outside_the_folder_is_refused_when_read(media, tmp_path):
    recs = [{"id": "out", "video": "../elsewhere.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhich?"}, {"from": "gpt", "value": "first"}]}]
    data = str(tmp_path / "out.json")
    with open(data, "w") as f:
        json.dump(recs, f)
    with pytest.raises(records.RecordError, match="escapes the image folder"):
        _dataset(media, data=data)


@pytest.mark.slow(seconds=30)
def test_packing_counts_a_videos_tokens_and_frames(media, tmp_path):
    """Packed rows hold each sample's tokens, tiles and frames; every sample lands in a row whole."""
    tok = media["tok"]
    source = pipeline.sources_lib.open_source(media["data"], media["image_folder"])
    cfg = model_config(tok)
    tokens, counts = pipeline.planned_sizes(source, tok, "vicuna_v1", GEOMETRY, image_token_index=cfg.image_token_index,
                                            max_length=160, max_images=3, num_frames=FRAMES,
                                            video_token_index=cfg.video_token_index)
    unpacked = {}
    it = iter(_dataset(media, batch_size=1, shuffle=False))
    for batch in it:
        unpacked[it.last_record_ids[0]] = int(batch["attention_mask"].sum())
    for i in range(len(source)):
        rec = source[i].record
        assert tokens[i] == unpacked[rec["id"]], rec["id"]  # exact: header sizes, untiled images, frames
        video = pipeline.video_images(GEOMETRY, FRAMES) if "video" in rec else 0
        assert counts[i] == len(records.record_images(rec)) + video
    # Packed == each sample alone: every token's embedding (vision features gathered through image_index and
    # image_weight from the row's slots, which mix tiled and untiled samples' images and videos' frames) equals
    # the one it has in its own unpacked row.
    params = nn.unbox(init_params(cfg, jax.random.key(fresh_seed())))
    embed = jax.jit(lambda b: Llava(cfg).apply({"params": params}, b["input_ids"], b["pixel_values"],
                                               (b["image_index"], b["image_weight"]), method=Llava.embed))
    alone = {}
    for batch in (it := iter(_dataset(media, batch_size=1, shuffle=False))):
        alone[it.last_record_ids[0]] = np.asarray(embed(batch))[0, :unpacked[it.last_record_ids[0]]]
    # Alone, the lone (tiled) image and the three untiled ones share a row: two tilings in one feature table.
    pair = str(tmp_path / "pair.json")
    with open(pair, "w") as f:
        json.dump([media["records"]["three"], media["records"]["lone"]], f)
    samples, shared, tilings = 0, 0, False
    for data in (media["data"], pair):
        it = iter(_dataset(media, data=data, packing=True, batch_size=2, max_length=256))
        for batch in it:
            samples += sum(len(row) for row in it.last_record_ids)
            got = np.asarray(embed(batch))
            for b, row in enumerate(it.last_record_ids):
                shared += len(row) > 1
                tilings |= {"lone", "three"} <= set(row)
                for k, record_id in enumerate(row):
                    at = batch["segment_ids"][b] == k + 1
                    assert int(np.sum(at)) == unpacked[record_id]
                    np.testing.assert_allclose(got[b, at], alone[record_id], rtol=1e-5, atol=1e-6, err_msg=record_id)
        assert it.stats.num_skipped == 0
    assert samples == len(source) + 2 and shared and tilings


def test_compile_only_batch_and_config_know_video():
    """The AOT abstract batch of a OneVision model carries image_index and image_weight [A, b, T, 4] and the
    frames' slots after the images'; data.num_frames below 1 is a ConfigError naming the field."""
    import types

    from llava_jax.parallel.mesh import make_mesh
    from llava_jax.train import aot
    from llava_jax.train.validate import ConfigError, validate
    from tests._train_config import get_config

    cfg = model_config(types.SimpleNamespace(vocab_size=100, bos_id=1, eos_id=2))
    mesh = make_mesh(**get_config().mesh.to_dict())
    batch = aot.abstract_batch(cfg, 2, 4, 64, mesh, max_images=3, num_frames=FRAMES)
    assert batch["image_index"].shape == batch["image_weight"].shape == (2, 4, 64, 4)
    # Up to 3 images: untiled when several (a slot each), a lone one tiled up to max_patches; then the frames.
    assert GEOMETRY.max_patches > 3
    assert batch["pixel_values"].shape[2] == max(GEOMETRY.max_patches, 3) + FRAMES
    packed = aot.abstract_batch(cfg, 2, 4, 64, mesh, max_images=3, packed=True)  # a row's samples each may tile
    assert packed["pixel_values"].shape[2] == 3 * GEOMETRY.max_patches
    bad = get_config()
    bad.data.num_frames = 0
    with pytest.raises(ConfigError, match=r"config.data.num_frames: 0; expected a number >= 1"):
        validate(bad)


@pytest.mark.parametrize("record, problem", [
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     None),  # LLaVA-Video-178K: <image> is the video
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]},
     None),
    ({"video": "v.mp4", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image><video>\nq"}, {"from": "gpt", "value": "a"}]}, None),
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<image><image>\nq"},
                                          {"from": "gpt", "value": "a"}]}, "a record with a video and no images"),
    ({"video": "v.mp4", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                            {"from": "gpt", "value": "a"}]}, "a video needs exactly"),
    ({"conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]}, "no video"),
    ({"video": "", "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]},
     "field 'video' must be a non-empty path"),
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<video>"}]},
     "markers belong in human turns"),
])
def test_video_records_are_validated(record, problem):
    got = records.validate_record({"id": 1, **record})
    assert (got is None) if problem is None else (problem in got), got
    if problem is None:  # what the renderer sees: every video marker is <video>
        turns = records.render_conversations({"id": 1, **record})
        assert sum(t["value"].count("<video>") for t in turns) == 1


def test_held_out_evaluation_batches_equal_the_training_pipelines(media):
    """train/evaluate.py's batches of video, several-image and lone (tiled, downscaled) image records equal the
    training pipeline's for the same record and slots (ids, labels, tiles and frames, image_index and image_weight);
    blind ones blank the pixels and keep the rest; evaluate() reports accuracy per qtype seeing and blind."""
    from llava_jax.train import evaluate

    tok, cfg = media["tok"], model_config(media["tok"])
    samples = evaluate.build_eval_set(media["data"], media["image_folder"], tok, "vicuna_v1", IMAGE_CFG, cfg, 160,
                                      num_frames=FRAMES)
    by_id = {s["id"]: s for s in samples}
    it = iter(_dataset(media, batch_size=1, shuffle=False))
    kinds = set()
    for batch in it:
        sample = by_id[it.last_record_ids[0]]
        slots = batch["pixel_values"].shape[1]
        (n, seeing), = evaluate._batches([sample], 1, 160, TILE, cfg, slots)
        assert n == 1
        for blind in (False, True):
            got = evaluate._blind(seeing) if blind else seeing
            for k in ("input_ids", "labels", "attention_mask", "image_index", "image_weight"):
                np.testing.assert_array_equal(got[k], batch[k], err_msg=f"{sample['id']} {k}")
            expected = np.zeros_like(batch["pixel_values"]) if blind else batch["pixel_values"]
            np.testing.assert_array_equal(got["pixel_values"], expected, err_msg=sample["id"])
        kinds.add((len(sample["images"]), len(sample["videos"])))
    assert it.stats.num_skipped == 0 and len(by_id) == len(media["records"])
    assert {(0, 1), (1, 0), (3, 0), (1, 1)} <= kinds  # a video, a lone image, several, an image with a video

    def forward(params, batch):  # right exactly when the row has its pixels
        return np.any(batch["pixel_values"] != 0, axis=(1, 2, 3, 4)), np.zeros(len(batch["input_ids"])), \
            np.ones(len(batch["input_ids"]))

    got = evaluate.evaluate(forward, None, samples, batch_size=4, crop=TILE, cfg=cfg)
    qtypes = {s["qtype"] for s in samples}
    assert {"frame", "count_images", "describe"} <= qtypes
    for q in qtypes:
        assert got[f"eval/accuracy_{q}"] == 1.0 and got[f"eval/blind_accuracy_{q}"] == 0.0, (q, got)
    assert got["eval/accuracy"] == 1.0 and got["eval/blind_accuracy"] == 0.0
