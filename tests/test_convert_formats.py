"""Every input format of `llava_jax.convert` -> ours gives the logits of transformers' LLaVA (float32, 1e-4).

Sources are written from tiny perturbed transformers models: HF LLaVA as transformers saves it
(safetensors) and renamed to the other key layout as sharded torch .bin; original LLaVA written by
hand (LLaMA keys + `model.mm_projector.{0,2}` + `mm_*` config fields) with the CLIP tower as its own
directory (`CLIPVisionModel.save_pretrained`) or embedded in a .bin; CLIP + LLaMA + mm_projector.bin parts.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.convert import main
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.weights.converted import load_params
from llava_jax.weights.safetensors_io import TensorStore, save_file
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, VOCAB, perturb_, random_ids, text_config_dict, torch_logits, vision_config_dict

ATOL = 1e-4


def make_model(seed: int, *, vision_hidden: int = 32, vision_heads: int = 4):
    """A perturbed tiny `LlavaForConditionalGeneration` (float32); returns (model, image tokens per image)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(**vision_config_dict(hidden=vision_hidden, heads=vision_heads))
    tc = LlamaConfig(**text_config_dict())
    n_img = (vc.image_size // vc.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=n_img, vision_feature_layer=-2)
    return perturb_(LlavaForConditionalGeneration(cfg), seed), n_img


def inputs(n_img: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two right-padded rows with one image each: (input_ids [2, T], attention_mask, pixels [2, 28, 28, 3])."""
    rng = np.random.default_rng(seed)
    rows = [[1, *random_ids(rng, 3), *[IMAGE_TOKEN] * n_img, *random_ids(rng, k)] for k in (6, 3)]
    t = max(map(len, rows))
    ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    return ids, mask, rng.standard_normal((2, 28, 28, 3)).astype(np.float32)


def assert_logits_match(hf_model, ours, n_img: int, seed: int, image_token: int = IMAGE_TOKEN, atol: float = ATOL) -> float:
    """Ours (with `image_token` for <image>) against transformers over the valid positions of a batch."""
    ids, mask, px = inputs(n_img, seed)
    ref = torch_logits(hf_model, ids, px, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
    got = np.asarray(ours(np.where(ids == IMAGE_TOKEN, image_token, ids), px, mask).logits)
    err = float(np.abs(got[..., : ref.shape[-1]] - ref)[mask.astype(bool)].max())
    assert err < atol, f"max abs logit error {err:.2e}"
    return err


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_spm_dir) -> str:
    """The session's tiny tokenizer (tests/conftest.py)."""
    return tiny_spm_dir


def hf_tensors(model, directory) -> dict[str, np.ndarray]:
    """The model's tensors as transformers saves them (legacy llava-hf names)."""
    model.save_pretrained(directory)
    store = TensorStore.from_dir(str(directory))
    return {k: np.array(store.get(k)) for k in store.keys()}


def save_bin(tensors: dict[str, np.ndarray], directory, shards: int = 1) -> None:
    """Torch .bin shards (with an index when more than one) as older checkpoints ship them."""
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, os.path.join(directory, fname))
        weight_map.update({k: fname for k in part})
    if shards > 1:
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)


def rename(tensors: dict, pairs) -> dict:
    out = {}
    for k, v in tensors.items():
        for a, b in pairs:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v
    return out


def convert(tmp_path, *args: str) -> str:
    dst = str(tmp_path / "ours")
    assert main([*args, "--dst", dst]) == 0
    return dst


@pytest.mark.parametrize("variant", ["safetensors", "bin_new_layout_sharded"])
def test_hf_llava_matches_transformers(tmp_path, tokenizer_dir, variant):
    seed = fresh_seed()
    hf, n_img = make_model(seed)
    src = tmp_path / "src"
    tensors = hf_tensors(hf, src)
    if variant != "safetensors":  # transformers 4.52-4.57 names, as torch pickles in two shards
        for f in os.listdir(src):
            if f.endswith(".safetensors"):
                os.remove(src / f)
        new = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))
        save_bin(rename(tensors, new), src, shards=2)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), src / "tokenizer.model")
    ImageProcessorConfig(size=28, crop_size=28, pad_to_square=True).save(str(src))
    dst = convert(tmp_path, "--src", str(src))
    assert sorted(os.listdir(dst)) == sorted(
        ["llava_jax_config.json", "params", "extra.safetensors", "tokenizer.model", "preprocessor_config.json"]
    )
    assert open(os.path.join(dst, "tokenizer.model"), "rb").read() == open(src / "tokenizer.model", "rb").read()
    assert ImageProcessorConfig.from_pretrained(dst).pad_to_square
    extra = TensorStore.from_dir(dst)  # kept for export: CLIP's last layer and post_layernorm, bit for bit
    for k in extra.keys():
        np.testing.assert_array_equal(extra.get(k), tensors[k.replace("vision_tower.vision_model.", "vision_tower.")])
    print(f"{variant}: max logit error {assert_logits_match(hf, load_pretrained(dst), n_img, seed):.2e}")


def write_original(hf, directory, *, tower_dir=None, use_bin=False, aspect="pad") -> None:
    """An original LLaVA checkpoint (liuhaotian/llava-v1.5 style) written by hand from a transformers LLaVA.

    With `tower_dir` the CLIP tower goes there (CLIPVisionModel.save_pretrained) and not into the
    checkpoint; without, it is embedded as `model.vision_tower.vision_tower.vision_model.*`.
    """
    from transformers import CLIPVisionModel

    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model.") :]] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            i, leaf = k.split("linear_")[1].split(".")
            out[f"model.mm_projector.{2 * (int(i) - 1)}.{leaf}"] = v
        elif k.startswith("model.vision_tower.") and tower_dir is None:
            out["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower.") :]] = v
    assert any(k.startswith("model.mm_projector.2.") for k in out)
    os.makedirs(directory, exist_ok=True)
    if use_bin:
        save_bin(out, directory)
    else:
        save_file(sorted(out.items()), os.path.join(directory, "model.safetensors"))
    tc = hf.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": tc.vocab_size,
        "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "rms_norm_eps": tc.rms_norm_eps, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "pad_token_id": 0, "hidden_act": "silu",
        "mm_vision_tower": "openai/clip-vit-tiny-patch14-28", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": hf.config.vision_config.hidden_size,
        "image_aspect_ratio": aspect, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if tower_dir is not None:
        tower = CLIPVisionModel(hf.config.vision_config)
        tower.load_state_dict(hf.model.vision_tower.state_dict())
        tower.save_pretrained(tower_dir)


def test_original_llava_with_clip_dir_matches_transformers(tmp_path):
    seed = fresh_seed()
    hf, n_img = make_model(seed)
    write_original(hf, tmp_path / "llava-v1.5", tower_dir=tmp_path / "clip")
    dst = convert(tmp_path, "--src", str(tmp_path / "llava-v1.5"), "--vision-tower", str(tmp_path / "clip"))
    ours = load_pretrained(dst)
    # The original splices images at run time; ours takes the first id past the vocabulary for <image>.
    assert ours.config.image_token_index == VOCAB and ours.config.projector_type == "mlp2x_gelu"
    assert ImageProcessorConfig.from_pretrained(dst).pad_to_square  # image_aspect_ratio "pad"
    print(f"original: max logit error {assert_logits_match(hf, ours, n_img, seed, image_token=VOCAB):.2e}")


def test_original_llava_bin_with_embedded_tower_matches_transformers(tmp_path):
    """liuhaotian checkpoints are torch .bin and carry the tower; its config comes from the shapes (64-wide heads)."""
    seed = fresh_seed()
    hf, n_img = make_model(seed, vision_hidden=64, vision_heads=1)
    write_original(hf, tmp_path / "llava-v1.5", use_bin=True, aspect="square")
    dst = convert(tmp_path, "--src", str(tmp_path / "llava-v1.5"))
    ours = load_pretrained(dst)
    assert not ImageProcessorConfig.from_pretrained(dst).pad_to_square
    print(f"original .bin: max logit error {assert_logits_match(hf, ours, n_img, seed, image_token=VOCAB):.2e}")


def write_parts(hf, tensors: dict, root) -> tuple[str, str, str]:
    """A full CLIPModel directory (text tower too), a LLaMA directory and mm_projector.bin from one LLaVA."""
    clip, llm = root / "clip-vit", root / "vicuna"
    os.makedirs(clip)
    os.makedirs(llm)
    vision = {"vision_model." + k[len("vision_tower.") :]: v for k, v in tensors.items() if k.startswith("vision_tower.")}
    text_tower = {"text_model.embeddings.token_embedding.weight": np.ones((99, 16), np.float32),
                  "text_model.final_layer_norm.weight": np.ones(16, np.float32),
                  "text_projection.weight": np.ones((16, 16), np.float32), "visual_projection.weight": np.ones((16, 32), np.float32),
                  "logit_scale": np.array(2.6, np.float32)}
    save_file(sorted((vision | text_tower).items()), str(clip / "model.safetensors"))
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": hf.config.vision_config.to_dict()}))
    lm = rename({k: v for k, v in tensors.items() if k.startswith("language_model.")},
                (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")))
    save_file(sorted(lm.items()), str(llm / "model.safetensors"))
    (llm / "config.json").write_text(json.dumps(hf.config.text_config.to_dict() | {"model_type": "llama"}))
    proj = {f"model.mm_projector.{2 * (int(k.split('linear_')[1][0]) - 1)}.{k.split('.')[-1]}": v
            for k, v in tensors.items() if k.startswith("multi_modal_projector.")}
    torch.save({k: torch.from_numpy(v) for k, v in proj.items()}, root / "mm_projector.bin")
    return str(clip), str(llm), str(root / "mm_projector.bin")


def test_parts_with_stage1_projector_match_transformers(tmp_path):
    seed = fresh_seed()
    hf, n_img = make_model(seed)
    clip, llm, proj = write_parts(hf, hf_tensors(hf, tmp_path / "hf"), tmp_path)
    dst = convert(tmp_path, "--vision-tower", clip, "--llm", llm, "--projector", proj, "--image-token-index", str(IMAGE_TOKEN))
    print(f"parts: max logit error {assert_logits_match(hf, load_pretrained(dst), n_img, seed):.2e}")


def test_parts_fresh_projector_is_torch_linear_init(tmp_path):
    """Without --projector the towers are copied exactly and the projector drawn as nn.Linear's default."""
    hf, _ = make_model(0)
    tensors = hf_tensors(hf, tmp_path / "hf")
    clip, llm, _ = write_parts(hf, tensors, tmp_path)
    a = convert(tmp_path, "--vision-tower", clip, "--llm", llm, "--seed", "3")
    assert main(["--vision-tower", clip, "--llm", llm, "--seed", "3", "--dst", str(tmp_path / "again")]) == 0
    cfg, p = load_params(a)
    _, again = load_params(str(tmp_path / "again"))
    assert cfg.projector_type == "mlp2x_gelu" and cfg.vision_feature_layer == -2
    np.testing.assert_array_equal(np.asarray(p["language_model"]["layers"]["mlp"]["down_proj"]["kernel"][1]),
                                  tensors["language_model.model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["vision_tower"]["layers"]["self_attn"]["q_proj"]["bias"][0]),
                                  tensors["vision_tower.encoder.layers.0.self_attn.q_proj.bias"])
    for name, fan_in in (("linear_1", 32), ("linear_2", 64)):
        for leaf in ("kernel", "bias"):
            x = np.asarray(p["projector"][name][leaf])
            np.testing.assert_array_equal(x, np.asarray(again["projector"][name][leaf]))  # seeded
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound, (name, leaf)
            if x.size > 1000:  # uniform: std = bound / sqrt(3)
                assert abs(x.std() / (bound / np.sqrt(3)) - 1) < 0.05
