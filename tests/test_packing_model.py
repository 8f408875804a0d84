"""Packed rows (several samples a row, `segment_ids` and `positions`): the model gives each sample the
logits it gets alone, and the training loss and gradients equal those of the same samples unpacked.

Tiny random float32 models (`tests/_params.py`), fresh seeds. The reference for "alone" is the same
samples as right-padded rows of their own, which tests/test_model_llava.py checks against transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax import anyres
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.attention import choose_attention
from llava_jax.models.llava import LlavaModel, check_segments, segment_positions
from llava_jax.train.loss import IGNORE_INDEX, supervised_count
from llava_jax.train.optimizer import split_params
from llava_jax.train.step import create_state, make_train_step, to_microbatches
from tests._params import host_random_params
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, NEXT_PINPOINTS, NEXT_TILE, random_ids

TILE = NEXT_TILE  # 28 px tiles of 2 x 2 features: 4 image tokens a LLaVA-1.5 image


def _cfg(window: int | None = None, next_: bool = False) -> LlavaConfig:
    geometry = None
    if next_:
        geometry = anyres.AnyresConfig(tile_size=TILE, grid=2, pinpoints=tuple(map(tuple, NEXT_PINPOINTS)))
    return LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=TILE,
                            patch_size=14),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, sliding_window=window),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, anyres=geometry,
    )


def _samples(rng, cfg: LlavaConfig, specs):
    """Samples of (text lengths, image size or None): BOS, text, then the image's tokens and more text."""
    out = []
    for n, size in specs:
        ids = [1] + list(random_ids(rng, n))
        if size is not None:
            ids += [IMAGE_TOKEN] * cfg.image_layout(size).num_tokens + list(random_ids(rng, 3))
        out.append((np.array(ids, np.int32), size))
    return out


def _images(rng, cfg, samples):
    """Each image sample's pixels, in sample order: [H, W, 3] (1.5) or [max patches, H, W, 3] (NeXT)."""
    pix, sizes = [], []
    for _, size in samples:
        if size is None:
            continue
        if cfg.is_anyres:
            p = rng.standard_normal((5, TILE, TILE, 3)).astype(np.float32)
            p[cfg.image_layout(size).num_patches:] = 0
        else:
            p = rng.standard_normal((TILE, TILE, 3)).astype(np.float32)
        pix.append(p)
        sizes.append(size)
    return pix, sizes


def _packed(rows, t):
    """input_ids, segment_ids, positions [len(rows), t] of rows of samples (lists of id arrays), right-padded."""
    ids, seg, pos = (np.zeros((len(rows), t), np.int32) for _ in range(3))
    for b, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            ids[b, at:at + len(s)], seg[b, at:at + len(s)], pos[b, at:at + len(s)] = s, k + 1, np.arange(len(s))
            at += len(s)
    return ids, seg, pos


def _alone(samples, t):
    """The same samples one a row, right-padded: input_ids, attention_mask."""
    ids, mask = np.zeros((len(samples), t), np.int32), np.zeros((len(samples), t), np.int32)
    for b, (s, _) in enumerate(samples):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return ids, mask


def _check_packed_equals_alone(cfg, specs, layout, t, impls):
    """Samples `specs` packed into rows by `layout` (lists of sample indices; the images go in the
    order of the rows' placeholders) give, at each sample's slots, the logits of that sample alone."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    samples = _samples(rng, cfg, specs)
    pix, sizes = _images(rng, cfg, samples)
    params = host_random_params(cfg, seed)
    ids, mask = _alone(samples, max(len(s) for s, _ in samples))
    kw = dict(pixel_values=np.stack(pix) if pix else None, image_sizes=sizes if cfg.is_anyres else None)
    ref = np.asarray(LlavaModel(cfg.replace(attention="xla"), params)(ids, attention_mask=mask, **kw).logits)
    order = [i for row in layout for i in row]  # the images of the packed batch, row by row
    pix_packed = [pix[sum(samples[j][1] is not None for j in range(i))] for i in order if samples[i][1] is not None]
    sizes_packed = [samples[i][1] for i in order if samples[i][1] is not None]
    pids, seg, pos = _packed([[samples[i][0] for i in row] for row in layout], t)
    kw = dict(pixel_values=np.stack(pix_packed) if pix_packed else None,
              image_sizes=sizes_packed if cfg.is_anyres else None)
    for impl in impls:
        # Positions given for one implementation, derived from the segments for the other: both must do.
        got = np.asarray(LlavaModel(cfg.replace(attention=impl), params)(
            pids, segment_ids=seg, positions=pos if impl == "xla" else None, attention_mask=seg != 0, **kw).logits)
        for b, row in enumerate(layout):
            at = 0
            for i in row:
                n = len(samples[i][0])
                err = np.abs(got[b, at:at + n] - ref[i, :n]).max()
                assert err < 1e-5, f"seed {seed}: {impl}, sample {i} in row {b}: max error {err:.2e}"
                at += n


@pytest.mark.slow(seconds=10)
def test_packed_llava15_logits_equal_each_sample_alone():
    """Three samples of different lengths (image, text only, image) in one row with padding and a fourth
    alone in the next row: XLA and splash (Pallas interpret mode) equal each sample's own logits."""
    cfg = _cfg()
    size = (TILE, TILE)
    _check_packed_equals_alone(cfg, [(5, size), (9, None), (3, size), (12, size)], [[0, 1, 2], [3]], 48,
                               ("xla", "splash"))


@pytest.mark.slow(seconds=8)
def test_packed_sliding_window_logits_equal_each_sample_alone():
    """Mistral's window (shorter than the samples): the window counts within a segment, never across."""
    cfg = _cfg(window=4)
    size = (TILE, TILE)
    _check_packed_equals_alone(cfg, [(9, None), (4, size), (13, None)], [[0, 1, 2]], 40, ("xla", "splash"))


@pytest.mark.slow(seconds=5)
def test_packed_next_logits_equal_each_sample_alone():
    """LLaVA-NeXT: images of different sizes (their own token counts) in samples packed in one row; each
    image token takes its feature row through `image_index` as in an unpacked row."""
    cfg = _cfg(next_=True)
    _check_packed_equals_alone(cfg, [(4, (30, 90)), (6, None), (3, (20, 17))], [[0, 1, 2]], 80, ("xla",))


def test_packing_changes_the_logits_without_segment_ids():
    """The property above is not vacuous: the same packed row read as one sequence differs from the
    samples alone (the second sample sees the first)."""
    seed = fresh_seed()
    cfg = _cfg()
    samples = _samples(np.random.default_rng(seed), cfg, [(6, None), (7, None)])
    params = host_random_params(cfg, seed)
    pids, seg, pos = _packed([[s for s, _ in samples]], 16)
    model = LlavaModel(cfg.replace(attention="xla"), params)
    packed = np.asarray(model(pids, segment_ids=seg, positions=pos).logits)
    joined = np.asarray(model(pids, attention_mask=seg != 0).logits)
    n0 = len(samples[0][0])
    np.testing.assert_allclose(packed[0, :n0], joined[0, :n0], atol=1e-5)  # the first sample is alone either way
    assert np.abs(packed[0, n0:n0 + len(samples[1][0])] - joined[0, n0:n0 + len(samples[1][0])]).max() > 1e-3


def _train_batches(rng, cfg):
    """The same five samples as a packed batch (2 rows) and as an unpacked one (5 right-padded rows),
    with labels on each sample's second half, and a supervised first token in two samples (a template
    without BOS would give one): the shift must not carry it over to the previous sample's last token."""
    size = (TILE, TILE)
    samples = _samples(rng, cfg, [(6, size), (10, None), (4, None), (8, size), (5, size)])
    labels = []
    for i, (s, _) in enumerate(samples):
        lab = np.full(len(s), IGNORE_INDEX, np.int32)
        lab[len(s) // 2:] = s[len(s) // 2:]
        lab[lab == IMAGE_TOKEN] = IGNORE_INDEX
        if i in (1, 4):  # each the second sample of its packed row
            lab[0] = s[0]
        labels.append(lab)
    pix = rng.standard_normal((len(samples), TILE, TILE, 3)).astype(np.float32)
    t_alone = max(len(s) for s, _ in samples)
    ids, mask = _alone(samples, t_alone)
    lab = np.full(ids.shape, IGNORE_INDEX, np.int32)
    px = np.zeros((len(samples), 1, TILE, TILE, 3), np.float32)
    for b, (s, size_) in enumerate(samples):
        lab[b, :len(s)] = labels[b]
        if size_ is not None:
            px[b, 0] = pix[b]
    unpacked = {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": px}
    layout = [[0, 1, 2], [3, 4]]
    pids, seg, pos = _packed([[samples[i][0] for i in row] for row in layout], 32)
    plab, _, _ = _packed([[labels[i] for i in row] for row in layout], 32)
    plab[seg == 0] = IGNORE_INDEX
    ppx = np.zeros((2, 2, TILE, TILE, 3), np.float32)
    for b, row in enumerate(layout):
        imgs = [pix[i] for i in row if samples[i][1] is not None]
        ppx[b, :len(imgs)] = imgs
    packed = {"input_ids": pids, "attention_mask": (seg != 0).astype(np.int32), "labels": plab,
              "pixel_values": ppx, "segment_ids": seg, "positions": pos}
    return unpacked, packed


@pytest.mark.slow(seconds=18)
def test_packed_loss_and_gradients_equal_unpacked():
    """The real train step: the same five samples unpacked (5 rows, one micro-batch) and packed (2 rows,
    one a micro-batch) give the same loss (the summed NLL over the global batch's supervised tokens)
    and the same gradient of every trained tensor (read off an SGD update), 1e-5."""
    import optax

    seed = fresh_seed()
    cfg = _cfg()
    unpacked, packed = _train_batches(np.random.default_rng(seed), cfg)
    n = int(supervised_count(unpacked["labels"]))
    assert int(supervised_count(packed["labels"], packed["segment_ids"])) == n
    # Without the segments the count would take the two supervised first tokens as targets too.
    assert int(supervised_count(packed["labels"])) == n + 2
    params, frozen = split_params(host_random_params(cfg, seed), ["(projector|language_model)/.*"])
    lr = 1e4  # the update -lr * g dwarfs the parameters: g read back from it to float32 rounding of g
    tx = optax.sgd(lr)
    step = jax.jit(make_train_step(cfg, tx, optax.constant_schedule(lr)))
    results = {}
    for name, batch, micro in (("unpacked", unpacked, 1), ("packed", packed, 2)):
        new, metrics = step(create_state(params, frozen, tx), to_microbatches(batch, micro))
        assert int(metrics["supervised_tokens"]) == n and int(metrics["nonfinite"]) == 0
        grads = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / lr, params, new.params)
        results[name] = float(metrics["loss"]), grads
    (loss_ref, g_ref), (loss, g) = results["unpacked"], results["packed"]
    assert abs(loss - loss_ref) < 1e-5, (seed, loss, loss_ref)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert rel < 1e-5, f"seed {seed}: {jax.tree_util.keystr(path)} relative gradient error {rel:.2e}"


def test_segment_positions_restart_at_each_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert np.asarray(segment_positions(seg)).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_bad_segments_are_clear_errors():
    check_segments(np.array([[1, 1, 2, 0]]), np.array([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="row 1 of segment_ids: a segment is not one contiguous run"):
        check_segments(np.array([[1, 2, 0, 0], [1, 2, 1, 0]]))
    with pytest.raises(ValueError, match="row 0: attention_mask and segment_ids != 0 disagree"):
        check_segments(np.array([[1, 1, 2, 0]]), np.array([[1, 1, 1, 1]]))


def test_packed_rows_on_a_gpu_take_xla_with_the_reason():
    """jax.nn.dot_product_attention's cuDNN kernel takes per-row lengths, no segments: packed rows on a
    GPU take the XLA path (logged once with this reason); splash takes them on a TPU."""
    impl, why = choose_attention("auto", platform="gpu", dtype=jnp.bfloat16, head_dim=128, decoding=False, packed=True)
    assert impl == "xla" and "segment ids" in why
    assert choose_attention("auto", platform="tpu", dtype=jnp.bfloat16, head_dim=128, decoding=False,
                            packed=True)[0] == "splash"
    assert choose_attention("auto", platform="gpu", dtype=jnp.bfloat16, head_dim=128, decoding=False)[0] == "cudnn"


@pytest.mark.slow(seconds=8)
def test_splash_with_segments_equals_the_dense_mask_forward_and_gradients():
    """Attention alone: splash with packed segment ids (interpret mode) and the XLA fallback of a fused
    mask (splash's path where the mesh does not split the heads) against the dense causal & same-segment
    mask, with a window, forward and gradients at real positions (a weighted sum of the outputs)."""
    from llava_jax.models import attention as attn
    from llava_jax.models.llama import attention_mask

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, t, window = 2, 100, 6  # splash pads to 128: the padding slots are segment 0
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, 16)), jnp.float32) for n in (4, 2, 2))
    seg = np.zeros((b, t), np.int32)
    seg[0, :30], seg[0, 30:31], seg[0, 31:77] = 1, 2, 3  # a one-token sample too
    seg[1, :100] = np.repeat([1, 2, 3, 4], [10, 40, 25, 25])
    seg = jnp.asarray(seg)
    pos = segment_positions(seg)
    dense = attention_mask(seg != 0, t, 0, window, pos, pos) & attn.same_segment(seg)
    real = np.asarray(seg != 0)
    w = jnp.asarray(rng.standard_normal((b, t, 4, 16)), jnp.float32) * jnp.asarray(real)[:, :, None, None]

    def value_and_grads(mask):
        loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, mask) * w)  # noqa: E731
        return jax.jit(lambda q, k, v: (attn.attention(q, k, v, mask), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)

    ref, ref_grads = value_and_grads(dense)
    tokens = (seg != 0).astype(jnp.int32)
    with attn.target_platform("cpu"):
        for impl in ("splash", "xla"):
            out, grads = value_and_grads(attn.AttentionMask(impl, causal=True, tokens=tokens, window=window,
                                                            segments=seg))
            err = np.abs(np.asarray(out - ref))[real].max()
            assert err < 1e-5, f"seed {seed}: {impl} forward max error {err:.2e}"
            for name, g, r in zip("qkv", grads, ref_grads):
                rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                assert rel < 1e-5, f"seed {seed}: {impl} d{name} relative error {rel:.2e}"
