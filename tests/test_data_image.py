"""Image preprocessing against transformers' PIL-path CLIP and Llava image processors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import PIL.Image
import pytest
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from llava_jax.data import image as image_lib
from llava_jax.data.image import ImageError, ImageProcessorConfig

TOL = 1e-6


def _random_image(mode: str, width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if mode == "RGBA":
        px = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        px[: height // 3, :, 3] = 0  # fully transparent band: its stored colour must not leak through
        return PIL.Image.fromarray(px, "RGBA")
    if mode == "P":
        img = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        return img.quantize(colors=16)
    if mode == "P_transparent":
        img = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        img = img.quantize(colors=16)
        img.info["transparency"] = 3
        return img
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _hf_pixels(image: PIL.Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    kwargs = dict(
        size={"shortest_edge": cfg.size},
        crop_size={"height": cfg.crop_size, "width": cfg.crop_size},
        image_mean=list(cfg.mean),
        image_std=list(cfg.std),
    )
    if cfg.pad_to_square:
        proc = LlavaImageProcessorPil(do_pad=True, **kwargs)
    else:
        proc = CLIPImageProcessorPil(**kwargs)
    out = proc(images=image, return_tensors="np")["pixel_values"]  # [1, 3, H, W]
    return np.transpose(np.asarray(out)[0], (1, 2, 0))


MODES = ["RGB", "RGBA", "L", "P", "P_transparent"]
SHAPES = [(37, 61), (61, 37), (40, 40), (500, 333)]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("size", [336, 28])
@pytest.mark.parametrize("mode", MODES)
def test_matches_hf_processor(pad: bool, size: int, mode: str):
    cfg = ImageProcessorConfig(size=size, crop_size=size, pad_to_square=pad)
    for i, (w, h) in enumerate(SHAPES):
        img = _random_image(mode, w, h, seed=i)
        ours = image_lib.preprocess(img, cfg)
        ref = _hf_pixels(img, cfg)
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=f"{mode} {w}x{h} pad={pad}")


@pytest.mark.parametrize("pad", [False, True])
def test_size_differs_from_crop_matches_hf(pad: bool):
    # LLaVA v1 style 224 resize + smaller crop, and a crop larger than the resized image (HF zero-pads).
    for size, crop in [(32, 28), (24, 28)]:
        cfg = ImageProcessorConfig(size=size, crop_size=crop, pad_to_square=pad)
        for i, (w, h) in enumerate(SHAPES):
            img = _random_image("RGB", w, h, seed=10 + i)
            np.testing.assert_allclose(image_lib.preprocess(img, cfg), _hf_pixels(img, cfg), atol=TOL, rtol=0)


def test_batch_equals_single():
    cfg = ImageProcessorConfig(size=28, crop_size=28)
    imgs = [_random_image("RGB", 37, 61, 0), _random_image("L", 61, 37, 1)]
    batch = image_lib.preprocess_batch(imgs, cfg)
    assert batch.shape == (2, 28, 28, 3)
    for i, im in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], image_lib.preprocess(im, cfg))


def test_pad_colour_is_llava_background():
    cfg = ImageProcessorConfig(size=28, crop_size=28, pad_to_square=True)
    assert cfg.background_color == (122, 116, 104)
    # A wide black strip: rows above/below it are padding and must be the normalised pad colour.
    img = PIL.Image.new("RGB", (56, 8), (0, 0, 0))
    out = image_lib.preprocess(img, cfg)
    expected = ((np.array([122, 116, 104]) / 255 - np.array(image_lib.CLIP_MEAN)) / np.array(image_lib.CLIP_STD))
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(out[-1, -1], expected, atol=1e-6)
    # The image is centred: the middle row is black.
    black = (0 - np.array(image_lib.CLIP_MEAN)) / np.array(image_lib.CLIP_STD)
    np.testing.assert_allclose(out[14, 14], black, atol=1e-5)


def test_expand_to_square_offsets_match_llava():
    img = PIL.Image.new("RGB", (5, 2), (255, 0, 0))
    sq = np.asarray(image_lib.expand_to_square(img, (1, 2, 3)))
    assert sq.shape == (5, 5, 3)
    # LLaVA pastes at (0, (w - h) // 2) = row 1: rows 1-2 red, rows 0, 3, 4 background.
    assert (sq[1:3] == [255, 0, 0]).all()
    assert (sq[[0, 3, 4]] == [1, 2, 3]).all()


def test_load_image_rgba_composited_on_white(tmp_path):
    px = np.zeros((4, 4, 4), np.uint8)
    px[..., 0] = 200
    px[..., 3] = 0  # fully transparent red -> white
    px[0, 0, 3] = 255
    path = tmp_path / "a.png"
    PIL.Image.fromarray(px, "RGBA").save(path)
    img = image_lib.load_image(path)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert tuple(arr[1, 1]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (200, 0, 0)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        image_lib.load_image(bad)
    # A truncated PNG decodes lazily in PIL: load_image must still fail at once.
    good = tmp_path / "good.png"
    _random_image("RGB", 64, 64, 0).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="truncated.png"):
        image_lib.load_image(truncated)
    with pytest.raises(ImageError, match="missing.png"):
        image_lib.load_image(tmp_path / "missing.png")
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("pad", [False, True])
def test_save_roundtrip_through_hf_loader(tmp_path, pad: bool):
    cfg = ImageProcessorConfig(size=32, crop_size=28, pad_to_square=pad)
    cfg.save(str(tmp_path))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)) == cfg
    loader = LlavaImageProcessorPil if pad else CLIPImageProcessorPil
    hf = loader.from_pretrained(str(tmp_path))
    img = _random_image("RGB", 37, 61, 3)
    ref = np.transpose(np.asarray(hf(images=img, return_tensors="np")["pixel_values"])[0], (1, 2, 0))
    np.testing.assert_allclose(image_lib.preprocess(img, cfg), ref, atol=TOL, rtol=0)
    # An HF processor saved by transformers is read back to the same settings.
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(str(hf_dir))
    assert ImageProcessorConfig.from_pretrained(str(hf_dir)) == cfg


def test_dict_roundtrip():
    cfg = ImageProcessorConfig(size=28, crop_size=28, pad_to_square=False)
    assert ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="Unknown"):
        ImageProcessorConfig.from_dict({"sise": 3})


def test_from_pretrained_int_sizes_and_override(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224}))
    cfg = ImageProcessorConfig.from_pretrained(str(tmp_path))
    assert (cfg.size, cfg.crop_size, cfg.pad_to_square) == (224, 224, False)
    assert ImageProcessorConfig.from_pretrained(str(tmp_path), image_aspect_ratio="pad").pad_to_square
    with pytest.raises(ValueError, match="'pad' or 'square'"):
        ImageProcessorConfig.from_pretrained(str(tmp_path), image_aspect_ratio="padd")


def test_from_pretrained_original_llava_config(tmp_path):
    conf = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad"}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    cfg = ImageProcessorConfig.from_pretrained(str(tmp_path))
    assert cfg == ImageProcessorConfig(size=336, crop_size=336, pad_to_square=True)
    assert not ImageProcessorConfig.from_pretrained(str(tmp_path), image_aspect_ratio="square").pad_to_square
    conf = {"mm_vision_tower": "openai/clip-vit-large-patch14", "image_aspect_ratio": "square"}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)) == dataclasses.replace(
        ImageProcessorConfig(), size=224, crop_size=224, pad_to_square=False
    )


def test_from_pretrained_clip_processor_with_llava_aspect_ratio(tmp_path):
    # Original LLaVA dir: the CLIP processor JSON (no do_pad) next to a config.json asking for "pad".
    ImageProcessorConfig(size=336, crop_size=336, pad_to_square=False).save(str(tmp_path))
    hf = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del hf["do_pad"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf))
    conf = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad"}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert ImageProcessorConfig.from_pretrained(str(tmp_path)).pad_to_square
    # An explicit do_pad wins over config.json; the argument wins over both.
    hf["do_pad"] = False
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf))
    assert not ImageProcessorConfig.from_pretrained(str(tmp_path)).pad_to_square
    assert ImageProcessorConfig.from_pretrained(str(tmp_path), image_aspect_ratio="pad").pad_to_square


def test_from_pretrained_missing_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ImageProcessorConfig.from_pretrained(str(tmp_path))
