"""The SigLIP vision tower against transformers: hidden states, the LLaVA around it, loading and export.

SigLIP (LLaVA-OneVision's tower) has no class token: strategy "full" keeps every patch, and a tile is
grid x grid tokens. Its checkpoints may hold `post_layernorm` and the attention-pooling `head`, which
LLaVA never runs: loading skips them, conversion keeps them, export writes them back bit for bit.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.config import (
    LlavaConfig,
    VisionConfig,
    llava_config_from_hf,
    llava_config_to_hf,
    text_config_from_hf,
    vision_config_from_hf,
)
from llava_jax.convert import main
from llava_jax.models.llava import abstract_params
from llava_jax.models.siglip import SiglipVisionTower
from llava_jax.models.vision import build_vision_tower
from llava_jax.weights import export, mapping
from llava_jax.weights.entries import load_entries
from llava_jax.weights.safetensors_io import TensorStore, save_file
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, perturb_, text_config_dict, torch_logits
from tests.test_convert_formats import assert_logits_match, hf_tensors, inputs

TINY_TEXT = text_config_from_hf(text_config_dict())
GRID = 2  # 28 px images of 14 px patches


def siglip_config_dict(*, layers=3, head=True) -> dict:
    """A tiny SigLIP (transformers' defaults otherwise: gelu_pytorch_tanh, eps 1e-6)."""
    return dict(hidden_size=32, intermediate_size=68, num_hidden_layers=layers, num_attention_heads=4,
                image_size=28, patch_size=14, vision_use_head=head)


def _tower(seed: int, **kw):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return perturb_(SiglipVisionModel(SiglipVisionConfig(**siglip_config_dict(**kw))), seed)


def _llava(seed: int, *, feature_layer=-1, head=True):
    """A perturbed tiny `LlavaForConditionalGeneration` on a SigLIP tower, strategy "full" (OneVision's)."""
    from transformers import LlamaConfig, LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration
    from transformers import SiglipVisionConfig

    torch.manual_seed(seed)
    cfg = HFLlavaConfig(
        vision_config=SiglipVisionConfig(**siglip_config_dict(head=head)),
        text_config=LlamaConfig(**text_config_dict()),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=GRID * GRID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    return perturb_(LlavaForConditionalGeneration(cfg), seed)


def _vision_params(store: TensorStore, cfg: LlavaConfig) -> dict:
    layout = mapping.detect_layout(store.keys())
    return load_entries(store, cfg, mapping.vision_entries(cfg), layout, dtype=np.dtype("float32"),
                        source=store.source)["vision_tower"]


def _reference(hf, px: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = hf(torch.as_tensor(px.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    return tuple(h.numpy() for h in out.hidden_states)


def test_hidden_states_match_transformers_scanned_and_unrolled(tmp_path):
    seed = fresh_seed()
    hf = _tower(seed)
    hf.save_pretrained(tmp_path)
    vision = vision_config_from_hf(hf.config.to_dict())
    assert (vision.model_type, vision.hidden_act, vision.layer_norm_eps) == ("siglip_vision_model",
                                                                              "gelu_pytorch_tanh", 1e-6)
    px = np.random.default_rng(seed).standard_normal((2, 28, 28, 3)).astype(np.float32)
    ref = _reference(hf, px)
    store = TensorStore.from_dir(str(tmp_path))
    for layer in (1, -1):  # the embeddings feed both; 1: the layers past it are not built
        cfg = LlavaConfig(vision=vision, text=TINY_TEXT, vision_feature_layer=layer,
                          vision_feature_select_strategy="full")
        params = _vision_params(store, cfg)  # stacked (`layers`), the default layout
        n = cfg.num_vision_layers_used
        assert {x.shape[0] for x in jax.tree.leaves(params.get("layers", {}))} == ({n} if n else set())
        scanned = np.asarray(jax.jit(SiglipVisionTower(vision, n).apply)({"params": params}, px))
        assert scanned.shape == (2, GRID * GRID, 32)  # no class token
        # Float32 rounding at activations of ~40 (one ulp is 4e-6): 1e-5 absolute, a little more where larger.
        np.testing.assert_allclose(scanned, ref[layer], atol=1e-5, rtol=1e-6, err_msg=f"layer {layer}")
    unrolled = jax.jit(SiglipVisionTower(vision, n, scan_layers=False).apply)
    got = np.asarray(unrolled({"params": mapping.unstack_layers(params)}, px))
    assert set(mapping.unstack_layers(params)) == {"embeddings", "layers_0", "layers_1", "layers_2"}
    np.testing.assert_allclose(got, scanned, atol=1e-5, rtol=1e-6)


def test_original_llava_next_layout_loads_the_embedded_tower(tmp_path):
    """LLaVA-NeXT's SigLipVisionTower saves under `model.vision_tower.vision_tower.vision_model.`, its head an
    Identity (no tensors) and its last layer deleted; post_layernorm is still there and is skipped."""
    seed = fresh_seed()
    hf = _tower(seed)
    hf.save_pretrained(tmp_path / "tower")
    store = TensorStore.from_dir(str(tmp_path / "tower"))
    prefix = "model.vision_tower.vision_tower.vision_model."
    tensors = [(prefix + k, np.array(store.get(k))) for k in store.keys()
               if not k.startswith("head.") and not k.startswith("encoder.layers.2.")]
    os.makedirs(tmp_path / "orig")
    save_file(tensors, str(tmp_path / "orig" / "model.safetensors"))
    orig = TensorStore.from_dir(str(tmp_path / "orig"))
    assert mapping.find_vision_prefix(orig.keys()) == prefix
    assert mapping.vision_model_type_of(orig.keys(), prefix) == "siglip_vision_model"
    vision = VisionConfig(**{**vision_config_from_hf(hf.config.to_dict()).__dict__, "num_layers": 2,
                             "vision_use_head": False})
    cfg = LlavaConfig(vision=vision, text=TINY_TEXT, vision_feature_layer=-1, vision_feature_select_strategy="full")
    params = _vision_params(orig, cfg)
    px = np.random.default_rng(seed).standard_normal((1, 28, 28, 3)).astype(np.float32)
    got = np.asarray(SiglipVisionTower(vision, 2).apply({"params": params}, px))
    np.testing.assert_allclose(got, _reference(hf, px)[2], atol=1e-5, rtol=1e-6)


def test_vision_model_type_of_tells_clip_from_siglip():
    assert mapping.vision_model_type_of(["v.embeddings.class_embedding", "v.embeddings.patch_embedding.weight"],
                                        "v.") == "clip_vision_model"
    with pytest.raises(ValueError, match="cannot tell the vision tower under 'v.'"):
        mapping.vision_model_type_of(["v.embeddings.patch_embedding.weight"], "v.")


def test_llava_on_siglip_logits_match_transformers(tmp_path):
    """A llava-hf directory with a SigLIP tower (head and post_layernorm saved, never used) through
    `load_pretrained`: 4 image tokens an image (no class token), logits within 1e-4 of transformers."""
    seed = fresh_seed()
    hf = _llava(seed)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    assert ours.config.vision.model_type == "siglip_vision_model" and ours.config.num_image_tokens == GRID * GRID
    assert "class_embedding" not in ours.params["vision_tower"]["embeddings"]
    assert_logits_match(hf, ours, GRID * GRID, seed)


def test_conversion_and_export_round_trip_is_bit_exact(tmp_path, capsys):
    """HF -> ours -> HF: every tensor of the source (the unused last layer, post_layernorm and the pooling
    head included) bit for bit, a config transformers loads with nothing missing, the same logits."""
    from transformers import LlavaForConditionalGeneration

    seed = fresh_seed()
    hf = _llava(seed, feature_layer=-2)
    src, ours, out = tmp_path / "src", str(tmp_path / "ours"), str(tmp_path / "hf")
    tensors = hf_tensors(hf, src)
    assert any(k.startswith("vision_tower.head.") for k in tensors)
    assert main(["--src", str(src), "--dst", ours]) == 0
    assert main(["--src", ours, "--dst", out, "--to", "hf"]) == 0
    assert "filled" not in capsys.readouterr().out  # nothing made up: conversion kept what LLaVA does not use
    exported = TensorStore.from_dir(out)
    # transformers 5 saves the tower without its `vision_model.` level; llava-hf (and our export) keep it.
    published = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    assert sorted(exported.keys()) == sorted(published)
    for k, v in published.items():
        np.testing.assert_array_equal(exported.get(k), v, err_msg=k)
    with open(os.path.join(out, "config.json")) as f:
        vision = json.load(f)["vision_config"]
    assert vision["model_type"] == "siglip_vision_model" and vision["vision_use_head"] is True
    back, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, mask, px = inputs(GRID * GRID, seed)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    np.testing.assert_array_equal(torch_logits(back, ids, px, mask, pos), torch_logits(hf, ids, px, mask, pos))


@pytest.mark.parametrize("head", [True, False])
def test_export_plan_names_every_tensor_transformers_has(head):
    """Without the source's extras (a training checkpoint), export fills exactly the tensors a transformers
    LLaVA on this SigLIP holds: names and shapes as its state dict, head or no head."""
    hf = _llava(0, feature_layer=-2, head=head)
    cfg = llava_config_from_hf(hf.config.to_dict())
    assert cfg.vision.vision_use_head is head
    planned, notes = export.plan_tensors(cfg, np.dtype("float32"), None)
    legacy = {k.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.language_model.",
              "language_model.model.").replace("lm_head.", "language_model.lm_head.")
              .replace("model.multi_modal_projector.", "multi_modal_projector."): tuple(v.shape)
              for k, v in hf.state_dict().items()}
    assert {t.name: t.shape for t in planned} == legacy
    # post_layernorm, the unused last layer (16 tensors) and the head's 11.
    assert any(f"filled {2 + 16 + 11 * head} " in n for n in notes), notes


def test_config_round_trip_and_geometry():
    """SigLIP parses from, and exports to, its transformers config; a tile is grid x grid tokens with
    strategy "full" (no class token to keep)."""
    from transformers import SiglipVisionConfig

    hf = SiglipVisionConfig(**siglip_config_dict(head=False)).to_dict()
    vision = vision_config_from_hf(hf, "tower/config.json")
    cfg = LlavaConfig(vision=vision, text=TINY_TEXT, vision_feature_layer=-1, vision_feature_select_strategy="full")
    assert cfg.geometry.extra_tokens == 0 and cfg.num_image_tokens == GRID * GRID
    assert vision.num_positions == vision.num_patches == GRID * GRID
    back = llava_config_to_hf(cfg)
    assert back["image_seq_length"] == GRID * GRID
    assert vision_config_from_hf(back["vision_config"]) == vision
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # transformers' own defaults where a config.json leaves fields out; a SiglipConfig's vision part.
    assert vision_config_from_hf({"model_type": "siglip_vision_model"}) == VisionConfig(
        hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224, patch_size=16,
        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", model_type="siglip_vision_model", vision_use_head=True)
    nested = vision_config_from_hf({"model_type": "siglip", "vision_config": {"hidden_size": 64}})
    assert (nested.model_type, nested.hidden_size) == ("siglip_vision_model", 64)
    # CLIP stays what it was: no model_type means CLIP, and its class token still counts under "full".
    clip = vision_config_from_hf({"hidden_size": 32, "image_size": 28, "patch_size": 14})
    assert clip.model_type == "clip_vision_model" and clip.num_positions == GRID * GRID + 1
    full = LlavaConfig(vision=clip, text=TINY_TEXT, vision_feature_select_strategy="full", vision_feature_layer=-1)
    assert full.geometry.extra_tokens == 1


def test_unknown_vision_model_type_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^ckpt/config.json: vision model_type 'dinov2' is not supported"):
        vision_config_from_hf({"model_type": "dinov2", "hidden_size": 32}, "ckpt/config.json")
    llava = {"model_type": "llava", "vision_config": {"model_type": "siglip2_vision_model"}, "text_config": {}}
    with pytest.raises(ValueError, match=r"^ckpt/config.json: vision model_type 'siglip2_vision_model'"):
        llava_config_from_hf(llava, "ckpt/config.json")
    with pytest.raises(ValueError, match="vision model_type 'vit'"):
        VisionConfig(model_type="vit")
    with pytest.raises(ValueError, match="only a SigLIP tower has a pooling head"):
        VisionConfig(vision_use_head=True)


def test_siglip_tower_refuses_a_strategy_that_drops_a_class_token():
    """transformers would drop SigLIP's first patch under "default"; no checkpoint does, so it is an error."""
    vision = vision_config_from_hf(siglip_config_dict() | {"model_type": "siglip_vision_model"})
    cfg = LlavaConfig(vision=vision, text=TINY_TEXT, vision_feature_layer=-1)
    with pytest.raises(ValueError, match="'default' drops the class token, which a siglip_vision_model tower"):
        build_vision_tower(cfg)
    with pytest.raises(ValueError, match="'default' drops the class token"):
        abstract_params(cfg)


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "clip_vision_model"])
def test_vision_flops_count_the_tokens_the_tower_runs(model_type):
    """The MFU formula against XLA's count of the compiled tower: 4 tokens a tile for SigLIP, 5 for CLIP
    (its class token); wide enough that the matmuls dominate what XLA counts."""
    from llava_jax.train import flops

    v = VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, image_size=28,
                     patch_size=14, model_type=model_type)
    cfg = LlavaConfig(vision=v, text=TINY_TEXT, vision_feature_layer=-1, vision_feature_select_strategy="full")
    tower = build_vision_tower(cfg, scan_layers=False)
    px = jax.ShapeDtypeStruct((2, 28, 28, 3), np.float32)
    cost = jax.jit(tower.apply).lower(jax.eval_shape(tower.init, jax.random.key(0), px), px).compile().cost_analysis()
    counted = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert flops._vision_forward(cfg, 2) == pytest.approx(counted, rel=0.03)


def test_so400m_preset_is_onevisions_tower_and_every_parameter_is_mapped_and_sharded():
    """The preset is what transformers' LlavaOnevisionConfig builds by default (729 tokens a tile); a SigLIP
    LLaVA's parameters carry logical axes the rules map, and the mapping table names exactly them."""
    import flax.linen as nn
    from transformers import LlavaOnevisionConfig

    from llava_jax.config import SIGLIP_SO400M_384
    from llava_jax.models.llava import init_params
    from llava_jax.parallel.rules import check_rules

    assert vision_config_from_hf(LlavaOnevisionConfig().vision_config.to_dict()) == SIGLIP_SO400M_384
    ov = LlavaConfig(vision=SIGLIP_SO400M_384, text=TINY_TEXT, vision_feature_layer=-1,
                     vision_feature_select_strategy="full")
    assert ov.num_image_tokens == 729 and ov.num_vision_layers_used == 26
    vision = vision_config_from_hf(siglip_config_dict() | {"model_type": "siglip_vision_model"})
    for scan in (True, False):
        cfg = LlavaConfig(vision=vision, text=TINY_TEXT, vision_feature_layer=-2, vision_feature_select_strategy="full",
                          scan_layers=scan)
        boxed = jax.eval_shape(lambda cfg=cfg: init_params(cfg, jax.random.key(0)))
        check_rules(boxed)
        flat = {"/".join(str(getattr(k, "key", k)) for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
        assert flat == {"/".join(e.location(scan)[0]) for e in mapping.entries(cfg)}
        assert "vision_tower/embeddings/patch_embedding/bias" in flat


class _Shapes:
    """Tensor names and shapes only: what reading a config off a checkpoint's headers looks at."""

    def __init__(self, shapes: dict, source: str = "ckpt/model.safetensors"):
        self.shapes, self.source = shapes, source

    def keys(self):
        return self.shapes.keys()

    def shape(self, name):
        return self.shapes[name]


def test_original_checkpoint_embedding_so400m_reads_as_the_preset_with_its_layer_count():
    from llava_jax.config import SIGLIP_SO400M_384
    from llava_jax.weights.parts import infer_clip_config
    from llava_jax.weights.safetensors_io import CheckpointError

    p = "model.vision_tower.vision_tower.vision_model."
    shapes = {p + "embeddings.patch_embedding.weight": (1152, 3, 14, 14), p + "post_layernorm.weight": (1152,),
              p + "embeddings.patch_embedding.bias": (1152,), p + "embeddings.position_embedding.weight": (729, 1152)}
    shapes |= {p + f"encoder.layers.{i}.mlp.fc1.weight": (4304, 1152) for i in range(26)}
    assert infer_clip_config(_Shapes(shapes), p) == SIGLIP_SO400M_384
    shapes[p + "embeddings.position_embedding.weight"] = (576, 1152)  # another SigLIP: 336 px, its shapes read
    assert infer_clip_config(_Shapes(shapes), p).image_size == 336
    shapes[p + "embeddings.position_embedding.weight"] = (577, 1152)
    with pytest.raises(CheckpointError, match=r"^ckpt/model.safetensors: .*position_embedding.weight holds 577 "
                                              r"positions, not a square grid"):
        infer_clip_config(_Shapes(shapes), p)
