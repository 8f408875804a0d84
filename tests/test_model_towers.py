"""Each tower alone against its transformers reference: CLIP hidden states, LLaMA logits, projectors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_jax.config import LlavaConfig, text_config_from_hf, vision_config_from_hf
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.llama import LlamaModel
from llava_jax.models.projector import build_projector
from llava_jax.weights import mapping
from llava_jax.weights.hf import load_entries
from llava_jax.weights.safetensors_io import TensorStore
from tests._seeds import fresh_seed
from tests.hf_reference import perturb_, text_config_dict, vision_config_dict

TINY_VISION = vision_config_from_hf(vision_config_dict())
TINY_TEXT = text_config_from_hf(text_config_dict())


def _seed():
    return fresh_seed()


def _load(tmp_path, cfg, entries):
    store = TensorStore.from_dir(str(tmp_path))
    layout = mapping.detect_layout(store.keys())
    return load_entries(store, cfg, entries, layout, dtype=np.dtype("float32"), source=str(tmp_path))


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
def test_clip_hidden_states_match_transformers(tmp_path, layer):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    seed = _seed()
    torch.manual_seed(seed)
    hf = perturb_(CLIPVisionModel(CLIPVisionConfig(**vision_config_dict())), seed)
    hf.save_pretrained(tmp_path)
    cfg = LlavaConfig(vision=vision_config_from_hf(hf.config.to_dict()), text=TINY_TEXT, vision_feature_layer=layer)
    params = _load(tmp_path, cfg, mapping.vision_entries(cfg))["vision_tower"]
    px = np.random.default_rng(seed).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(px.transpose(0, 3, 1, 2).copy()), output_hidden_states=True).hidden_states[layer].numpy()
    tower = CLIPVisionTower(cfg.vision, cfg.num_vision_layers_used)
    got = np.asarray(tower.apply({"params": params}, px))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # Only the layers up to the feature layer exist (stacked on the leading axis): LLaVA never pays for the rest.
    n = cfg.num_vision_layers_used
    assert {x.shape[0] for x in jax.tree.leaves(params.get("layers", {}))} == ({n} if n else set())


LLAMA_CASES = {
    "mha-theta1e4": dict(kv_heads=4, theta=1e4),
    "gqa-theta5e5-tied": dict(kv_heads=2, theta=5e5, tie=True),
    "mqa-linear-scaling": dict(kv_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-scaling": dict(
        kv_heads=2,
        theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_logits_match_transformers(tmp_path, case):
    from transformers import LlamaConfig, LlamaForCausalLM

    seed = _seed()
    torch.manual_seed(seed)
    hf = perturb_(LlamaForCausalLM(LlamaConfig(**text_config_dict(**LLAMA_CASES[case]))), seed)
    hf.save_pretrained(tmp_path)
    text = text_config_from_hf(hf.config.to_dict())
    cfg = LlavaConfig(vision=TINY_VISION, text=text)
    params = _load(tmp_path, cfg, mapping.text_entries(cfg))["language_model"]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, text.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    model = LlamaModel(text)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=LlamaModel.embed)
    got, _ = model.apply({"params": params}, embeds, jnp.broadcast_to(jnp.arange(40), (2, 40)), jnp.ones((2, 40)))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        text_config_from_hf(text_config_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("kind,depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_matches_hand_built_reference(kind, depth):
    """Linear layers with exact (erf) GELU between them, computed by hand in float64 numpy."""
    from scipy.special import erf

    rng = np.random.default_rng(_seed())
    proj = build_projector(kind, 24, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    params = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32),
                          jax.eval_shape(lambda: proj.init(jax.random.key(0), x)["params"]))
    params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params,
                          is_leaf=lambda a: hasattr(a, "value"))
    assert sorted(params) == [f"linear_{k}" for k in range(1, depth + 1)]
    ref = x.astype(np.float64)
    for k in range(1, depth + 1):
        if k > 1:
            ref = 0.5 * ref * (1 + erf(ref / np.sqrt(2)))
        ref = ref @ params[f"linear_{k}"]["kernel"] + params[f"linear_{k}"]["bias"]
    np.testing.assert_allclose(np.asarray(proj.apply({"params": params}, x)), ref, atol=1e-4, rtol=1e-5)


def test_unknown_projector_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32)


def test_every_parameter_has_logical_axes():
    """Sharding rules need names on every parameter: none may be left unannotated."""
    import flax.linen as nn

    from llava_jax.models.llava import init_params

    cfg = LlavaConfig(vision=TINY_VISION, text=TINY_TEXT)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    # And the mapping table names exactly the parameters the model has.
    flat = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
    assert flat == {"/".join(e.location(cfg.scan_layers)[0]) for e in mapping.entries(cfg)}


def test_a_new_projector_names_its_dense_layers_as_it_likes():
    """The registry's promise: a factory is all a new projector needs, whatever its layers are called.

    The mapping, the built parameters and the FLOP count agree on a projector whose Dense layers are
    not `linear_N` (created in an order their names do not sort in); a parameter outside a Dense layer
    is refused by name, since no checkpoint name exists for it.
    """
    import flax.linen as nn

    from llava_jax.models.layers import dense
    from llava_jax.models.llava import abstract_params
    from llava_jax.models.projector import projector_linears, register_projector
    from llava_jax.train import flops

    class Bottleneck(nn.Module):
        out_features: int
        use_bias: bool = True
        dtype: jnp.dtype = jnp.float32
        param_dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
            x = dense(4 * self.out_features, ("vision_embed", "proj_mlp"), name="wide", **kw)(x)
            return dense(self.out_features, ("proj_mlp", "embed"), name="narrow", **kw)(jax.nn.relu(x))

    class Normed(Bottleneck):
        @nn.compact
        def __call__(self, x):
            kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
            return nn.LayerNorm(name="norm")(dense(self.out_features, ("vision_embed", "embed"), name="fc", **kw)(x))

    register_projector(r"^test_bottleneck$")(lambda m, out_features, **kw: Bottleneck(out_features, **kw))
    register_projector(r"^test_normed$")(lambda m, out_features, **kw: Normed(out_features, **kw))

    assert projector_linears("test_bottleneck") == ("wide", "narrow")
    cfg = LlavaConfig(vision=TINY_VISION, text=TINY_TEXT, projector_type="test_bottleneck")
    rows = mapping.projector_entries(cfg)
    built = jax.tree_util.tree_flatten_with_path(abstract_params(cfg)["projector"])[0]
    assert sorted(e.ours for e in rows) == sorted("/".join(k.key for k in path) for path, _ in built)
    assert [e.theirs for e in rows] == ["wide.weight", "wide.bias", "narrow.weight", "narrow.bias"]
    v, t = cfg.vision.hidden_size, cfg.text.hidden_size
    assert flops._projector_forward(cfg, 3) == 2 * 3 * cfg.num_image_tokens * (v * 4 * t + 4 * t * t)
    with pytest.raises(ValueError, match=r"'test_normed': parameters \['norm'\] are not Dense layers"):
        projector_linears("test_normed")
