"""Text families as configuration: Mistral (sliding window), Qwen2 (q/k/v bias, tied embeddings) and
Llama-3 (llama3 rope) decoders inside a tiny LLaVA, against transformers in float32.

Every model goes through the real loading path: a tiny `LlavaForConditionalGeneration` whose
`text_config` is a MistralConfig / Qwen2Config / LlamaConfig (transformers builds the language model
from `text_config.model_type`), saved with `save_pretrained`, read by `llava_jax.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llava_jax import load_pretrained
from llava_jax.config import TextConfig, text_config_from_hf, text_config_to_hf
from llava_jax.inference.engine import Engine, Prompt
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.llava import LlavaModel
from tests._inference import hf_generate
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, perturb_, random_ids, text_config_dict, vision_config_dict
from tests.test_model_llava import _batch, _compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 5  # shorter than every test sequence with an image (4 image tokens + text)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small, so that the tiny head's frequencies fall in all three llama3 bands
               "original_max_position_embeddings": 64}


def make_family_llava(seed: int, family: str, *, window: int | None = None, tie: bool = False,
                      rope_scaling: dict | None = None, theta: float = 1e4, act: str = "silu"):
    """A perturbed tiny float32 `LlavaForConditionalGeneration` with a `family` text config."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              MistralConfig, Qwen2Config)

    torch.manual_seed(seed)
    text = text_config_dict(kv_heads=2, theta=theta, rope_scaling=rope_scaling, tie=tie) | {"hidden_act": act}
    if family == "mistral":
        tc = MistralConfig(**text, sliding_window=window)
    elif family == "qwen2":  # the window in every layer: max_window_layers 0
        tc = Qwen2Config(**text, use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    else:
        tc = LlamaConfig(**text)
    vc = CLIPVisionConfig(**vision_config_dict())
    n_img = (vc.image_size // vc.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=n_img,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=tie)
    return perturb_(LlavaForConditionalGeneration(cfg), seed), n_img


# (family, window, tie, rope scaling, theta, the TextConfig fields the load must give); the Llama-3
# case also runs its MLP with GELU (the decoder reads `hidden_act`; SiLU everywhere else).
CASES = {
    "mistral_window": ("mistral", WINDOW, False, None, 1e6,
                       dict(model_type="mistral", sliding_window=WINDOW, qkv_bias=False, attention_bias=False)),
    "qwen2_tied": ("qwen2", None, True, None, 1e6,
                   dict(model_type="qwen2", sliding_window=None, qkv_bias=True, attention_bias=False,
                        tie_word_embeddings=True)),
    "qwen2_window": ("qwen2", WINDOW, False, None, 1e4,
                     dict(model_type="qwen2", sliding_window=WINDOW, qkv_bias=True)),
    "llama3_rope": ("llama", None, False, LLAMA3_ROPE, 5e5,
                    dict(model_type="llama", sliding_window=None, rope_scaling=tuple(sorted(LLAMA3_ROPE.items())),
                         hidden_act="gelu")),
}


@pytest.mark.parametrize("case,pad_side", [("mistral_window", "right"), ("mistral_window", "left"),
                                           ("qwen2_tied", "left"), ("qwen2_window", "right"), ("llama3_rope", "left")])
def test_family_logits_match_transformers(tmp_path, case, pad_side):
    """Three rows (one image, text only, two images) in a padded batch; logits within 1e-4."""
    family, window, tie, rope, theta, fields = CASES[case]
    seed = fresh_seed()
    hf, n_img = make_family_llava(seed, family, window=window, tie=tie, rope_scaling=rope, theta=theta,
                                  act=fields.get("hidden_act", "silu"))
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    for k, v in fields.items():
        assert getattr(ours.config.text, k) == v, (k, getattr(ours.config.text, k))
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 0, 2], pad_side)
    pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
    _compare(hf, ours, ids, mask, pixels)
    if window is not None:  # the window is shorter than the rows: without it the logits differ
        full = LlavaModel(ours.config.replace(text=dataclasses.replace(ours.config.text, sliding_window=None)),
                          ours.params)
        diff = np.abs(np.asarray(full(ids, pixels, mask).logits) - np.asarray(ours(ids, pixels, mask).logits))
        assert diff[mask.astype(bool)].max() > 1e-2


@pytest.mark.slow(seconds=12)
def test_sliding_window_greedy_decode_equals_generate(tmp_path):
    """KV-cache decoding with a window of 5 over prompts of 14 and 19 tokens (one with an image),
    left-padded together in one batch, gives transformers' greedy ids and log-probs of each alone."""
    seed = fresh_seed()
    hf, n_img = make_family_llava(seed, "mistral", window=WINDOW, theta=1e6)
    hf.save_pretrained(tmp_path)
    engine = Engine(load_pretrained(str(tmp_path)))
    rng = np.random.default_rng(seed)
    prompts = [Prompt(np.asarray([1, *random_ids(rng, 13)], np.int32), None),
               Prompt(np.asarray([1, *random_ids(rng, 3), *[IMAGE_TOKEN] * n_img, *random_ids(rng, 11)], np.int32),
                      rng.standard_normal((1, 28, 28, 3)).astype(np.float32))]
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = engine.generate(prompts, greedy)
    for p, b in zip(prompts, batched):  # each against transformers on its prompt alone (no padding)
        ref_ids, ref_lp = hf_generate(hf, p.ids[None], p.images, max_new_tokens=10, eos=None)
        assert b.token_ids == ref_ids[0].tolist()
        assert np.abs(np.asarray(b.logprobs) - ref_lp[0]).max() < 1e-4


TEXT_CONFIGS = [
    TextConfig(),
    TextConfig(attention_bias=True, mlp_bias=True, hidden_act="gelu", rope_scaling=tuple(sorted(LLAMA3_ROPE.items()))),
    TextConfig(model_type="mistral", sliding_window=4096, num_kv_heads=8, rope_theta=1e6),
    TextConfig(model_type="mistral"),
    TextConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True),
    TextConfig(model_type="qwen2", qkv_bias=True, sliding_window=32),
]


@pytest.mark.parametrize("t", TEXT_CONFIGS, ids=lambda t: f"{t.model_type}-{t.sliding_window}")
def test_text_config_round_trips_through_each_familys_hf_dict(t):
    """ours -> transformers' dict -> ours is the identity, and transformers reads the dict as that family."""
    from transformers import AutoConfig

    d = text_config_to_hf(t)
    assert d["model_type"] == t.model_type
    assert text_config_from_hf(d) == t
    hf = AutoConfig.for_model(**d)
    assert type(hf).__name__.lower().startswith(t.model_type)
    assert text_config_from_hf(hf.to_dict()) == t  # as transformers writes it back (layer_types, rope_parameters)
    assert getattr(hf, "sliding_window", None) == t.sliding_window


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_missing_fields_default_as_transformers_does(family):
    """A config.json that leaves every field out parses as the transformers class's own defaults."""
    from transformers import AutoConfig

    assert text_config_from_hf({"model_type": family}) == text_config_from_hf(AutoConfig.for_model(family).to_dict())
    t = text_config_from_hf({"model_type": family})
    # The family-specific defaults the table must carry (transformers 5's config classes).
    expected = {"llama": (32000, 32, 2048, None), "mistral": (32000, 8, 131072, 4096),
                "qwen2": (151936, 32, 32768, None)}[family]
    assert (t.vocab_size, t.num_kv_heads, t.max_position_embeddings, t.sliding_window) == expected


@pytest.mark.parametrize("bad,message", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, num_hidden_layers=4, max_window_layers=2),
     "some layers only"),
    (dict(model_type="gemma"), "not a LLaMA-family decoder"),
    (dict(model_type="llama", hidden_act="relu"), "hidden_act 'relu'"),
])
def test_unsupported_text_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        text_config_from_hf(bad, "config.json")


def test_layouts_no_transformers_class_builds_are_refused_by_export():
    for t in (TextConfig(model_type="mistral", attention_bias=True), TextConfig(sliding_window=8),
              TextConfig(model_type="qwen2")):
        with pytest.raises(ValueError, match="cannot express"):
            text_config_to_hf(t)


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("case", ["qwen2_tied", "mistral_window"])
def test_export_writes_the_family_and_loads_in_transformers(tmp_path, case):
    """HF -> ours -> HF (`python -m llava_jax.convert` both ways): the text config keeps its model_type
    and window, every tensor comes back bit for bit, and transformers' logits are unchanged."""
    from transformers import LlavaForConditionalGeneration

    from llava_jax.convert import main
    from llava_jax.weights.safetensors_io import TensorStore
    from tests.hf_reference import torch_logits
    from tests.test_convert_export import _published

    family, window, tie, rope, theta, _ = CASES[case]
    seed = fresh_seed()
    hf, n_img = make_family_llava(seed, family, window=window, tie=tie, rope_scaling=rope, theta=theta)
    src, ours, out = (str(tmp_path / n) for n in ("src", "ours", "hf"))
    hf.save_pretrained(src)
    assert main(["--src", src, "--dst", ours]) == 0
    assert main(["--src", ours, "--dst", out, "--to", "hf"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        text = json.load(f)["text_config"]
    assert text["model_type"] == family
    assert text.get("sliding_window") == window
    before, after = TensorStore.from_dir(src), TensorStore.from_dir(out)
    assert sorted(after.keys()) == sorted(map(_published, before.keys()))
    for k in before.keys():
        np.testing.assert_array_equal(after.get(_published(k)), before.get(k), err_msg=k)
    back = LlavaForConditionalGeneration.from_pretrained(out)
    assert type(back.model.language_model).__name__.lower().startswith(family)
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 2])
    pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    np.testing.assert_array_equal(torch_logits(back, ids, pixels, mask, pos), torch_logits(hf, ids, pixels, mask, pos))
    _compare(back, load_pretrained(out), ids, mask, pixels)


_SHARD_SCRIPT = """
import json, jax
from jax.sharding import Mesh
from llava_jax.config import LlavaConfig, LoraSpec, TextConfig, VisionConfig
from llava_jax.models.llava import init_params
from llava_jax.parallel.partition import model_param_shardings
import flax.linen as nn
text = TextConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, vocab_size=128, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, sliding_window=8)
vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28)
cfg = LlavaConfig(vision=vision, text=text, image_token_index=127,
                  lora=LoraSpec(rank=4, alpha=8.0, targets=("self_attn/q_proj", "self_attn/v_proj")))
mesh = Mesh(jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor")).devices, ("data", "fsdp", "tensor"))
params = nn.unbox(init_params(cfg, jax.random.key(0), shardings=model_param_shardings(cfg, mesh)))
attn = params["language_model"]["layers"]["self_attn"]
out = {n: [list(attn[p][leaf].sharding.spec), list(attn[p][leaf].addressable_shards[0].data.shape)]
       for p in ("q_proj", "k_proj", "v_proj", "o_proj") for leaf in attn[p] for n in [p + "/" + leaf]}
out["lm_head"] = "lm_head" in params["language_model"]
print(json.dumps(out))
"""


@pytest.mark.slow(seconds=15)
def test_qwen2_parameters_shard_by_the_rules():
    """A Qwen2 layout (q/k/v biases, no o bias, tied head) with LoRA on q and v: every parameter is
    matched by the rules table and placed in shards on an 8-device mesh (fsdp 2 x tensor 4); the
    biases split over tensor like their kernels' output axis."""
    # The session's XLA flags (tests/conftest.py), and simulated devices.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": ROOT,
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got.pop("lm_head")
    for p in ("q_proj", "k_proj", "v_proj"):
        assert got[f"{p}/bias"] == [[None, "tensor"], [2, 16]], got  # [L, 64] split 4 ways
        assert got[f"{p}/kernel"] == [[None, "fsdp", "tensor"], [2, 32, 16]], got
    assert "o_proj/bias" not in got
    assert got["q_proj/lora_a"][1] == [2, 32, 4] and got["q_proj/lora_b"][1] == [2, 2, 16], got


def _windowed(seed: int, window: int):
    """q, k, v [3, 100, 2|1, 16], tokens (right-padded, left-padded, unpadded rows) and the dense
    reference mask of the XLA path: causal, padding and the window in positions (`llama.attention_mask`)."""
    import jax.numpy as jnp

    from llava_jax.models.llama import attention_mask
    from llava_jax.models.llava import default_positions

    b, t = 3, 100  # splash pads to 128: its window must ignore the padding slots too
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, 16)), jnp.float32) for n in (2, 1, 1))
    tokens = np.ones((b, t), np.int32)
    tokens[0, 70:] = 0
    tokens[1, :25] = 0
    tokens = jnp.asarray(tokens)
    pos = default_positions(tokens)
    return q, k, v, tokens, attention_mask(tokens, t, 0, window, pos, pos)


@pytest.mark.slow(seconds=8)
def test_windowed_kernels_equal_the_dense_window_mask():
    """The fused kernels' windows (splash's LocalMask in interpret mode; the cuDNN call's
    `local_window_size`, run here by XLA as cuDNN needs a GPU; the XLA fallback of a fused mask)
    equal the dense mask's window in positions at every real query, right and left padding alike."""
    import functools

    import jax

    from llava_jax.models import attention as attn

    window = 7
    q, k, v, tokens, dense = _windowed(fresh_seed(), window)
    ref = attn.attention(q, k, v, dense)
    cudnn_call = functools.partial(attn._cudnn, causal=True, window=window, implementation=None)
    lengths = np.asarray(tokens).sum(1)
    outs = {
        "xla_fallback": attn.attention(q, k, v, attn.AttentionMask("xla", causal=True, tokens=tokens, window=window)),
        "cudnn_call_rotated": attn.via_right_padding(cudnn_call, q, k, v, tokens),
    }
    with attn.target_platform("cpu"):
        splash = attn.AttentionMask("splash", causal=True, tokens=tokens, window=window)
        outs["splash"] = jax.jit(lambda q, k, v: attn.attention(q, k, v, splash))(q, k, v)
    real = np.asarray(tokens).astype(bool)
    for name, out in outs.items():
        err = np.abs(np.asarray(out) - np.asarray(ref))[real].max()
        assert err < 1e-5, f"{name}: max error {err:.2e}"
    # Row 0 is right-padded: the cuDNN call takes it as it is, by its length.
    right = cudnn_call(q[:1], k[:1], v[:1], jax.numpy.asarray(lengths[:1], jax.numpy.int32))
    assert np.abs(np.asarray(right - ref[:1]))[0, : lengths[0]].max() < 1e-5
    # The window matters at these lengths.
    assert np.abs(np.asarray(attn.attention(q, k, v, _windowed(0, None)[-1]) - ref))[real].max() > 1e-2


@pytest.mark.skipif(__import__("jax").default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU; the CPU tests run its call on XLA")
def test_cudnn_window_equals_xla_in_bf16():
    """The real cuDNN kernel with a window, right- and left-padded rows, against float32 XLA."""
    import jax
    import jax.numpy as jnp

    from llava_jax.models import attention as attn

    q, k, v, tokens, dense = _windowed(fresh_seed(), 33)
    ref = attn.attention(q, k, v, dense)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    for right_padded, rows in ((True, slice(0, 1)), (False, slice(1, 3))):
        mask = attn.AttentionMask("cudnn", causal=True, tokens=tokens[rows], right_padded=right_padded, window=33)
        out = jax.jit(lambda q, k, v: attn.attention(q, k, v, mask))(q[rows], k[rows], v[rows])
        real = np.asarray(tokens[rows]).astype(bool)
        err = np.abs(np.asarray(out.astype(jnp.float32)) - np.asarray(ref[rows]))[real].max()
        assert err < 2e-2, f"right_padded={right_padded}: max error {err:.3e}"


@pytest.mark.slow(seconds=10)
def test_qwen2_lora_and_int8_cover_the_qkv_biases(tmp_path):
    """On a Qwen2 layout (biased q/k/v, unbiased o): a LoRA adapter on q, v and o saved by us gives
    peft's logits (the biases stay in the base Linear beside the adapter), merged equals unmerged;
    int8 kernels add the biases as the float path does (int8 forward == forward with the
    dequantised kernels)."""
    import jax
    import jax.numpy as jnp
    from peft import PeftModel

    from llava_jax.inference.quant import SCALE, int8_matmuls, quantize_params
    from llava_jax.models import lora as lora_lib
    from llava_jax.models.llava import Llava
    from llava_jax.weights import peft as peft_io
    from tests.test_lora import random_adapter

    seed = fresh_seed()
    hf, n_img = make_family_llava(seed, "qwen2", tie=True, theta=1e6)
    hf.save_pretrained(tmp_path / "base")
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets=("self_attn/q_proj", "self_attn/v_proj", "self_attn/o_proj"))
    ours = random_adapter(load_pretrained(str(tmp_path / "base")), spec, seed)
    q_proj = ours.params["language_model"]["layers"]["self_attn"]["q_proj"]
    assert {"kernel", "bias", "lora_a", "lora_b"} == set(q_proj)
    assert "bias" not in ours.params["language_model"]["layers"]["self_attn"]["o_proj"]
    peft_io.save_adapter(str(tmp_path / "adapter"), ours.config, ours.params)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 0])
    pixels = rng.standard_normal((1, 28, 28, 3)).astype(np.float32)
    _compare(peft_model, ours, ids, mask, pixels)
    merged = LlavaModel(ours.config.replace(lora=None), lora_lib.merge(ours.params, spec))
    unmerged = np.asarray(ours(ids, pixels, mask).logits)
    merge_err = np.abs(np.asarray(merged(ids, pixels, mask).logits) - unmerged)[mask.astype(bool)].max()
    assert merge_err < 5e-5, f"merged vs unmerged: {merge_err:.2e}"

    cfg, params = merged.config, merged.params
    quant = quantize_params(params)
    q_proj = quant["language_model"]["layers"]["self_attn"]["q_proj"]
    assert q_proj["kernel"].dtype == jnp.int8 and q_proj["bias"].dtype == jnp.float32

    def dequantised(node):
        if isinstance(node, dict) and SCALE in node:
            rest = {k: v for k, v in node.items() if k != SCALE}
            return {**rest, "kernel": node["kernel"].astype(jnp.float32) * node[SCALE][..., None, :]}
        return {k: dequantised(v) for k, v in node.items()} if isinstance(node, dict) else node

    def forward(p, int8):
        with int8_matmuls(int8):
            return Llava(cfg).apply({"params": p}, ids, pixels[None], mask)[0]

    got = jax.jit(lambda p: forward(p, True))(quant)
    want = jax.jit(lambda p: forward(p, False))(dequantised(quant))
    err = np.abs(np.asarray(got) - np.asarray(want))[mask.astype(bool)].max()
    assert err < 1e-4, f"int8 vs dequantised float: {err:.2e}"
