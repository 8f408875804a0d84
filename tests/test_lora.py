"""LoRA against peft on transformers' LlavaForConditionalGeneration (float32, tiny perturbed models,
non-zero adapters): logits with an adapter we saved and with one peft made, merged == unmerged, the
merged and unmerged HF exports, LoRA gradients, and the original LLaVA's LoRA outputs in `convert`."""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.weights import peft as peft_io
from llava_jax.weights.safetensors_io import TensorStore
from tests._seeds import fresh_seed
from tests.test_convert_formats import assert_logits_match, inputs, make_model

LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def random_adapter(model: LlavaModel, spec: lora_lib.LoraSpec, seed: int) -> LlavaModel:
    """Our model with a non-zero adapter (a fresh B is zero and would hide errors)."""
    import flax.traverse_util as tu

    cfg = model.config.replace(lora=spec)
    shapes = tu.flatten_dict(abstract_params(cfg))
    rng = np.random.default_rng(seed)
    flat = tu.flatten_dict(model.params)
    for k, v in shapes.items():
        if k[-1] == lora_lib.LORA_A:  # as peft draws A; B about as large as the kernels' own entries
            flat[k] = rng.uniform(-1, 1, v.shape).astype(np.float32) / np.sqrt(v.shape[-2])
        elif k[-1] == lora_lib.LORA_B:
            flat[k] = (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
    return LlavaModel(cfg, tu.unflatten_dict(flat))


@pytest.mark.slow(seconds=12)
def test_saved_adapter_gives_peft_logits_merged_or_not(tmp_path):
    from peft import PeftModel

    seed = fresh_seed()
    hf, n_img = make_model(seed)
    hf.save_pretrained(tmp_path / "base")
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets=lora_lib.DECODER_LINEARS, dropout=0.05)
    ours = random_adapter(load_pretrained(str(tmp_path / "base")), spec, seed)
    adapter = str(tmp_path / "adapter")
    peft_io.save_adapter(adapter, ours.config, ours.params)
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 2 * 7  # LM only, never CLIP's q/k/v
    err = assert_logits_match(peft_model, ours, n_img, seed)
    # The adapter changes the logits (so the match above is not the base model's).
    ids, mask, px = inputs(n_img, seed)
    base = np.asarray(load_pretrained(str(tmp_path / "base"))(ids, px, mask).logits)
    assert np.abs(base - np.asarray(ours(ids, px, mask).logits)).max() > 1e-2
    # Reading it back gives the same model (through load_pretrained's `lora`).
    again = load_pretrained(str(tmp_path / "base"), lora=adapter)
    assert again.config.lora == spec
    unmerged = np.asarray(ours(ids, px, mask).logits)
    np.testing.assert_array_equal(np.asarray(again(ids, px, mask).logits), unmerged)
    # Merged into the kernels: the base's parameter tree, the same logits.
    merged = LlavaModel(ours.config.replace(lora=None), lora_lib.merge(ours.params, spec))
    assert jax.tree.structure(merged.params) == jax.tree.structure(abstract_params(merged.config))
    merge_err = float(np.abs(np.asarray(merged(ids, px, mask).logits) - unmerged).max())
    assert merge_err < 1e-5, merge_err
    print(f"max logit error {err:.2e}; merged vs unmerged {merge_err:.2e}")


@pytest.mark.slow(seconds=6)
def test_peft_made_adapter_gives_peft_logits(tmp_path):
    """An adapter peft created (transformers 5 names, some modules, one layer only, rsLoRA) loaded by us."""
    from peft import LoraConfig, get_peft_model

    seed = fresh_seed()
    hf, n_img = make_model(seed)
    hf.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=8, lora_alpha=4, target_modules=r".*language_model.*layers\.1\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)",
                        lora_dropout=0.1, use_rslora=True, init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    keys = TensorStore.from_dir(str(tmp_path / "adapter")).keys()
    assert any(k.startswith("base_model.model.model.language_model.layers.1.") for k in keys), keys[:2]
    ours = load_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "adapter"))
    assert ours.config.lora.targets == ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")
    assert ours.config.lora.use_rslora and ours.config.lora.rank == 8
    print(f"max logit error {assert_logits_match(peft_model, ours, n_img, seed):.2e}")


def test_adapter_on_the_vision_tower_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, _ = make_model(0)
    hf.save_pretrained(tmp_path / "base")
    # Plain module names, as the original's find_all_linear_names gives them: on a HF LLaVA they catch CLIP too.
    get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(peft_io.CheckpointError, match="vision_tower"):
        load_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "a"))


@pytest.mark.slow(seconds=20)
def test_lora_gradients_match_peft(tmp_path):
    """Gradients of A, B (and of the projector, trained beside them) against torch + peft, dropout off."""
    from peft import LoraConfig, get_peft_model

    from llava_jax.train.optimizer import split_params
    from llava_jax.train.step import loss_sum_fn
    from llava_jax.weights import mapping
    from tests.test_train_loss import _batch, _torch_forward

    seed = fresh_seed()
    hf, n_img = make_model(seed)
    hf.save_pretrained(tmp_path / "base")
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=LM_LINEARS, lora_dropout=0.0,
                                               init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    for name, p in peft_model.named_parameters():
        p.requires_grad = "lora_" in name or "multi_modal_projector" in name
    batch = _batch(seed, n_img)
    out = _torch_forward(peft_model, batch)
    out.loss.backward()
    torch_grads = {k.replace(".default.", "."): p.grad.numpy() for k, p in peft_model.named_parameters() if p.grad is not None}

    ours = load_pretrained(str(tmp_path / "base"), lora=str(tmp_path / "adapter"))
    params, frozen = split_params(ours.params, [".*/lora_[ab]", "projector/.*"])
    n = (batch["labels"][:, 1:] != -100).sum()
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_sum_fn(ours.config)(p, frozen, batch) / n))(params)
    assert abs(float(loss) - out.loss.item()) < 1e-5
    layout = peft_io.peft_layout(mapping.HF_NEW)  # peft's in-memory names (adapter name dropped above)
    checked = 0
    for e in mapping.lora_entries(ours.config, ours.config.lora.targets) + mapping.projector_entries(ours.config):
        g_ref = mapping.to_ours(torch_grads[mapping.torch_name(e, layout)], e.transform)
        g = np.asarray(mapping.lookup(grads, e))  # a row of the stacked gradient for a layer's tensor
        rel = np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-12)
        assert rel < 1e-4, f"{'/'.join(e.path)}: relative gradient error {rel:.2e}"
        checked += 1
    assert checked == 2 * 7 * 2 + 4


def _original_lora_output(hf, directory) -> None:
    """What the original's LoRA run writes, from a peft model on `hf`: adapter_model.bin under the
    original's names (a LLaMA: `model.layers...`), the projector in non_lora_trainables.bin, config.json."""
    os.makedirs(directory)
    sd = {k: v.detach().clone() for k, v in hf.base_model.model.state_dict().items()}
    adapter = {}
    for k, v in sd.items():
        if "lora_" in k:
            k = k.replace(".default.", ".").replace("model.language_model.", "model.")
            adapter["base_model.model." + k] = v
    torch.save(adapter, os.path.join(directory, "adapter_model.bin"))
    non_lora = {}
    for k, v in sd.items():
        if k.startswith("model.multi_modal_projector.linear_"):
            i, leaf = k.split("linear_")[1].split(".")[:2]
            non_lora[f"base_model.model.model.mm_projector.{2 * (int(i) - 1)}.{leaf}"] = v
    torch.save(non_lora, os.path.join(directory, "non_lora_trainables.bin"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
              "bias": "none", "target_modules": ["up_proj", "k_proj", "v_proj", "down_proj", "q_proj", "o_proj", "gate_proj"],
              "base_model_name_or_path": "lmsys/vicuna-7b-v1.5"}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.slow(seconds=7)
def test_convert_reads_the_original_lora_output(tmp_path):
    """CLIP + Vicuna parts + the original's LoRA output (adapter_model.bin, non_lora_trainables.bin):
    converted with the adapter kept (applied on load) or merged, both give peft's logits."""
    from peft import LoraConfig, get_peft_model

    from llava_jax.convert import main
    from tests.hf_reference import IMAGE_TOKEN
    from tests.test_convert_formats import hf_tensors, write_parts

    seed = fresh_seed()
    hf, n_img = make_model(seed)
    clip, llm, _ = write_parts(hf, hf_tensors(hf, tmp_path / "hf"), tmp_path)  # no mm_projector.bin: it is in non_lora
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=LM_LINEARS, init_lora_weights=False)).eval()
    _original_lora_output(peft_model, tmp_path / "llava-lora")
    base = ["--vision-tower", clip, "--llm", llm, "--image-token-index", str(IMAGE_TOKEN), "--lora", str(tmp_path / "llava-lora")]
    assert main([*base, "--dst", str(tmp_path / "kept")]) == 0
    assert main([*base, "--merge-lora", "--dst", str(tmp_path / "merged")]) == 0
    assert sorted(os.listdir(tmp_path / "kept" / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not os.path.exists(tmp_path / "merged" / "adapter")
    kept, merged = load_pretrained(str(tmp_path / "kept")), load_pretrained(str(tmp_path / "merged"))
    assert kept.config.lora.targets == lora_lib.DECODER_LINEARS and merged.config.lora is None
    print(f"adapter kept: max logit error {assert_logits_match(peft_model, kept, n_img, seed):.2e}")
    print(f"adapter merged: max logit error {assert_logits_match(peft_model, merged, n_img, seed):.2e}")
    # The LoRA directory alone is not a model: the error says what to pass.
    assert main(["--src", str(tmp_path / "llava-lora"), "--dst", str(tmp_path / "x")]) == 2


def check_lora_stage_outputs(before: str, stage_dir: str, tmp) -> None:
    """A trained LoRA stage (tests/_train_config.py:lora, run by test_train_loop): only the adapters and
    the projector changed (the rest bit for bit); its HF export with the adapter gives peft's logits,
    and merged it has exactly the base's tensors and gives the same logits."""
    import flax.traverse_util as tu
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from llava_jax.convert import main
    from llava_jax.weights.converted import load_params
    from tests.hf_reference import torch_logits

    _, start = load_params(str(before))
    _, end = load_params(str(stage_dir))
    start, end = tu.flatten_dict(start), tu.flatten_dict(end)
    assert sorted(start) == sorted(end)
    changed = {k for k in start if not np.array_equal(np.asarray(start[k]), np.asarray(end[k]))}
    assert changed and all(k[0] == "projector" for k in changed), sorted(changed)[:3]
    trained = peft_io.read_adapter(os.path.join(stage_dir, "adapter"), load_pretrained(str(stage_dir)).config)[1]
    assert all(np.abs(b).max() > 0 for k, b in tu.flatten_dict(trained).items() if k[-1] == lora_lib.LORA_B)

    kept, merged = str(tmp / "hf"), str(tmp / "hf-merged")
    assert main(["--src", str(stage_dir), "--dst", kept, "--to", "hf"]) == 0
    assert main(["--src", str(stage_dir), "--dst", merged, "--to", "hf", "--merge-lora"]) == 0
    base, info = LlavaForConditionalGeneration.from_pretrained(kept, output_loading_info=True)
    assert not any(info.values()), info
    merged_hf, info = LlavaForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert not any(info.values()), info
    a, b = TensorStore.from_dir(kept), TensorStore.from_dir(merged)
    assert sorted(a.keys()) == sorted(b.keys()) and all(a.shape(k) == b.shape(k) and a.dtype(k) == b.dtype(k) for k in a.keys())
    assert os.path.getsize(os.path.join(kept, "model.safetensors")) == os.path.getsize(os.path.join(merged, "model.safetensors"))
    peft_model = PeftModel.from_pretrained(base, os.path.join(kept, "adapter")).eval()
    ours = load_pretrained(str(stage_dir))
    cfg = ours.config
    rng = np.random.default_rng(0)
    ids = np.array([[1, *rng.integers(3, 100, 3), *[cfg.image_token_index] * cfg.num_image_tokens, *rng.integers(3, 100, 6)]])
    mask, px = np.ones_like(ids), rng.standard_normal((1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    got = np.asarray(ours(ids, px, mask).logits)
    pos = np.arange(ids.shape[1])[None]
    for name, ref_model in (("peft", peft_model), ("merged export", merged_hf)):
        ref = torch_logits(ref_model, ids, px, mask, pos)[..., : got.shape[-1]]
        err = float(np.abs(got - ref).max())
        assert err < 1e-4, f"{name}: max logit error {err:.2e}"


def test_adapters_carry_their_kernels_logical_axes():
    """A [in, r] carries its kernel's input axis, B [r, out] its output axis, both the rank axis; scanned,
    both stack on the `layers` axis as their kernel does. Under the default rules every adapter is
    split over fsdp (on the kernel's axis, or on its rank where that axis is not), as FSDP wants."""
    import flax.linen as nn
    import flax.traverse_util as tu

    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.parallel.rules import DEFAULT_RULES, check_rules

    cfg = LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=28),
                      text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=16), image_token_index=127, vision_feature_layer=-1,
                      lora=lora_lib.LoraSpec(rank=4, alpha=8.0, targets=lora_lib.DECODER_LINEARS))
    for scan, count in ((True, 7), (False, 2 * 7)):
        boxed = abstract_params(cfg.replace(scan_layers=scan), boxed=True)
        check_rules(boxed)
        flat = tu.flatten_dict(boxed)
        adapters = [k for k in flat if k[-1] == lora_lib.LORA_A]
        assert len(adapters) == count
        for k in adapters:
            kernel, a, b = flat[k[:-1] + ("kernel",)], flat[k], flat[k[:-1] + (lora_lib.LORA_B,)]
            assert isinstance(kernel, nn.Partitioned)
            assert a.names == (*kernel.names[:-1], "lora_rank"), k
            assert b.names == (*kernel.names[:-2], "lora_rank", kernel.names[-1]), k
            assert a.value.shape[:-2] == b.value.shape[:-2] == kernel.value.shape[:-2] == ((2,) if scan else ())
            for x in (a, b):
                assert "fsdp" in tuple(nn.logical_to_mesh_axes(x.names, DEFAULT_RULES)), (k, x.names)


def test_generate_with_lora_flag_equals_peft_generate(tmp_path, capsys):
    """`generate --lora DIR` (unmerged adapter) decodes what transformers + peft decode, greedy."""
    from peft import LoraConfig, get_peft_model

    from llava_jax import generate
    from llava_jax.data.image import ImageProcessorConfig, load_image, preprocess
    from tests._inference import hf_generate, make_model_dir, write_image

    seed = fresh_seed()
    d, hf = make_model_dir(str(tmp_path / "model"), seed=seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=LM_LINEARS, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    image = write_image(str(tmp_path / "a.png"), seed=seed)
    assert generate.main(["--model-path", d, "--lora", str(tmp_path / "adapter"), "--image-file", image, "--prompt",
                          "What is it?", "--temperature", "0", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pixels = preprocess(load_image(image), ImageProcessorConfig.from_pretrained(d))[None]
    ref_ids, ref_lp = hf_generate(peft_model, np.asarray(out["prompt_ids"])[None], pixels, max_new_tokens=8, eos=2)
    assert out["token_ids"] == ref_ids[0].tolist()
    np.testing.assert_allclose(out["logprobs"], ref_lp[0], atol=1e-4)


def test_dropout_only_with_a_training_rng():
    """LoRA dropout (peft's: on the adapter's input) runs only when a `dropout` rng is passed."""
    spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets=("self_attn/q_proj",), dropout=0.5)
    layer = lora_lib.LoraDense(8, lora=spec, kernel_axes=("embed", "heads"))
    x = np.random.default_rng(fresh_seed()).standard_normal((3, 16)).astype(np.float32)
    import flax.linen as nn

    params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
    params = {**params, "lora_b": np.ones_like(params["lora_b"])}  # a fresh B is 0: no branch to drop
    plain = np.asarray(layer.apply({"params": params}, x))
    a, b = params["lora_a"], params["lora_b"]
    np.testing.assert_allclose(plain, x @ params["kernel"] + params["bias"] + (x @ a @ b) * spec.scale, rtol=1e-5)
    dropped = np.asarray(layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(1)}))
    assert np.abs(dropped - plain).max() > 1e-3
