"""`--to hf`: ours -> llava-hf is exact (tensors bit for bit, transformers logits identical), bf16 round
trips are bit-exact, training checkpoints export too, and `load_params` reads parts into shardings."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import torch
from flax.traverse_util import flatten_dict as _flatten

from llava_jax import load_pretrained
from llava_jax.convert import main
from llava_jax.data.image import ImageProcessorConfig
from llava_jax.weights.converted import load_converted, load_params, save_params
from llava_jax.weights.safetensors_io import TensorStore
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, VOCAB, torch_logits
from tests.test_convert_formats import hf_tensors, inputs, make_model, tokenizer_dir, write_original  # noqa: F401 (fixture)


def _published(name: str) -> str:
    """transformers 5 saves CLIP without its `vision_model.` level; llava-hf (and our export) keep it."""
    return "vision_tower.vision_model." + name[len("vision_tower.") :] if name.startswith("vision_tower.") else name


def _hf_source(tmp_path, tokenizer_dir, seed):
    hf, n_img = make_model(seed)
    src = tmp_path / "src"
    tensors = hf_tensors(hf, src)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), src / "tokenizer.model")
    ImageProcessorConfig(size=28, crop_size=28, pad_to_square=True).save(str(src))
    return hf, n_img, src, {_published(k): v for k, v in tensors.items()}


def test_export_is_exact_and_loads_in_transformers(tmp_path, tokenizer_dir):
    from transformers import LlavaForConditionalGeneration

    seed = fresh_seed()
    hf, n_img, src, tensors = _hf_source(tmp_path, tokenizer_dir, seed)
    ours, out = str(tmp_path / "ours"), str(tmp_path / "hf")
    assert main(["--src", str(src), "--dst", ours]) == 0
    assert main(["--src", ours, "--dst", out, "--to", "hf", "--shard-size-gb", "0.0001"]) == 0
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1, files
    assert {"config.json", "tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"} <= set(files)
    # Every tensor of the source, CLIP's unused last layer and post_layernorm included, bit for bit.
    exported = TensorStore.from_dir(out)
    assert sorted(exported.keys()) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported.get(k), v, err_msg=k)
    back, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, mask, px = inputs(n_img, seed)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    np.testing.assert_array_equal(torch_logits(back, ids, px, mask, pos), torch_logits(hf, ids, px, mask, pos))
    # The exported tokenizer is LLaMA's: sentencepiece pieces after BOS.
    from transformers import AutoTokenizer
    import sentencepiece as spm

    text = "A photo of two dogs near a red car."
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == [1, *sp.encode(text)]
    # Our loader reads the export and gives our logits exactly.
    a = np.asarray(load_pretrained(ours)(ids, px, mask).logits)
    b = np.asarray(load_pretrained(out)(ids, px, mask).logits)
    np.testing.assert_array_equal(a, b)


def test_bfloat16_round_trip_is_bit_exact(tmp_path, tokenizer_dir):
    _, _, src, tensors = _hf_source(tmp_path, tokenizer_dir, 1)
    p = lambda n: str(tmp_path / n)  # noqa: E731
    assert main(["--src", str(src), "--dst", p("ours"), "--dtype", "bfloat16"]) == 0
    assert main(["--src", p("ours"), "--dst", p("hf"), "--to", "hf"]) == 0
    assert main(["--src", p("hf"), "--dst", p("ours2")]) == 0  # bf16 source: stays bf16
    assert main(["--src", p("ours2"), "--dst", p("hf2"), "--to", "hf"]) == 0
    hf, hf2 = TensorStore.from_dir(p("hf")), TensorStore.from_dir(p("hf2"))
    for k, v in tensors.items():
        want = v.astype(ml_dtypes.bfloat16)  # round to nearest even, as torch's .to(torch.bfloat16)
        torch_cast = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(want.view(np.int16), torch_cast)
        np.testing.assert_array_equal(hf.get(k).view(np.int16), want.view(np.int16), err_msg=k)
        np.testing.assert_array_equal(hf2.get(k).view(np.int16), want.view(np.int16), err_msg=k)
    cfg1, a = load_params(p("ours"))
    cfg2, b = load_params(p("ours2"))
    assert cfg1.param_dtype == cfg2.param_dtype == "bfloat16"
    fa, fb = _flatten(a), _flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(fa[k]).view(np.int16), np.asarray(fb[k]).view(np.int16), err_msg=str(k))


def test_training_checkpoint_exports_with_filled_tower_and_padded_vocab(tmp_path, capsys):
    """A training run's `params/` (beside opt_state, config two levels up) exports like a converted directory.

    It comes from an original-format model whose <image> id is past the vocabulary: the export pads
    the vocabulary as llava-hf does, and fills CLIP's never-used tensors, which no training run keeps.
    """
    from transformers import LlavaForConditionalGeneration

    seed = fresh_seed()
    hf, n_img = make_model(seed)
    write_original(hf, tmp_path / "orig", tower_dir=tmp_path / "clip")
    assert main(["--src", str(tmp_path / "orig"), "--vision-tower", str(tmp_path / "clip"), "--dst", str(tmp_path / "ours")]) == 0
    cfg, params = load_params(str(tmp_path / "ours"))
    params["projector"]["linear_2"]["bias"] = params["projector"]["linear_2"]["bias"] + 0.25  # "trained"
    run, step = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_7"
    os.makedirs(step)
    cfg.save(str(run))
    save_params(params, str(step / "params"))
    save_params({"mu": {"w": np.ones(3, np.float32)}, "count": np.array(7)}, str(step / "opt_state"))
    capsys.readouterr()
    assert main(["--src", str(step), "--dst", str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr()
    assert "filled 18 CLIP tensors" in out.out and "padded from 128 to 192" in out.out, out.out
    assert "no tokenizer.model" in out.err  # the run kept none: said, not fatal
    back, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    assert back.config.text_config.vocab_size == 192 and back.config.image_token_index == VOCAB
    ours = load_converted(str(step))
    ids, mask, px = inputs(n_img, seed)
    ids = np.where(ids == IMAGE_TOKEN, VOCAB, ids)
    ref = torch_logits(back, ids, px, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
    got = np.asarray(ours(ids, px, mask).logits)
    assert ref.shape[-1] == 192 and got.shape[-1] == VOCAB
    err = np.abs(ref[..., :VOCAB] - got)[mask.astype(bool)].max()
    assert err < 1e-4, err


def test_load_params_reads_a_subtree_into_shardings(tmp_path, tokenizer_dir):
    _, _, src, tensors = _hf_source(tmp_path, tokenizer_dir, 2)
    assert main(["--src", str(src), "--dst", str(tmp_path / "ours")]) == 0
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = {"projector": {"linear_1": {"kernel": spec, "bias": spec}}}
    cfg, params = load_params(str(tmp_path / "ours"), dtype="bfloat16", shardings=shardings)
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert set(_flatten(params)) == {("projector", "linear_1", "bias"), ("projector", "linear_1", "kernel")}
    kernel = params["projector"]["linear_1"]["kernel"]
    assert kernel.sharding == spec and kernel.dtype == ml_dtypes.bfloat16
    want = tensors["multi_modal_projector.linear_1.weight"].T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel).view(np.int16), want.view(np.int16))


def test_tokenizer_config_adds_image_token_after_the_pieces(tmp_path, tokenizer_dir):
    """A bare tokenizer.model whose vocabulary ends where <image> starts gets llava-hf's added tokens."""
    from transformers import AutoTokenizer

    from llava_jax.config import LlavaConfig, TextConfig
    from llava_jax.weights.export import padded_vocab, tokenizer_config

    cfg = LlavaConfig(text=TextConfig(vocab_size=400), image_token_index=400)  # the tiny tokenizer has 400 pieces
    assert padded_vocab(cfg) == 448
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg, str(tmp_path / "tokenizer.model"), 448)))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [400, 401] and tok.pad_token_id == 401
    assert tok("<image>\nWhat is this?").input_ids[:2] == [1, 400]
