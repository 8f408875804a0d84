"""Model FLOPs per training step, from the shapes alone, and MFU against the chip's peak.

Matmul FLOPs are 2 x weights x tokens forward; causal attention is counted at half of the full
T x T score and value products. Backward costs 2x forward for a trained layer (activation and
weight gradients) and 1x for a frozen layer that still passes gradients down (LLaMA in stage 1);
a frozen tower with nothing trainable below it (CLIP) is forward only.

Images are counted in tiles, the vision tower's batch: one an image for LLaVA-1.5, the base and each
tile for LLaVA-NeXT (padding slots, which cost compute under static shapes but train nothing, are
left out). Image tokens are text tokens like any other: the text count is per token.
"""

from __future__ import annotations

import math

from llava_jax.config import LlavaConfig

# Dense bf16 peak per chip (vendor datasheets), for MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p's device_kind ("TPU v5 lite" is v5e's)
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


# HBM bandwidth per chip, GB/s (vendor datasheets), for a hand roofline against the compiler's estimates.
PEAK_HBM_GBPS = {
    "H100": 3350.0,
    "H200": 4800.0,
    "TPU v4": 1200.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v5": 2765.0,  # v5p's device_kind
    "TPU v6 lite": 1640.0,
    "TPU v6e": 1640.0,
}


def peak_hbm_gbps(device_kind: str) -> float | None:
    """HBM bandwidth (GB/s) of a device kind, the longest matching name first (None when unknown)."""
    for name in sorted(PEAK_HBM_GBPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_HBM_GBPS[name]
    return None


def peak_tflops(device_kind: str) -> float | None:
    """Peak bf16 TFLOP/s of a device kind, the longest matching name first (None when unknown, e.g. CPU)."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_TFLOPS[name]
    return None


def _text_forward(cfg: LlavaConfig, tokens: int, seq_len: int, *, attention: bool = True, head: bool = True) -> float:
    t = cfg.text
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = t.hidden_size * (2 * q_out + 2 * kv_out) + 3 * t.hidden_size * t.intermediate_size
    matmul = 2 * tokens * (t.num_layers * per_layer + head * t.hidden_size * t.vocab_size)
    scores = 2 * 2 * tokens * seq_len * q_out * t.num_layers / 2  # QK^T and AV, causal half
    return matmul + attention * scores


def _vision_forward(cfg: LlavaConfig, tiles: int, *, attention: bool = True, patch: bool = True) -> float:
    v = cfg.vision
    p = v.num_positions  # the class token, where the tower has one
    per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    layers = cfg.num_vision_layers_used
    embed = v.num_channels * v.patch_size**2 * v.hidden_size * v.num_patches
    scores = 2 * 2 * tiles * p * p * v.hidden_size * layers
    return 2 * tiles * (p * layers * per_layer + patch * embed) + attention * scores


def _projector_forward(cfg: LlavaConfig, tiles: int) -> float:
    from llava_jax.models.llava import abstract_params

    weights = sum(math.prod(layer["kernel"].shape) for layer in abstract_params(cfg)["projector"].values())
    # Every feature vector of a tile is projected, the ones unpadding later drops included.
    return 2 * tiles * cfg.geometry.tile_tokens * weights


def train_step_flops(
    cfg: LlavaConfig, *, tokens: int, seq_len: int, tiles: int, train_vision: bool, train_text: bool,
    recompute: bool = False, attention: bool = True,
) -> float:
    """FLOPs of one optimizer step over `tokens` tokens (rows x seq_len) and `tiles` real image tiles.

    The model's FLOPs (what MFU divides) by default. `recompute`: add what full remat runs again, each
    decoder layer's forward and, when the tower trains, each tower layer's (the hardware's FLOPs under
    `remat=full`). `attention=False` leaves out the score and value products, e.g. to compare with a count
    that cannot see inside a fused attention kernel (hlo_flops)."""
    text = _text_forward(cfg, tokens, seq_len, attention=attention) * (3 if train_text else 2)
    proj = _projector_forward(cfg, tiles) * 3
    vision = _vision_forward(cfg, tiles, attention=attention) * (3 if train_vision else 1)
    if recompute:
        text += _text_forward(cfg, tokens, seq_len, attention=attention, head=False)
        vision += train_vision * _vision_forward(cfg, tiles, attention=attention, patch=False)
    return text + proj + vision


def forward_flops(cfg: LlavaConfig, *, tokens: int, seq_len: int, tiles: int) -> float:
    """FLOPs of one forward pass (prefill) over `tokens` tokens and `tiles` image tiles (1.5: images)."""
    return _text_forward(cfg, tokens, seq_len) + _projector_forward(cfg, tiles) + _vision_forward(cfg, tiles)
