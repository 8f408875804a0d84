"""Scanned layers: the same numbers as unrolled ones, a layout the mapping converts both ways bit for
bit, checkpoints written per layer (before scanning) still loading, and init without a forward pass."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models import llava as llava_lib
from llava_jax.models.llava import Llava, abstract_params, init_params
from llava_jax.train.loss import cross_entropy_sum
from llava_jax.train.optimizer import decay_mask, split_params
from llava_jax.weights import mapping
from tests._params import host_random_params
from tests._seeds import fresh_seed

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=28),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16),
    image_token_index=127,
    vision_feature_layer=-2,
)
UNROLLED = CFG.replace(scan_layers=False)


def _params(seed: int) -> dict:
    """Random float32 parameters of CFG (stacked), drawn on the host (tests/_params.py)."""
    return host_random_params(CFG, seed)


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    b, t = 4, 8 + CFG.num_image_tokens
    ids = rng.integers(3, 120, (b, t)).astype(np.int32)
    ids[::2, 2 : 2 + CFG.num_image_tokens] = CFG.image_token_index
    mask = np.ones_like(ids)
    mask[1, -3:] = 0
    labels = np.where(rng.random(ids.shape) < 0.6, ids, -100).astype(np.int32)
    px = rng.standard_normal((b, 1, 28, 28, 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": px}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow(seconds=28)
def test_scanned_equals_unrolled_logits_loss_and_gradients():
    """Float32, relative to the norm: per element the two differ by float32 reordering only (XLA fuses
    a loop body differently from straight-line code; jit vs eager of the unrolled model differ as much)."""
    seed = fresh_seed()
    stacked = _params(seed)
    per_layer = mapping.unstack_layers(stacked)
    assert "layers_2" in per_layer["language_model"] and "layers" not in per_layer["vision_tower"]
    batch = _batch(seed)

    def loss_logits_grads(cfg, params):
        def loss(p):
            logits, _ = Llava(cfg).apply({"params": p}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
            return cross_entropy_sum(logits, batch["labels"]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    # Scanned with full remat (prevent_cse=False under scan) against unrolled without remat.
    (la, xa), ga = loss_logits_grads(CFG.replace(remat="full"), stacked)
    (lb, xb), gb = loss_logits_grads(UNROLLED, per_layer)
    assert _rel(la, lb) < 1e-6 and _rel(xa, xb) < 1e-6, (_rel(la, lb), _rel(xa, xb))
    gb = mapping.stack_layers(gb)
    assert jax.tree.structure(ga) == jax.tree.structure(gb)
    whole = _rel(np.concatenate([np.ravel(x) for x in jax.tree.leaves(ga)]),
                 np.concatenate([np.ravel(x) for x in jax.tree.leaves(gb)]))
    assert whole < 1e-6, whole
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
        if np.linalg.norm(y) > 1e-6:  # the key bias's gradient is 0 up to rounding (softmax ignores it)
            assert _rel(x, y) < 1e-5, f"{jax.tree_util.keystr(path)}: relative gradient error {_rel(x, y):.2e}"

    # Weight decay reaches the same parameters in both layouts (stacked biases are not matrices).
    assert jax.tree.leaves(decay_mask(stacked)) == jax.tree.leaves(mapping.stack_layers(decay_mask(per_layer), all))


def test_stacked_and_per_layer_layouts_convert_bit_exactly():
    seed = fresh_seed()
    per_layer = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), mapping.unstack_layers(_params(seed)))
    stacked = mapping.stack_layers(per_layer)
    back = mapping.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(per_layer)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer)):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint16), y.view(np.uint16))
    # Every per-layer entry of the table finds the same bits in both layouts.
    for e in mapping.entries(CFG):
        a, b = mapping.lookup(stacked, e), mapping.lookup(per_layer, e)
        assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)), e
    # On devices too (what load_params and checkpoint restores do), and abstractly.
    on_device = mapping.stack_layers(jax.tree.map(jnp.asarray, per_layer))
    for x, y in zip(jax.tree.leaves(on_device), jax.tree.leaves(stacked)):
        assert np.array_equal(np.asarray(x).view(np.uint16), y.view(np.uint16))
    shapes = jax.tree.map(lambda x: x.shape, abstract_params(CFG))
    assert jax.tree.map(lambda x: x.shape, stacked) == shapes


def _old_config_json(cfg: LlavaConfig) -> str:
    """llava_jax_config.json as versions before scanned layers wrote it (no `scan_layers` field)."""
    d = cfg.to_dict()
    del d["scan_layers"]
    return json.dumps(d)


@pytest.mark.slow(seconds=9)
def test_directory_and_training_checkpoint_in_the_old_per_layer_layout_load(tmp_path):
    """A converted directory and a training checkpoint written before layers were scanned (one
    `layers_{i}` subtree per layer, no `scan_layers` in the config) load into the stacked model."""
    import optax

    from llava_jax import load_pretrained
    from llava_jax.train.checkpoint import Checkpointer, abstract_like
    from llava_jax.weights.converted import CONFIG_FILE, PARAMS_DIR, load_params, save_params

    seed = fresh_seed()
    stacked = _params(seed)
    per_layer = jax.tree.map(np.asarray, mapping.unstack_layers(stacked))
    old = tmp_path / "old"
    os.makedirs(old)
    save_params(per_layer, str(old / PARAMS_DIR))  # the tree (and the writer) the old version saved
    (old / CONFIG_FILE).write_text(_old_config_json(CFG))
    model = load_pretrained(str(old))
    assert model.config.scan_layers and "layers" in model.params["language_model"]
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Into shardings, and back to the per-layer layout on request.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sh = {"language_model": {"layers": jax.tree.map(lambda _: spec, stacked["language_model"]["layers"])}}
    _, part = load_params(str(old), shardings=sh)
    q = part["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == spec and set(part["language_model"]) == {"layers"}
    np.testing.assert_array_equal(np.asarray(q), np.asarray(stacked["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]))
    cfg, unrolled = load_params(str(old), scan_layers=False)
    assert not cfg.scan_layers and jax.tree.structure(unrolled) == jax.tree.structure(per_layer)

    # A training checkpoint (state with Adam moments) saved per layer restores stacked.
    tx = optax.adamw(1e-3)
    trainable, _ = split_params(jax.tree.map(jnp.asarray, stacked), ["language_model/.*"])
    state = {"params": trainable, "opt_state": tx.init(trainable), "counters": {"step": jnp.int32(7)}}
    state = jax.tree.map(lambda x: x + 1 if x.ndim else x, state)  # moments that are not all zeros
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(7, mapping.unstack_layers(state), {"stage": 0}, {})
    ckpt.wait()
    restored = Checkpointer(str(tmp_path / "checkpoints"), async_save=False).restore_state(7, abstract_like(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt.close()


@pytest.mark.slow(seconds=9)
def test_init_params_traces_no_forward_pass_and_follows_the_initializers(monkeypatch):
    # Few parameters (no vision layers): every RNG draw compiles separately on the CPU.
    cfg = CFG.replace(vision_feature_layer=0, projector_bias=False)
    abstract = abstract_params(cfg, boxed=True)  # the one (cached) abstract trace of a config

    def forbidden(*a, **k):
        raise AssertionError("init_params traced the forward pass")

    monkeypatch.setattr(Llava, "__call__", forbidden)
    seed = fresh_seed()
    boxed = init_params(cfg, jax.random.key(seed))
    again = nn.unbox(init_params(cfg, jax.random.key(seed)))
    other = nn.unbox(init_params(cfg, jax.random.key(seed + 1)))
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert jax.tree.structure(boxed, is_leaf=is_box) == jax.tree.structure(abstract, is_leaf=is_box)
    for box, want in zip(jax.tree.leaves(boxed, is_leaf=is_box), jax.tree.leaves(abstract, is_leaf=is_box)):
        assert box.names == want.names and box.value.shape == want.value.shape and box.value.dtype == want.value.dtype
    params = nn.unbox(boxed)
    for (path, x), y, z in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(again), jax.tree.leaves(other)):
        name, x = path[-1].key, np.asarray(x)
        np.testing.assert_array_equal(x, np.asarray(y))  # seeded
        if name == "scale":
            assert np.all(x == 1), path
        elif name == "bias":
            assert np.all(x == 0), path
        else:
            assert not np.array_equal(x, np.asarray(z)), path
            assert abs(x.std() / llava_lib.INIT_STD - 1) < (0.25 if x.size > 500 else 0.6) and abs(x.mean()) < 0.01, path


def test_a_new_projector_is_one_factory():
    """The mapping, the FLOP count and config validation read a registered projector's layers off it."""
    from llava_jax.models.projector import MLPProjector, projector_linears, register_projector
    from llava_jax.train import flops

    @register_projector(r"^test_deep_(\d+)$")
    def _deep(m, out_features, **kw):
        return MLPProjector(out_features, int(m.group(1)), **kw)

    cfg = CFG.replace(projector_type="test_deep_5")
    assert projector_linears("test_deep_5") == tuple(f"linear_{k}" for k in range(1, 6))
    rows = mapping.projector_entries(cfg)
    assert [e.ours for e in rows if e.ours.endswith("kernel")] == [f"linear_{k}/kernel" for k in range(1, 6)]
    built = jax.tree_util.tree_flatten_with_path(abstract_params(cfg)["projector"])[0]
    assert {e.ours for e in rows} == {"/".join(k.key for k in path) for path, _ in built}
    v, t = cfg.vision.hidden_size, cfg.text.hidden_size
    want = 2 * 3 * cfg.num_image_tokens * (v * t + 4 * t * t)
    assert flops._projector_forward(cfg, 3) == want
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        projector_linears("mlp2x_relu")
