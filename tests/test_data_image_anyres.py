"""LLaVA-NeXT anyres preprocessing against transformers' LlavaNextImageProcessor (PIL path) and the original's
`process_anyres_image` (tests/reference/llava_next/mm_utils.py), LLaVA-OneVision's against
LlavaOnevisionImageProcessorPil (one image, many images in a row), and the anyres processor settings' formats."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import numpy as np
import PIL.Image
import pytest
from transformers import (
    CLIPImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaOnevisionImageProcessorPil,
    SiglipImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from llava_jax import anyres
from llava_jax.data import image as image_lib
from llava_jax.data.image import ImageProcessorConfig
from tests._seeds import fresh_seed

TOL = 1e-6
V16 = [list(p) for p in anyres.V16_PINPOINTS]


def _image(mode: str, height: int, width: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if mode == "RGBA":
        px = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        px[: height // 3, :, 3] = 0  # a transparent band: composited on white, as transformers does
        return PIL.Image.fromarray(px, "RGBA")
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _cfg(tile: int, pinpoints, convention: str = "transformers") -> ImageProcessorConfig:
    return ImageProcessorConfig(size=tile, crop_size=tile, pad_to_square=False, grid_pinpoints=pinpoints,
                                pinpoint_convention=convention)


def _hf(tile: int, pinpoints) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=[list(p) for p in pinpoints])


def _hf_patches(proc, images) -> tuple[np.ndarray, np.ndarray]:
    out = proc(images=images, return_tensors="np")
    return np.asarray(out["pixel_values"]).transpose(0, 1, 3, 4, 2), np.asarray(out["image_sizes"])


def _check(cfg: ImageProcessorConfig, proc, image: PIL.Image.Image, what: str) -> None:
    ours = image_lib.preprocess(image, cfg)
    ref, sizes = _hf_patches(proc, image)
    count = image_size_to_num_patches((image.height, image.width), [list(p) for p in cfg.grid_pinpoints],
                                      cfg.crop_size)
    assert ours.dtype == np.float32 and ours.shape == (count, cfg.crop_size, cfg.crop_size, 3), what
    assert image_lib.num_patches((image.height, image.width), cfg) == count, what
    assert (ref[0, count:] == 0).all() and tuple(sizes[0]) == (image.height, image.width), what
    np.testing.assert_allclose(ours, ref[0, :count], atol=TOL, rtol=0, err_msg=what)


# (height, width): square, wide, tall, smaller than a tile, odd; at the v1.6 tile and a tiny one.
SIZES_336 = [(336, 336), (672, 672), (480, 640), (640, 480), (150, 1000), (1000, 150), (100, 77), (337, 501)]


def test_v16_pinpoints_match_transformers():
    cfg, proc = _cfg(336, anyres.V16_PINPOINTS), _hf(336, anyres.V16_PINPOINTS)
    for i, (h, w) in enumerate(SIZES_336):
        _check(cfg, proc, _image("RGB", h, w, seed=i), f"{h}x{w}")


# The v1.6 list's shapes at a 28-pixel tile, the range form and explicit tile counts.
PINPOINT_SETS = [[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]], "(1x1),...,(3x3)", "(1x2),(2x1),(2x2)"]


@pytest.mark.parametrize("spec", PINPOINT_SETS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pinpoint_sets_and_modes_match_transformers(spec, mode: str):
    pins = anyres.parse_pinpoints(spec, 28)
    cfg, proc = _cfg(28, pins), _hf(28, pins)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    sizes = [(28, 28), (56, 56), (7, 90), (90, 7), (13, 13), (29, 57)]
    sizes += [tuple(int(x) for x in rng.integers(1, 130, 2)) for _ in range(6)]
    for h, w in sizes:
        _check(cfg, proc, _image(mode, h, w, seed), f"{spec} {mode} {h}x{w} seed={seed}")


def test_size_larger_than_crop_matches_transformers():
    # The base is resized to `size` and every patch goes through the CLIP resize and crop, as transformers does.
    pins = anyres.parse_pinpoints("(1x1),...,(2x2)", 28)
    cfg = ImageProcessorConfig(size=32, crop_size=28, pad_to_square=False, grid_pinpoints=pins)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=[list(p) for p in pins])
    for i, (h, w) in enumerate([(40, 70), (70, 40), (20, 20)]):
        _check(cfg, proc, _image("RGB", h, w, seed=40 + i), f"{h}x{w}")


def test_batch_of_mixed_sizes_matches_transformers():
    pins = anyres.parse_pinpoints("(1x1),...,(3x3)", 28)
    cfg, proc = _cfg(28, pins), _hf(28, pins)
    seed = fresh_seed()
    images = [_image("RGB", h, w, seed + k) for k, (h, w) in enumerate([(84, 84), (20, 50), (28, 28)])]
    batch = image_lib.preprocess_images(images, cfg)
    ref, sizes = _hf_patches(proc, images)
    assert batch.pixel_values.shape == ref.shape and batch.pixel_values.dtype == np.float32
    np.testing.assert_allclose(batch.pixel_values, ref, atol=TOL, rtol=0, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(batch.image_sizes, sizes)
    assert batch.num_patches.tolist() == [image_lib.num_patches(s, cfg) for s in sizes.tolist()] == [10, 3, 2]
    # A static patch count for jit: the largest pinpoint's; the extra patches are zeros.
    static = image_lib.preprocess_images(images, cfg, max_patches=cfg.anyres_config(grid=2).max_patches)
    assert static.pixel_values.shape[1] == 10
    np.testing.assert_array_equal(static.pixel_values[:, :ref.shape[1]], batch.pixel_values)
    with pytest.raises(ValueError, match="max_patches=3"):
        image_lib.preprocess_images(images, cfg, max_patches=3)
    with pytest.raises(ValueError, match="preprocess_images"):
        image_lib.preprocess_batch(images, cfg)


def test_uint8_patches_normalise_to_preprocess():
    # The pipeline's split: uint8 patches in workers, the table lookup later, bit for bit the same.
    cfg = _cfg(28, anyres.parse_pinpoints("(1x1),...,(3x3)", 28))
    img = _image("RGB", 50, 90, fresh_seed())
    u8 = image_lib.preprocess_uint8(img, cfg)
    assert u8.dtype == np.uint8 and u8.shape == (image_lib.num_patches((50, 90), cfg), 28, 28, 3)
    padded = image_lib.pad_patches([u8], max_patches=10)
    assert padded.shape == (1, 10, 28, 28, 3) and not padded[0, len(u8):].any()
    table = image_lib.normalization_table(cfg)
    np.testing.assert_array_equal(image_lib.normalize(u8, None, table), image_lib.preprocess(img, cfg))


def test_one_five_settings_give_one_patch_per_image():
    cfg = ImageProcessorConfig(size=28, crop_size=28, pad_to_square=True)
    images = [_image("RGB", 30, 60, 1), _image("RGB", 61, 37, 2)]
    batch = image_lib.preprocess_images(images, cfg)
    assert batch.pixel_values.shape == (2, 1, 28, 28, 3) and batch.num_patches.tolist() == [1, 1]
    np.testing.assert_array_equal(batch.pixel_values[:, 0], image_lib.preprocess_batch(images, cfg))
    assert image_lib.num_patches((30, 60), cfg) == 1


def _original_module():
    path = os.path.join(os.path.dirname(__file__), "reference", "llava_next", "mm_utils.py")
    spec = importlib.util.spec_from_file_location("llava_next_mm_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Transformers4Clip:
    """CLIPImageProcessorPil as the original saw the CLIP processor in transformers 4: sizes as plain dicts."""

    def __init__(self, side: int):
        self.size, self.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
        self._processor = CLIPImageProcessorPil(size=self.size, crop_size=self.crop_size)

    def preprocess(self, image, **kwargs):
        """The CLIP processor's `preprocess`."""
        return self._processor.preprocess(image, **kwargs)


def test_original_convention_matches_original_code():
    original = _original_module()
    clip = _Transformers4Clip(224)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    # (width, height) pairs as the original writes them; the range form as its train.py expands it.
    for spec in ["[[224, 448], [448, 224], [448, 448]]", "(1x1),...,(2x3)"]:
        pins = anyres.parse_pinpoints(spec, 224)
        cfg = _cfg(224, pins, "original")
        sizes = [(224, 224), (300, 500), (500, 300), (100, 100)]  # squares: where the conventions tie-break apart
        sizes += [tuple(int(x) for x in rng.integers(20, 700, 2))]
        for h, w in sizes:
            img = _image("RGB", h, w, seed)
            ref = original.process_anyres_image(img, clip, spec).numpy().transpose(0, 2, 3, 1)
            ours = image_lib.preprocess(img, cfg)
            assert ours.shape == ref.shape, f"{spec} {h}x{w} seed={seed}"
            np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=f"{spec} {h}x{w} seed={seed}")
    # The tie: an exactly square image is cut 2 high x 1 wide in the original, 1 x 2 in transformers.
    img = _image("RGB", 224, 224, seed)
    pins = ((224, 448), (448, 224))
    lay = anyres.layout(_cfg(224, pins, "original").anyres_config(grid=16), (224, 224))
    assert (lay.rows, lay.cols) == (2, 1)
    assert not np.array_equal(image_lib.preprocess(img, _cfg(224, pins, "original")),
                              image_lib.preprocess(img, _cfg(224, pins)))


# ---------------------------------------------------------------------------------------------
# Settings: both checkpoint formats, save and load back, clear errors


def test_from_pretrained_llava_hf_processor(tmp_path):
    pins = [[28, 56], [56, 28], [56, 56]]
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=pins)
    proc.save_pretrained(str(tmp_path))
    cfg = ImageProcessorConfig.from_pretrained(str(tmp_path))
    assert cfg == _cfg(28, pins)  # its do_pad pads the patch axis: no square padding
    img = _image("RGB", 40, 17, 5)
    _check(cfg, proc, img, "40x17")
    # Without image_grid_pinpoints a LlavaNextImageProcessor tiles by the v1.6 list, its default.
    d = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del d["image_grid_pinpoints"]
    d["size"], d["crop_size"] = {"shortest_edge": 336}, {"height": 336, "width": 336}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)).grid_pinpoints == anyres.V16_PINPOINTS


@pytest.mark.parametrize("convention", ["transformers", "original"])
def test_save_roundtrip_through_transformers(tmp_path, convention: str):
    pins = ((28, 56), (56, 28), (56, 56), (84, 28))
    cfg = _cfg(28, pins, convention)
    cfg.save(str(tmp_path))
    back = ImageProcessorConfig.from_pretrained(str(tmp_path))
    hf = LlavaNextImageProcessorPil.from_pretrained(str(tmp_path))
    # transformers reads (height, width): original pinpoints are written swapped, in their order.
    assert back == _cfg(28, cfg.anyres_config(grid=2).resolutions())
    if convention == "transformers":
        assert back == cfg
    for i, (h, w) in enumerate([(28, 28), (30, 90), (90, 30), (60, 61)]):
        img = _image("RGB", h, w, seed=60 + i)
        _check(back, hf, img, f"{convention} {h}x{w}")
        np.testing.assert_array_equal(image_lib.preprocess(img, back), image_lib.preprocess(img, cfg))
    assert ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


DROP = object()  # a field value that leaves the key out


def _original_config(tmp_path, **fields) -> str:
    conf = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": V16} | fields
    conf = {k: v for k, v in conf.items() if v is not DROP}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return str(tmp_path)


def test_from_pretrained_original_next_config(tmp_path):
    cfg = ImageProcessorConfig.from_pretrained(_original_config(tmp_path))
    assert cfg == _cfg(336, anyres.V16_PINPOINTS, "original")
    assert cfg.anyres_config(grid=24) == anyres.AnyresConfig(convention="original")
    cfg = ImageProcessorConfig.from_pretrained(_original_config(tmp_path, image_grid_pinpoints="(1x1),...,(2x2)"))
    assert cfg.grid_pinpoints == ((336, 336), (336, 672), (672, 336), (672, 672))
    # A CLIP preprocessor_config.json beside it (no pinpoints): sizes from the JSON, tiling from config.json.
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        str(tmp_path))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)) == cfg
    with pytest.raises(ValueError, match="LLaVA-1.5's padding choice"):
        ImageProcessorConfig.from_pretrained(str(tmp_path), image_aspect_ratio="pad")


@pytest.mark.parametrize("fields, message", [
    ({"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat' with "
     "image_aspect_ratio 'anyres_max_9'"),
    ({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": None}, "'anyres_max_9' needs image_grid_pinpoints"),
    ({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),(2 by 2)"}, "image_grid_pinpoints"),
    ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat'"),
    ({"mm_patch_merge_type": DROP}, "mm_patch_merge_type 'flat'"),  # absent: the original's default, "flat"
    ({"image_grid_pinpoints": None}, "needs image_grid_pinpoints"),
    ({"image_grid_pinpoints": "(1x1),(2 by 2)"}, "image_grid_pinpoints"),
    ({"image_grid_pinpoints": [[336, 600]]}, r"image_grid_pinpoints: .*\[\(336, 600\)\].*multiples of tile_size 336"),
])
def test_bad_original_config_one_line_naming_file_and_key(tmp_path, fields, message):
    _original_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=message) as e:
        ImageProcessorConfig.from_pretrained(str(tmp_path))
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "config.json") + ": "), text


@pytest.mark.parametrize("fields, message", [
    ({"image_grid_pinpoints": [[28, 50]]}, r"image_grid_pinpoints: .*multiples of tile_size 28"),
    ({"image_grid_pinpoints": "[[28, 56"}, "image_grid_pinpoints"),
    ({"image_grid_pinpoints": []}, "image_grid_pinpoints of a LlavaNextImageProcessor must name"),
    ({"image_processor_type": "SiglipImageProcessor"}, "image_processor_type 'SiglipImageProcessor'"),
    ({"image_processor_type": "LlavaOnevisionImageProcessor", "crop_size": {"height": 14, "width": 14}},
     "crop_size: a LlavaOnevisionImageProcessor with crop_size 14 other than its size 28"),
    ({"crop_size": {"height": 28, "width": 56}}, "non-square crop_size"),
])
def test_bad_hf_processor_one_line_naming_file_and_key(tmp_path, fields, message):
    _cfg(28, ((28, 56), (56, 28))).save(str(tmp_path))
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    with pytest.raises(ValueError, match=message) as e:
        ImageProcessorConfig.from_pretrained(str(tmp_path))
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path) + ": "), text


def test_settings_exclude_square_padding_with_tiles():
    with pytest.raises(ValueError, match="exclude each other"):
        ImageProcessorConfig(pad_to_square=True, grid_pinpoints=anyres.V16_PINPOINTS)
    with pytest.raises(ValueError, match="pinpoint_convention"):
        ImageProcessorConfig(pad_to_square=False, grid_pinpoints=anyres.V16_PINPOINTS, pinpoint_convention="hw")


# ---------------------------------------------------------------------------------------------
# LLaVA-OneVision: LlavaOnevisionImageProcessor (PIL path), its pinpoints every (1..6)x(1..6) tile


def _ov_cfg(tile: int, mean=(0.5, 0.5, 0.5)) -> ImageProcessorConfig:
    return ImageProcessorConfig(size=tile, crop_size=tile, mean=mean, std=(0.5, 0.5, 0.5), pad_to_square=False,
                                grid_pinpoints=anyres.parse_pinpoints("(1x1),...,(6x6)", tile), onevision=True)


def _ov_hf(cfg: ImageProcessorConfig) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(size={"height": cfg.size, "width": cfg.size}, image_mean=list(cfg.mean),
                                           image_std=list(cfg.std),
                                           image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints])


def _ov_check(cfg: ImageProcessorConfig, rows: list[list[PIL.Image.Image]], what: str) -> None:
    images = [im for row in rows for im in row]
    out = _ov_hf(cfg)(images=rows, return_tensors="np")
    ref = np.asarray(out["pixel_values"]).transpose(0, 1, 3, 4, 2)
    batch = image_lib.preprocess_images(images, cfg, batch_num_images=[len(r) for r in rows])
    assert np.asarray(out["batch_num_images"]).tolist() == [len(r) for r in rows], what
    assert batch.pixel_values.dtype == np.float32 and batch.pixel_values.shape == ref.shape, what
    np.testing.assert_array_equal(batch.image_sizes, np.asarray(out["image_sizes"]), err_msg=what)
    # Same PIL resizes, same normalisation table as the NeXT path: equal bit for bit.
    np.testing.assert_array_equal(batch.pixel_values, ref, err_msg=what)
    for k, im in enumerate(images):
        alone = len(next(r for r in rows if any(x is im for x in r))) == 1
        count = image_lib.num_patches((im.height, im.width), cfg, tiled=alone)
        assert batch.num_patches[k] == count and not ref[k, count:].any(), what
        if alone:  # transformers' own count (the modeling file's image_size_to_num_patches)
            assert count == image_size_to_num_patches((im.height, im.width), [list(p) for p in cfg.grid_pinpoints],
                                                      cfg.size), what


# square, wide, tall, tiny, odd, and one of exactly a large pinpoint (5 x 6 tiles at 28: 31 patches).
SIZES_OV = [(56, 56), (40, 130), (130, 40), (9, 13), (57, 83), (140, 168)]


def test_onevision_single_images_match_transformers():
    cfg, seed = _ov_cfg(28), fresh_seed()
    for i, (h, w) in enumerate(SIZES_OV):
        _ov_check(cfg, [[_image("RGB", h, w, seed + i)]], f"{h}x{w} seed={seed + i}")
    assert image_lib.num_patches((140, 168), cfg) == 31


def test_onevision_at_its_own_tile_matches_transformers(tmp_path):
    # The real geometry: 384-pixel tiles, the default 36 pinpoints, OneVision's mean; a wide image and an RGBA one.
    cfg = ImageProcessorConfig.from_pretrained(_ov_dir(tmp_path))
    assert cfg == _ov_cfg(384) and cfg.processor_type == "LlavaOnevisionImageProcessor"
    seed = fresh_seed()
    _ov_check(cfg, [[_image("RGB", 300, 1000, seed)], [_image("RGBA", 500, 420, seed + 1)]], f"seed={seed}")


def test_onevision_many_images_in_a_row_are_not_tiled():
    """A row with several images: each padded to a square with int(255 * mean) and resized to one tile, untiled."""
    cfg, seed = _ov_cfg(28, mean=(0.2, 0.5, 0.9)), fresh_seed()
    three = [_image("RGB", 40, 130, seed), _image("RGBA", 130, 40, seed + 1), _image("L", 20, 20, seed + 2)]
    _ov_check(cfg, [three], f"one row of three, seed={seed}")
    # A batch of a row of one (tiled) and a row of two (not): patches padded to the batch's largest.
    _ov_check(cfg, [[_image("RGB", 57, 83, seed + 3)], three[:2]], f"rows of one and two, seed={seed}")
    u8 = image_lib.preprocess_uint8(three[0], cfg, tiled=False)
    assert u8.shape == (1, 28, 28, 3) and tuple(u8[0, 0, 0]) == (51, 127, 229)  # the pad colour, int(255 * mean)
    assert image_lib.is_tiled(cfg, 1) and not image_lib.is_tiled(cfg, 3)
    next_cfg = _cfg(28, anyres.parse_pinpoints("(1x1),...,(2x2)", 28))
    assert image_lib.is_tiled(next_cfg, 3)  # LLaVA-NeXT tiles every image
    with pytest.raises(ValueError, match="only LlavaOnevisionImageProcessor settings leave an image untiled"):
        image_lib.preprocess(three[0], next_cfg, tiled=False)
    with pytest.raises(ValueError, match="add up to the 3 images"):
        image_lib.preprocess_images(three, cfg, batch_num_images=[2])


def _ov_dir(tmp_path, **fields) -> str:
    """A llava-hf OneVision preprocessor_config.json (as llava-onevision-qwen2-*-ov-hf ship it), with `fields`."""
    directory = str(tmp_path)
    conf = {"image_processor_type": "LlavaOnevisionImageProcessor", "do_convert_rgb": True, "do_normalize": True,
            "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": 384, "width": 384},
            "image_grid_pinpoints": [list(p) for p in anyres.parse_pinpoints("(1x1),...,(6x6)", 384)]} | fields
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({k: v for k, v in conf.items() if v is not DROP}, f)
    return directory


def test_onevision_settings_read_save_and_read_back(tmp_path):
    # Without image_grid_pinpoints the processor's default: every (1..6)x(1..6) multiple of 384.
    assert ImageProcessorConfig.from_pretrained(_ov_dir(tmp_path, image_grid_pinpoints=DROP)) == _ov_cfg(384)
    cfg = _ov_cfg(28)
    cfg.save(str(tmp_path))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)) == cfg
    hf = LlavaOnevisionImageProcessorPil.from_pretrained(str(tmp_path))
    assert hf.size == {"height": 28, "width": 28} and hf.image_grid_pinpoints == [list(p) for p in cfg.grid_pinpoints]
    assert ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="need grid pinpoints and size == crop_size"):
        ImageProcessorConfig(size=28, crop_size=28, pad_to_square=False, onevision=True)


class _OriginalSiglip:
    """LLaVA-NeXT's own SigLipImageProcessor (its siglip_encoder.py) as its mm_utils reads it: size a tuple, crop
    a dict, mean/std 0.5, and a preprocess that resizes to size x size (PIL bicubic), rescales and normalises."""

    def __init__(self, side: int):
        self.size, self.crop_size, self.image_mean = (side, side), {"height": side, "width": side}, (0.5, 0.5, 0.5)
        self._processor = SiglipImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                                  image_std=[0.5] * 3)

    def preprocess(self, image, **kwargs):
        """The SigLIP processor's `preprocess`."""
        return self._processor.preprocess(image, **kwargs)


def test_original_onevision_config_matches_original_code(tmp_path):
    """An original LLaVA-OneVision config.json (SigLIP tower, anyres_max_9): one image tiled as its mm_utils tiles
    it, each image of several padded to a square as its train.py's "pad" override does."""
    (tmp_path / "config.json").write_text(json.dumps({
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "image_aspect_ratio": "anyres_max_9",
        "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": "(1x1),...,(6x6)"}))
    cfg = ImageProcessorConfig.from_pretrained(str(tmp_path))
    assert cfg == dataclasses.replace(_ov_cfg(384), pinpoint_convention="original")
    # With the tower's preprocessor_config.json beside it (no pinpoints): its sizes and mean, config.json's tiling.
    SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(str(tmp_path))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)) == cfg
    original, siglip, seed = _original_module(), _OriginalSiglip(384), fresh_seed()
    for k, (h, w) in enumerate([(300, 500), (500, 300), (384, 384)]):
        img = _image("RGB", h, w, seed + k)
        ref = original.process_anyres_image(img, siglip, "(1x1),...,(6x6)").numpy().transpose(0, 2, 3, 1)
        ours = image_lib.preprocess(img, cfg)
        assert ours.shape == ref.shape, f"{h}x{w} seed={seed + k}"
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=f"{h}x{w} seed={seed + k}")
        padded = image_lib.expand_to_square(img, tuple(int(x * 255) for x in siglip.image_mean))
        ref = np.asarray(siglip.preprocess(padded, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(image_lib.preprocess(img, cfg, tiled=False), ref, atol=TOL, rtol=0)
