"""A stage that trains the vision tower at its own learning rate (LLaVA-NeXT's stage 2: the tower at 2e-6,
the rest at 1e-5), through the real stage program (optimizer groups, train step, sharded state), and a
stage that freezes it: the tower's parameters then come out of a step bit for bit as they went in."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import init_params
from llava_jax.parallel.mesh import make_mesh
from llava_jax.parallel.rules import DEFAULT_RULES
from llava_jax.train.defaults import stage as make_stage
from llava_jax.train.program import stage_program
from tests._seeds import fresh_seed

LR, VISION_LR = 1e-2, 1e-3
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28, patch_size=14),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8),
    image_token_index=63, vision_feature_layer=-1, remat="full",
)


def _one_step(trainable: list[str], vision_learning_rate: float):
    """(initial params, the state after one step) of a stage with warmup 0 (the first step at the peak)."""
    seed = fresh_seed()
    params = nn.unbox(init_params(CFG, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    tokens = CFG.vision.num_patches
    ids = rng.integers(1, 60, (1, 2, 12)).astype(np.int32)
    ids[..., 1:1 + tokens] = CFG.image_token_index
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy(),
             "pixel_values": rng.standard_normal((1, 2, 1, 28, 28, 3)).astype(np.float32)}
    st = make_stage("s", data="d", template="plain", trainable=trainable, learning_rate=LR, global_batch=2,
                    micro_batch=2, warmup_ratio=0.0, vision_learning_rate=vision_learning_rate)
    program = stage_program(CFG, st, make_mesh(), DEFAULT_RULES, 10, params)
    state, _ = program.step(program.init_state(params), batch)
    return params, state


def _largest_step(before, after) -> dict[str, float]:
    """The largest |change| of each parameter, by "/"-joined path."""
    flat = lambda tree: {"/".join(k.key for k in p): np.asarray(x) for p, x in  # noqa: E731
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
    b, a = flat(before), flat(after)
    return {k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a}


@pytest.mark.slow(seconds=8)
def test_the_tower_trains_at_its_own_learning_rate_through_the_stage_program():
    """Adam's first step moves each parameter by its group's peak times g / (|g| + eps), never more: the
    largest move of every parameter is its group's peak, the tower's VISION_LR (10x below), the projector's
    and LLM's LR, to within 10% below (the tower's largest gradients at a random init can be as small as
    1e-7, where eps = 1e-8 takes its share)."""
    params, state = _one_step(["projector/.*", "language_model/.*", "vision_tower/.*"], VISION_LR)
    moves = _largest_step({k: params[k] for k in state.params}, state.params)
    # A key bias adds the same q.b to each score of a query's row: softmax cancels it, its gradient is
    # rounding noise and its move no rate.
    moves = {k: v for k, v in moves.items() if not k.endswith("k_proj/bias")}
    tower = {k: v for k, v in moves.items() if k.startswith("vision_tower/")}
    rest = {k: v for k, v in moves.items() if not k.startswith("vision_tower/")}
    assert tower and rest and not state.frozen
    # the tower's layers (stacked under `layers`), its embeddings and its norms all train
    assert any("/layers/" in k for k in tower) and len(tower) >= 8
    for k, v in tower.items():
        assert 0.9 * VISION_LR <= v <= 1.0001 * VISION_LR, k
    for k, v in rest.items():
        assert 0.9 * LR <= v <= 1.0001 * LR, k


@pytest.mark.slow(seconds=8)
@pytest.mark.parametrize("vision_learning_rate", [0.0, VISION_LR])
def test_a_stage_that_does_not_name_the_tower_leaves_it_bit_identical(vision_learning_rate):
    """The tower out of `trainable`: it stays in the frozen half (no optimizer state), and a step returns it
    bit for bit, with or without a vision learning rate (which only sets the rate of a trained tower)."""
    params, state = _one_step(["projector/.*", "language_model/.*"], vision_learning_rate)
    assert set(state.frozen) == {"vision_tower"} and "vision_tower" not in state.params
    frozen = jax.tree_util.tree_leaves_with_path(state.frozen["vision_tower"])
    initial = dict(jax.tree_util.tree_leaves_with_path(params["vision_tower"]))
    assert frozen and all(np.array_equal(np.asarray(x), np.asarray(initial[p])) for p, x in frozen)
    moves = _largest_step({k: params[k] for k in state.params}, state.params)
    assert all(0.9 * LR <= v <= 1.0001 * LR for v in moves.values()), moves


@pytest.mark.slow(seconds=10)
def test_resuming_into_another_optimizer_layout_is_a_config_error(tmp_path):
    """A mid-stage checkpoint written with one learning rate for all, resumed by the same stage with the
    tower at its own rate (two optimizer groups) or with the tower frozen: one ConfigError naming the
    stage, the checkpoint and the fields that changed (was: Orbax's tree diff as a plain ValueError)."""
    import types

    from llava_jax.train import loop
    from llava_jax.train.checkpoint import Checkpointer
    from llava_jax.train.validate import ConfigError

    params = nn.unbox(init_params(CFG, jax.random.key(fresh_seed())))

    def program(trainable, vision_learning_rate):
        st = make_stage("s", data="d", template="plain", trainable=trainable, learning_rate=LR, global_batch=2,
                        micro_batch=2, vision_learning_rate=vision_learning_rate)
        return st, stage_program(CFG, st, make_mesh(), DEFAULT_RULES, 10, params)

    everything = ["projector/.*", "language_model/.*", "vision_tower/.*"]
    _, written = program(everything, 0.0)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(3, loop._checkpointed(written.init_state(params)), {"stage_step": 3}, {})
    ckpt.wait()
    run = types.SimpleNamespace(ckpt=ckpt)
    resume = types.SimpleNamespace(step=3, meta={"stage_step": 3}, data_state={})
    iterator = types.SimpleNamespace(set_state=lambda state: None)
    for trainable, vision_learning_rate in ((everything, VISION_LR), (everything[:2], 0.0)):
        st, other = program(trainable, vision_learning_rate)
        with pytest.raises(ConfigError, match=r"stage s: checkpoint 3 in .* holds other trained parameters or "
                                              r"optimizer state .*vision_learning_rate.*new workdir"):
            loop._restore(run, st, other.init_state(params), iterator, resume)
    same = loop._restore(run, *program(everything, 0.0)[:1], written.init_state(params), iterator, resume)
    assert int(same.step) == 0
