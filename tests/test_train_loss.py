"""Loss and gradients against transformers' LlavaForConditionalGeneration (float32, tiny, perturbed)."""


import jax
import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.train.loss import cross_entropy_sum
from llava_jax.train.optimizer import make_optimizer, merge_params, split_params
from llava_jax.train.step import create_state, loss_sum_fn, make_train_step, model_inputs, to_microbatches
from llava_jax.weights import mapping
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, make_llava, random_ids


def _batch(seed, n_img, rows=4, t=24):
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, t), np.int32)
    mask = np.zeros((rows, t), np.int32)
    labels = np.full((rows, t), -100, np.int32)
    for b in range(rows):
        n = t - 3 * b
        has_img = b % 2 == 0
        seq = [1] + ([IMAGE_TOKEN] * n_img if has_img else []) + list(random_ids(rng, n - 1 - (n_img if has_img else 0)))
        ids[b, :n], mask[b, :n] = seq, 1
        labels[b, n // 2 : n] = ids[b, n // 2 : n]  # supervise the second half of each row
    px = rng.standard_normal((rows, 1, 28, 28, 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": px}


def _tiny(tmp_path):
    """A perturbed tiny transformers LLaVA (fresh seed), ours loaded from its saved files, and a batch."""
    seed = fresh_seed()
    hf, n_img = make_llava(seed)
    hf.save_pretrained(tmp_path)
    return hf, load_pretrained(str(tmp_path)), _batch(seed, n_img)


def _torch_forward(hf, batch):
    img_rows = [b for b in range(len(batch["input_ids"])) if (batch["input_ids"][b] == IMAGE_TOKEN).any()]
    px = torch.as_tensor(batch["pixel_values"][img_rows, 0].transpose(0, 3, 1, 2).copy())
    return hf(input_ids=torch.as_tensor(batch["input_ids"]).long(), pixel_values=px,
              attention_mask=torch.as_tensor(batch["attention_mask"]).long(),
              labels=torch.as_tensor(batch["labels"]).long())


@pytest.mark.slow(seconds=25)
def test_loss_and_gradients_match_transformers(tmp_path):
    hf, model, batch = _tiny(tmp_path)
    # Loss: the mean over all supervised tokens of the batch.
    out = _torch_forward(hf, batch)
    out.loss.backward()
    params, frozen = split_params(model.params, ["(projector|language_model)/.*"])
    loss_sum = loss_sum_fn(model.config)
    n = (batch["labels"][:, 1:] != -100).sum()
    loss, grads = jax.value_and_grad(lambda p: loss_sum(p, frozen, batch) / n)(params)
    assert abs(float(loss) - out.loss.item()) < 1e-5, (float(loss), out.loss.item())
    # Gradients: every trained tensor, mapped back through the one name table.
    torch_grads = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    layout = mapping.detect_layout(torch_grads)  # the in-memory names: the same table maps them
    checked = 0
    for e in mapping.entries(model.config):
        if e.component == "vision_tower":
            continue
        g_ref = mapping.to_ours(torch_grads[mapping.torch_name(e, layout)], e.transform)
        g = np.asarray(mapping.lookup(grads, e))  # a row of the stacked gradient for a layer's tensor
        rel = np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-12)
        assert rel < 1e-4, f"{'/'.join(e.path)}: relative gradient error {rel:.2e}"
        checked += 1
    assert checked > 10


@pytest.mark.slow(seconds=25)
def test_accumulated_step_equals_one_big_step(tmp_path):
    """Two micro-batches give the loss and update of the whole batch at once."""
    hf, model, batch = _tiny(tmp_path)
    # Adam's first update is lr * g / (|g| + eps): with the default eps a gradient entry near zero
    # turns a 1e-7 summation-order difference into a visible one. eps=1 keeps the update linear in
    # the gradient (times lr = 1), so this compares the accumulated gradient itself (the updates, to
    # float32 summation order; a wrong scaling of the accumulation is off by 50% or more).
    tx, sched = make_optimizer(learning_rate=1.0, total_steps=10, warmup_ratio=0.0, eps=1.0)
    params, frozen = split_params(model.params, ["projector/.*"])
    step = jax.jit(make_train_step(model.config, tx, sched))
    s1, m1 = step(create_state(params, frozen, tx), to_microbatches(batch, 1))
    s2, m2 = step(create_state(params, frozen, tx), to_microbatches(batch, 2))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b, p0 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), jax.tree.leaves(params)):
        assert np.abs(np.asarray(a) - np.asarray(p0)).max() > 1e-4  # the step moved the parameters
        np.testing.assert_allclose(np.asarray(a) - np.asarray(p0), np.asarray(b) - np.asarray(p0), rtol=1e-4, atol=2e-7)
    # Frozen parameters carry no optimizer state: only the projector is in it.
    assert set(jax.tree_util.tree_structure(s1.params).node_data()[1]) == {"projector"}


@pytest.mark.slow(seconds=13)
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    hf, model, batch = _tiny(tmp_path)
    batch["pixel_values"][0, 0, 0, 0, 0] = np.nan
    tx, sched = make_optimizer(learning_rate=1e-3, total_steps=10)
    params, frozen = split_params(model.params, ["projector/.*"])
    state = create_state(params, frozen, tx)
    new, m = jax.jit(make_train_step(model.config, tx, sched))(state, to_microbatches(batch, 1))
    assert int(m["nonfinite"]) == 1 and int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow(seconds=20)
def test_chunked_loss_equals_the_full_logits_loss():
    """The training loss runs the head per chunk of positions: same loss (1e-6) and gradients (1e-5)."""
    seed = fresh_seed()
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=14, patch_size=14),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=72, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8),
        image_token_index=127, vision_feature_layer=-1,
    )

    # Random values of the right shapes (no compiled init): kernels ~0.3, norm scales ~1.
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (0.3 * rng.standard_normal(s.shape) + ("scale" in jax.tree_util.keystr(path))).astype(np.float32),
        abstract_params(cfg))
    params, frozen = split_params(params, ["language_model/.*"])
    batch = _batch(seed, 0, rows=3, t=37)  # text only: the loss is the language model's
    batch["pixel_values"] = None
    module = Llava(cfg)

    def full(p):  # the loss as it was: float32 logits of every position at once
        logits, _ = module.apply({"params": merge_params(p, frozen)}, **model_inputs(batch))
        return cross_entropy_sum(logits, batch["labels"])

    chunked = lambda p: loss_sum_fn(cfg, chunk=8)(p, frozen, batch)  # noqa: E731  (37 = 4 x 8 + 5)
    loss_ref, g_ref = jax.jit(jax.value_and_grad(full))(params)
    loss, g = jax.jit(jax.value_and_grad(chunked))(params)
    assert abs(float(loss) - float(loss_ref)) <= 1e-6 * abs(float(loss_ref)), (seed, float(loss), float(loss_ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-12)
        assert rel < 1e-5, f"seed {seed}: {jax.tree_util.keystr(path)} relative gradient error {rel:.2e}"


def test_schedule_is_transformers_cosine_with_warmup():
    """Warmup then cosine to 0, as transformers' get_cosine_schedule_with_warmup (1e-6 relative), from
    the numbers as arrays; and the LoRA stage's second group follows its own peak on the same curve."""
    from transformers import get_cosine_schedule_with_warmup

    from llava_jax.train.optimizer import learning_rate_schedule, schedule_hyper, warmup_cosine

    for peak, total, ratio in ((2e-3, 10, 0.03), (1e-4, 7, 0.5), (1.0, 5, 0.0), (3e-5, 1, 0.03)):
        h = schedule_hyper(peak, total, ratio)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        ref = get_cosine_schedule_with_warmup(opt, int(h["warmup_steps"]), int(h["decay_steps"]))
        want = []
        for _ in range(total + 1):  # past the end transformers' cosine rises again; ours stays at 0
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        steps = np.arange(total + 1)
        got = np.asarray(jax.jit(lambda lr, w, d, t: warmup_cosine(lr, w, d)(t))(
            h["learning_rate"], h["warmup_steps"], h["decay_steps"], steps))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * peak, err_msg=str((peak, total, ratio)))
        np.testing.assert_allclose(np.asarray(learning_rate_schedule(peak, total, ratio)(steps)), got, rtol=1e-6)


def test_schedule_numbers_are_inputs_of_the_compiled_step():
    """Stages that differ only in length, learning rate, warmup or weight decay lower to one program
    (so the persistent compilation cache compiles it once), and the step logs each stage's own rate."""
    from jax.sharding import Mesh

    from llava_jax.parallel.rules import DEFAULT_RULES
    from llava_jax.train.defaults import stage as make_stage
    from llava_jax.train.program import stage_program

    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=14, patch_size=14),
        text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=8),
        image_token_index=63, vision_feature_layer=-1,
    )
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
    batch = {"input_ids": np.ones((1, 2, 8), np.int32), "attention_mask": np.ones((1, 2, 8), np.int32),
             "labels": np.ones((1, 2, 8), np.int32), "pixel_values": np.zeros((1, 2, 1, 14, 14, 3), np.float32)}
    texts, rates = [], []
    for lr, total, ratio, wd in ((1e-3, 10, 0.03, 0.0), (5e-2, 3, 0.5, 0.1)):
        st = make_stage("s", data="d", template="plain", trainable=["projector/.*"], learning_rate=lr, global_batch=2,
                        micro_batch=2, warmup_ratio=ratio, weight_decay=wd)
        program = stage_program(cfg, st, mesh, DEFAULT_RULES, total, params)
        texts.append(program.step.lower(program.state_abstract, batch).as_text())
        state = program.init_state(params)
        for _ in range(2):
            state, m = program.step(state, batch)
            rates.append(float(m["learning_rate"]))
    assert texts[0] == texts[1]
    # Warmup of 1 step (ceil(3% of 10)), then the peak; warmup of 2 steps (50% of 3): halfway up.
    np.testing.assert_allclose(rates, [0.0, 1e-3, 0.0, 5e-2 / 2], rtol=1e-6)
