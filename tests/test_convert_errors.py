"""Every conversion error the issue lists: one or two lines on stderr, exit code 2, nothing left at --dst."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from llava_jax.convert import main
from llava_jax.weights import parts
from llava_jax.weights.safetensors_io import CheckpointError, TensorStore, save_file
from tests.test_convert_formats import make_model, write_original, write_parts, hf_tensors


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF LLaVA, an original-format one with its CLIP dir, and CLIP + LLaMA parts (written once)."""
    root = tmp_path_factory.mktemp("sources")
    hf, _ = make_model(0)
    tensors = hf_tensors(hf, root / "hf")
    write_original(hf, root / "orig", tower_dir=root / "clip-vit")
    os.makedirs(root / "parts")
    write_parts(hf, tensors, root / "parts")
    return root


def _copy(sources, name, tmp_path):
    shutil.copytree(sources / name, tmp_path / name)
    return tmp_path / name


def _rewrite(directory, edit) -> None:
    """Rewrite a directory's model.safetensors through `edit(dict) -> dict`."""
    path = str(directory / "model.safetensors")
    store = TensorStore([path])
    tensors = edit({k: np.array(store.get(k)) for k in store.keys()})
    os.remove(path)
    save_file(sorted(tensors.items()), path)


def fails(tmp_path, capsys, argv: list[str], *patterns: str) -> str:
    """Run the CLI; assert exit code 2, a short message matching `patterns`, and nothing at (or beside) DST."""
    parent = tmp_path / "out"
    parent.mkdir(exist_ok=True)
    before = set(os.listdir(parent))
    dst = parent / "dst"
    rc = main([*argv, "--dst", str(dst)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert 1 <= len(err.splitlines()) <= 2, err
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert set(os.listdir(parent)) == before, "a failed conversion left files behind"
    return err


def test_unknown_format(tmp_path, capsys, sources):
    src = _copy(sources, "hf", tmp_path)
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    fails(tmp_path, capsys, ["--src", str(src)], "unknown checkpoint format", "bert", "--vision-tower DIR --llm DIR")
    os.remove(src / "config.json")
    fails(tmp_path, capsys, ["--src", str(src)], "unknown checkpoint format: no config.json")


def test_format_override_that_does_not_fit(tmp_path, capsys, sources):
    fails(tmp_path, capsys, ["--src", str(sources / "hf"), "--format", "original"], "look like a hf_legacy checkpoint")


def test_missing_tensors_are_named(tmp_path, capsys, sources):
    src = _copy(sources, "hf", tmp_path)
    drop = ("language_model.model.layers.1.mlp.up_proj.weight", "multi_modal_projector.linear_2.bias")
    _rewrite(src, lambda t: {k: v for k, v in t.items() if k not in drop})
    err = fails(tmp_path, capsys, ["--src", str(src)], "2 tensors missing")
    assert all(name in err for name in drop)


def test_unexpected_tensors_are_named(tmp_path, capsys, sources):
    src = _copy(sources, "hf", tmp_path)
    _rewrite(src, lambda t: t | {"language_model.model.layers.9.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
    fails(tmp_path, capsys, ["--src", str(src)], r"1 unexpected tensors.*layers\.9\.mlp\.up_proj\.weight")


def test_shape_that_does_not_match_the_config(tmp_path, capsys, sources):
    src = _copy(sources, "hf", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 140  # the tensors hold 136
    (src / "config.json").write_text(json.dumps(config))
    fails(tmp_path, capsys, ["--src", str(src)], r"language_model\.model\.layers\.\d\.mlp\.\w+_proj\.weight has shape \(1\d\d, 64\)",
          r"does not match the config", r"\(64, 140\)")


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_damaged_safetensors(tmp_path, capsys, sources, damage):
    src = _copy(sources, "hf", tmp_path)
    path = src / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3] if damage == "truncated" else raw[:8] + b"{not json" + raw[17:])
    fails(tmp_path, capsys, ["--src", str(src)], "model.safetensors: " + ("truncated" if damage == "truncated" else "corrupt"))


def test_configs_that_are_not_llava_clip_or_llama(tmp_path, capsys, sources):
    src = _copy(sources, "hf", tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"model_type": "llava_onevision_video"}))
    fails(tmp_path, capsys, ["--src", str(src)], "model_type 'llava_onevision_video' is not LLaVA")
    # A OneVision config whose default pinpoints (384 px multiples) do not fit the 28 px tower: named.
    (src / "config.json").write_text(json.dumps(config | {"model_type": "llava_onevision"}))
    fails(tmp_path, capsys, ["--src", str(src)], "are not positive multiples of tile_size 28")
    # A LLaVA-NeXT config over LLaVA-1.5 tensors: the one tensor NeXT adds is named.
    (src / "config.json").write_text(json.dumps(config | {"model_type": "llava_next"}))
    fails(tmp_path, capsys, ["--src", str(src)], r"1 tensors missing, e.g. \['image_newline'\]")
    clip, llm = _copy(sources, "parts", tmp_path) / "clip-vit", tmp_path / "parts" / "vicuna"
    good_llm = (llm / "config.json").read_text()
    (llm / "config.json").write_text(json.dumps(json.loads(good_llm) | {"model_type": "gpt2"}))
    fails(tmp_path, capsys, ["--vision-tower", str(clip), "--llm", str(llm)], "'gpt2' is not a LLaMA-family decoder")
    (llm / "config.json").write_text(good_llm)
    (clip / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 32}))
    fails(tmp_path, capsys, ["--vision-tower", str(clip), "--llm", str(llm)], "'siglip_vision_model' is not a CLIP vision tower")


def test_original_without_its_vision_tower_names_it(tmp_path, capsys, sources):
    fails(tmp_path, capsys, ["--src", str(sources / "orig")],
          "vision tower is not in the checkpoint", "openai/clip-vit-tiny-patch14-28", "--vision-tower DIR")


class _Payload:
    """Unpickling this would create a file: the code a malicious checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_that_hold_code_are_never_run(tmp_path, capsys, sources):
    marker = tmp_path / "pwned"
    evil = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "x": _Payload(str(marker))}, evil)
    p = sources / "parts"
    fails(tmp_path, capsys, ["--vision-tower", str(p / "clip-vit"), "--llm", str(p / "vicuna"), "--projector", str(evil)],
          "mm_projector.bin: refused", "weights_only=True")
    assert not marker.exists()


def test_bin_without_torch_says_so(tmp_path, capsys, sources, monkeypatch):
    src = tmp_path / "bin"
    os.makedirs(src)
    shutil.copy(sources / "hf" / "config.json", src / "config.json")
    store = TensorStore.from_dir(str(sources / "hf"))
    torch.save({k: torch.from_numpy(np.array(store.get(k))) for k in store.keys()}, src / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    fails(tmp_path, capsys, ["--src", str(src)], "pytorch_model.bin: a torch .bin checkpoint needs PyTorch", "safetensors")


def test_existing_destination_is_left_alone(tmp_path, capsys, sources):
    dst = tmp_path / "out" / "dst"
    os.makedirs(dst)
    (dst / "mine.txt").write_text("keep")
    assert main(["--src", str(sources / "hf"), "--dst", str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(dst) == ["mine.txt"]


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, sources, monkeypatch):
    """The parameters are already on disk when this fails: the temporary directory goes, DST never appears."""

    def broken(self, dtype):
        raise CheckpointError("disk full (simulated)")

    monkeypatch.setattr(parts.Plan, "extras", broken)
    fails(tmp_path, capsys, ["--src", str(sources / "hf")], "disk full")


def test_export_errors(tmp_path, capsys, sources):
    fails(tmp_path, capsys, ["--src", str(sources / "hf"), "--to", "hf"], "no Orbax parameter checkpoint")
    p = sources / "parts"
    linear = str(tmp_path / "linear")
    assert main(["--vision-tower", str(p / "clip-vit"), "--llm", str(p / "vicuna"), "--projector-type", "linear", "--dst", linear]) == 0
    capsys.readouterr()
    fails(tmp_path, capsys, ["--src", linear, "--to", "hf"], "projector 'linear' has no transformers equivalent")


def test_cli_exit_code_smoke(tmp_path, sources):
    """The real `python -m llava_jax.convert` process: exit code 2 and one line on stderr."""
    dst = tmp_path / "dst"
    r = subprocess.run([sys.executable, "-m", "llava_jax.convert", "--src", str(tmp_path), "--dst", str(dst)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not dst.exists()


def _cut_short(directory) -> None:
    for f in glob.glob(os.path.join(directory, "**", "ocdbt*", "d", "*"), recursive=True):
        os.truncate(f, os.path.getsize(f) // 2)


def _drop_process_files(directory) -> None:
    found = glob.glob(os.path.join(directory, "**", "ocdbt.process_0*"), recursive=True)
    assert found
    for f in found:
        shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)


@pytest.mark.parametrize("damage", [_cut_short, _drop_process_files])
def test_damaged_orbax_directories_are_named(tmp_path, capsys, sources, damage):
    """A converted directory, and a training checkpoint, with their Orbax files cut short or missing: one line
    naming the directory (exit 2), from convert --to hf and from load_pretrained (what generate calls)."""
    from llava_jax import load_pretrained
    from llava_jax.weights.converted import load_params
    from tests.test_model_dirs import training_checkpoint

    ours = str(tmp_path / "work" / "ours")
    assert main(["--src", str(sources / "hf"), "--dst", ours]) == 0
    _, params = load_params(ours)
    ckpt = training_checkpoint(tmp_path / "work", ours, {"projector": params["projector"]})
    capsys.readouterr()
    for src, orbax_dir in ((ckpt, os.path.join(ckpt, "state")), (ours, os.path.join(ours, "params"))):
        damage(orbax_dir)  # the checkpoint first, while the base it reads its frozen parameters from is whole
        named = "^error: " + re.escape(src) + r"\S*: damaged Orbax checkpoint"
        fails(tmp_path, capsys, ["--src", src, "--to", "hf"], named)
        with pytest.raises(CheckpointError, match=re.escape(src) + r"\S*: damaged Orbax checkpoint") as e:
            load_pretrained(src)
        assert len(str(e.value).splitlines()) == 1, str(e.value)
