"""Data sources: JSON + folder, packed ArrayRecord shards (local, byte-range, gs://) and TFDS give the
same batches and resume alike; pack skips bad records, survives a crash, and checks its shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import types

import numpy as np
import PIL.Image
import pytest

from llava_jax.data import image as image_lib
from llava_jax.data import pack as pack_lib
from llava_jax.data import packed_format, pipeline, sources, synthetic
from llava_jax.data.tokenizer import Tokenizer
from tests._seeds import fresh_seed

CROP = 28


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic stage-2 records plus a two-image record and two noise images larger than a riegeli
    block (64 KiB), so that packed records straddle block headers."""
    root = tmp_path_factory.mktemp("sources")
    paths = synthetic.build(root / "syn", num_train=14, num_val=0, image_size=CROP)
    folder = paths["image_folder"]
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for k in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (160 + 8 * k, 200, 3), np.uint8)).save(os.path.join(folder, f"noise{k}.png"))
    recs = json.load(open(paths["stage2"]))
    # A LLaVA-Video-178K record (its <image> marker stands for the video) and a OneVision 3-image one.
    frames = np.stack([np.asarray(synthetic._one_shape(rng, CROP, "square", c)) for c in ("red", "blue", "green")] * 2)
    synthetic.write_video(os.path.join(folder, "clip.mp4"), frames)
    recs.append({"id": "clip", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<image>\nWhich frame shows the red square?"}, {"from": "gpt", "value": "first"}]})
    three = sorted(f for f in os.listdir(folder) if f.startswith("train_"))[:3]
    recs.append({"id": "three", "image": three, "conversations": [
        {"from": "human", "value": "<image>\n<image>\n<image>\nHow many images show a circle?"},
        {"from": "gpt", "value": "1"}]})
    recs.append({"id": 9001, "image": ["noise0.png", "noise1.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "noise"},
        {"from": "human", "value": "And this?\n<image>"}, {"from": "gpt", "value": "more noise"}]})
    recs.append({"id": "big", "image": "noise1.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "random pixels"}]})
    data_path = str(root / "mixed.json")
    with open(data_path, "w") as f:
        json.dump(recs, f)
    packed = str(root / "packed")
    pack_lib.pack(data_path, folder, packed, num_shards=3)
    return types.SimpleNamespace(seed=seed, root=root, data_path=data_path, folder=folder, packed=packed, records=recs,
                                 tok=Tokenizer(paths["tokenizer"]), cfg=image_lib.ImageProcessorConfig(size=CROP, crop_size=CROP))


_ARGS = dict(max_length=256, batch_size=3, num_epochs=2, shard_index=0, shard_count=1, group_by_modality_length=True,
             length_buckets=[64, 128], max_images_per_sample=2)


def _dataset(data, source, image_folder=None, **kwargs):
    args = dict(_ARGS, num_image_tokens=4, image_token_index=data.tok.vocab_size, seed=data.seed)
    args.update(kwargs)
    return pipeline.make_dataset(source, image_folder or data.folder, data.tok, "vicuna_v1", data.cfg, **args)


def _take(it, n=None):
    out = []
    for batch in it:
        out.append((batch, list(it.last_record_ids)))
        if n is not None and len(out) == n:
            break
    return out


def _assert_same(a, b, what):
    assert len(a) == len(b), what
    for step, ((x, ids_x), (y, ids_y)) in enumerate(zip(a, b)):
        assert ids_x == ids_y, (what, step)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, (what, k)
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{what}: step {step} {k}")


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_uint8_then_table_normalisation_equals_the_float_path():
    cfg = image_lib.ImageProcessorConfig(mean=(0.3, 0.51, 0.77), std=(0.2, 0.33, 0.41), rescale_factor=1 / 255)
    pixels = np.random.default_rng(fresh_seed()).integers(0, 256, (5, 7, 11, 3), np.uint8)
    x = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    expected = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    got = image_lib.normalize(pixels, cfg)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_byte_range_reads_equal_the_array_record_reader(data):
    local = sources.PackedSource(data.packed)
    by_range = sources.PackedSource(data.packed, byte_ranges=True)  # the path remote (gs://) shards take
    assert len(local) == len(by_range) == len(data.records)
    assert max(local.length) > 2 * packed_format.BLOCK_SIZE  # some records straddle block headers
    for i in range(len(local)):
        assert by_range.payload(i) == local.payload(i), i
    record, images = packed_format.decode_example(local.payload(len(local) - 1))
    assert record == data.records[-1] and images == [open(os.path.join(data.folder, "noise1.png"), "rb").read()]


def _tfds(data) -> str:
    """The records as a TFDS dataset (built once a module)."""
    from llava_jax.data import tfds_builder

    tfds_dir = str(data.root / "tfds")
    if not os.path.exists(tfds_dir):
        assert tfds_builder.build(data.data_path, data.folder, tfds_dir, "mixed") == {
            "num_records": len(data.records), "num_skipped": 0}
    return tfds_dir


def test_json_packed_and_tfds_sources_give_identical_batches_and_resume_alike(data):
    pytest.importorskip("tensorflow_datasets")  # the tfds extra; installed by the test extra
    tfds_dir = _tfds(data)
    reference = _take(iter(_dataset(data, data.data_path)))
    assert len(reference) > 8 and any(b["image_mask"][:, 1].any() for b, _ in reference)
    for name, spec, kwargs in [("packed", data.packed, {}), ("packed, byte ranges", sources.PackedSource(data.packed, byte_ranges=True), {}),
                               ("tfds", "tfds:llava_records/mixed", {"tfds_data_dir": tfds_dir})]:
        ds = _dataset(data, spec, **kwargs)
        it = iter(ds)
        head = _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        _assert_same(head + _take(it), reference, name)
        fresh = iter(_dataset(data, spec, **kwargs))
        fresh.set_state(state)
        _assert_same(_take(fresh), reference[4:], f"{name}, resumed")
        assert fresh.stats == it.stats
    assert "tensorflow" not in sys.modules  # TFDS read (and built) without TensorFlow


def test_packed_source_in_worker_processes_gives_the_same_batches(data):
    reference = _take(iter(_dataset(data, data.data_path, num_epochs=1)))
    it = iter(_dataset(data, data.packed, num_epochs=1, worker_count=2))
    try:
        _assert_same(_take(it), reference, "packed, 2 workers")
    finally:
        it.close()


# ----------------------------------------------------------------------- pack


def _bad_input(data, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(data.folder, folder)
    good = [r for r in data.records if isinstance(r["id"], str) and r["id"] != "big"]
    (folder / "corrupt.png").write_bytes(open(os.path.join(data.folder, "noise0.png"), "rb").read()[:3000])
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                  {"from": "gpt", "value": "x"}]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                     {"from": "gpt", "value": "x"}]},
        {"id": "escape", "image": "../secret.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                      {"from": "gpt", "value": "x"}]},
        {"id": "malformed", "conversations": []},
    ]
    recs = good[:5] + bad[:2] + good[5:9] + bad[2:] + good[9:]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(recs))
    return str(path), str(folder), recs, good


def test_pack_skips_bad_records_by_id_and_resumes_after_a_crash(data, tmp_path, monkeypatch):
    path, folder, recs, good = _bad_input(data, tmp_path)
    clean = pack_lib.pack(path, folder, str(tmp_path / "clean"), num_shards=4)
    assert clean["num_records"] == len(good) and clean["num_input_records"] == len(recs)
    reasons = {s["id"]: s["reason"] for s in clean["skipped"]}
    assert sorted(reasons) == ["corrupt", "escape", "malformed", "missing"]
    assert "nope.png" in reasons["missing"] and "corrupt.png" in reasons["corrupt"] and ".." in reasons["escape"]
    assert [s["index"] for s in clean["skipped"]] == [recs.index(r) for r in recs if r["id"] in reasons]
    assert [sources.PackedSource(str(tmp_path / "clean"))[i].record for i in range(len(good))] == good

    # Crash after shard 2's file is in place but before its summary: shards 0 and 1 are complete.
    out = tmp_path / "crashed"
    real_write = pack_lib._write_text

    def crash(p, text):
        if p.endswith("records-00002-of-00004.array_record.json"):
            raise KeyboardInterrupt("killed")
        real_write(p, text)

    monkeypatch.setattr(pack_lib, "_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        pack_lib.pack(path, folder, str(out), num_shards=4)
    monkeypatch.setattr(pack_lib, "_write_text", real_write)
    (out / ".records-00003-of-00004.array_record.tmp-99").write_bytes(b"partial")  # a killed writer's file
    assert not (out / "manifest.json").exists()
    with pytest.raises(sources.DataSourceError, match="no manifest"):
        sources.PackedSource(str(out))
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("records-00000-of-00004.array_record",
                                                       "records-00001-of-00004.array_record")}
    resumed = pack_lib.pack(path, folder, str(out), num_shards=4)
    assert resumed == {**clean, "data_path": path, "image_folder": folder}
    for name in os.listdir(tmp_path / "clean"):
        assert _sha(out / name) == _sha(tmp_path / "clean" / name), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "clean"))  # the stale tmp file is gone
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # complete shards were not rewritten
    # Other input into the same directory is refused.
    with pytest.raises(pack_lib.PackError, match="num_shards"):
        pack_lib.pack(path, folder, str(out), num_shards=3)


def test_truncated_or_changed_shard_is_a_clear_error_naming_the_file(data, tmp_path, capsys):
    out = tmp_path / "packed"
    shutil.copytree(data.packed, out)
    shard = out / "records-00001-of-00003.array_record"
    body = shard.read_bytes()
    shard.write_bytes(body[: len(body) // 2])
    with pytest.raises(sources.DataSourceError, match=f"{shard}: .* bytes, but manifest.json says .*truncated"):
        sources.PackedSource(str(out))
    with pytest.raises(sources.DataSourceError, match="records-00001-of-00003.array_record"):
        _dataset(data, str(out))
    assert pack_lib.main(["--verify", str(out)]) == 2
    assert "records-00001-of-00003.array_record" in capsys.readouterr().err
    shard.write_bytes(body[:100] + bytes([body[100] ^ 1]) + body[101:])  # same size, one bit changed
    assert pack_lib.main(["--verify", str(out)]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    shard.write_bytes(body)
    assert pack_lib.main(["--verify", str(out)]) == 0
    capsys.readouterr()
    assert pack_lib.main(["--data-path", str(tmp_path / "nope.json"), "--image-folder", data.folder,
                          "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.json" in err  # one line naming the file


# ----------------------------------------------------------------------- GCS (local emulator)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """A gcp-storage-emulator on 127.0.0.1 (in memory) with bucket `bkt`; yields its URL."""
    pytest.importorskip("gcsfs")
    import fsspec

    from tests import _gcs_emulator

    with _gcs_emulator.running("bkt") as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        fsspec.config.conf.pop("gcs", None)
        try:
            yield url
        finally:
            fsspec.get_filesystem_class("gs").clear_instance_cache()


def test_pack_to_and_train_from_gcs(data, gcs):
    from etils import epath

    # JSON + loose images on GCS, packed to GCS.
    bucket = epath.Path("gs://bkt/in")
    (bucket / "mixed.json").write_text(open(data.data_path).read())
    for name in os.listdir(data.folder):
        (bucket / "images" / name).write_bytes(open(os.path.join(data.folder, name), "rb").read())
    manifest = pack_lib.pack("gs://bkt/in/mixed.json", "gs://bkt/in/images", "gs://bkt/packed", num_shards=2)
    assert manifest["num_records"] == len(data.records) and manifest["num_skipped"] == 0
    assert pack_lib.verify("gs://bkt/packed") == []
    reference = _take(iter(_dataset(data, data.data_path, num_epochs=1)))
    from_json = _dataset(data, "gs://bkt/in/mixed.json", image_folder="gs://bkt/in/images", num_epochs=1)
    _assert_same(_take(iter(from_json)), reference, "gs:// JSON + images")
    _assert_same(_take(iter(_dataset(data, "gs://bkt/packed", num_epochs=1))), reference, "gs:// packed")



def test_anyres_batches_are_the_same_from_every_source(data):
    """LLaVA-NeXT rows (tiles, image_index) from packed shards and TFDS equal the JSON source's: sources hand
    the pipeline images, and the pipeline tiles them by their size (the noise images tile 2 x 2)."""
    pytest.importorskip("tensorflow_datasets")
    from llava_jax import anyres

    pinpoints = ((28, 56), (56, 28), (56, 56))
    cfg = image_lib.ImageProcessorConfig(size=CROP, crop_size=CROP, pad_to_square=False, grid_pinpoints=pinpoints)
    kw = dict(geometry=anyres.AnyresConfig(CROP, 2, pinpoints), num_epochs=1, image_token_index=data.tok.vocab_size)
    reference = _take(iter(pipeline.make_dataset(data.data_path, data.folder, data.tok, "vicuna_v1", cfg,
                                                 **{**_ARGS, **kw, "seed": data.seed})))
    assert any(b["image_mask"][:, 5:].any() for b, _ in reference)  # a row with two 5-tile images
    tfds_dir = _tfds(data)
    for name, spec, extra in [("packed", data.packed, {}), ("tfds", "tfds:llava_records/mixed",
                                                             {"tfds_data_dir": tfds_dir})]:
        got = _take(iter(pipeline.make_dataset(spec, data.folder, data.tok, "vicuna_v1", cfg,
                                               **{**_ARGS, **kw, "seed": data.seed, **extra})))
        _assert_same(got, reference, name)


def test_video_and_multi_image_batches_are_the_same_from_every_source(data):
    """OneVision rows (a video's frames after the images, three untiled images, image_index and image_weight)
    from packed shards and TFDS equal the JSON source's: the shards keep the video file's bytes, the pipeline
    samples and decodes the frames."""
    pytest.importorskip("tensorflow_datasets")
    from llava_jax import anyres

    pinpoints = ((28, 28), (28, 56), (56, 28), (56, 56))
    cfg = image_lib.ImageProcessorConfig(size=CROP, crop_size=CROP, pad_to_square=False, grid_pinpoints=pinpoints,
                                         onevision=True)
    geometry = anyres.AnyresConfig(CROP, 2, pinpoints, max_tiles=1, untiled_multi=True, video="bilinear")
    kw = dict(geometry=geometry, num_epochs=1, image_token_index=data.tok.vocab_size, max_images_per_sample=3,
              video_token_index=data.tok.vocab_size + 1, num_frames=4, seed=data.seed)
    reference = _take(iter(pipeline.make_dataset(data.data_path, data.folder, data.tok, "vicuna_v1", cfg,
                                                 **{**_ARGS, **kw})))
    ids = {i for _, row in reference for i in row}
    assert {"clip", "three"} <= ids
    assert any(b["image_weight"].any() for b, _ in reference)
    tfds_dir = _tfds(data)
    for name, spec, extra in [("packed", data.packed, {}), ("packed, byte ranges",
                                                          sources.PackedSource(data.packed, byte_ranges=True), {}),
                              ("tfds", "tfds:llava_records/mixed", {"tfds_data_dir": tfds_dir})]:
        got = _take(iter(pipeline.make_dataset(spec, data.folder, data.tok, "vicuna_v1", cfg,
                                               **{**_ARGS, **kw, **extra})))
        _assert_same(got, reference, name)
