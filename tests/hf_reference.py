"""Tiny random transformers models for parity tests: built, perturbed and saved on the CPU.

Every weight is redrawn (norm scales around 1, biases around 0 but not equal to them) so that a
transposed kernel, a missing bias or a wrong norm cannot hide behind an identity.
"""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 128
IMAGE_TOKEN = 127  # inside the vocabulary, as llava-hf pads its vocab to hold <image>


def text_config_dict(*, layers=2, hidden=64, heads=4, kv_heads=4, theta=10000.0, rope_scaling=None, tie=False, vocab=VOCAB):
    d = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    rope = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling:
        rope.update(rope_scaling)
    d["rope_parameters"] = rope
    return d


def vision_config_dict(*, layers=3, hidden=32, heads=4, image_size=28, patch=14):
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter with a seeded generator (fan-in scaled, norms ~1, biases ~0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("bias"):
            new = 0.1 * torch.randn(shape, generator=g)
        elif "norm" in name:
            new = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif p.ndim >= 2 and "embed" not in name:
            fan_in = int(np.prod(shape[1:]))
            new = torch.randn(shape, generator=g) / np.sqrt(fan_in)
        else:
            new = 0.5 * torch.randn(shape, generator=g)
        p.copy_(new.to(p.dtype))
    return model.eval()


def make_llava(
    seed: int,
    *,
    vision_feature_layer=-2,
    strategy="default",
    kv_heads=4,
    theta=10000.0,
    tie=False,
    text_layers=2,
    vision_layers=3,
):
    """A perturbed tiny `LlavaForConditionalGeneration` in float32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(**vision_config_dict(layers=vision_layers))
    tc = LlamaConfig(**text_config_dict(kv_heads=kv_heads, theta=theta, tie=tie, layers=text_layers))
    n_img = (vc.image_size // vc.patch_size) ** 2 + (1 if strategy == "full" else 0)
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=n_img,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=tie,
    )
    model = LlavaForConditionalGeneration(cfg)
    return perturb_(model, seed), n_img


# LLaVA-NeXT in tiny: CLIP 28 px tiles of 2 x 2 features, the v1.6 pinpoints scaled to 28 px tiles.
NEXT_TILE = 28
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def make_next(seed: int, *, text_config=None, pinpoints=NEXT_PINPOINTS, vision_hidden=32, vision_heads=4,
              vision_layers=3, image_token=IMAGE_TOKEN):
    """A perturbed tiny `LlavaNextForConditionalGeneration` (float32; CLIP + `text_config`, a Llama by default)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    tc = text_config if text_config is not None else LlamaConfig(**text_config_dict())
    vision = vision_config_dict(layers=vision_layers, image_size=NEXT_TILE, hidden=vision_hidden, heads=vision_heads)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=tc,
        image_token_index=image_token,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=getattr(tc, "tie_word_embeddings", False),
    )
    return perturb_(LlavaNextForConditionalGeneration(cfg), seed)


def random_ids(rng: np.random.Generator, length: int) -> np.ndarray:
    """Text token ids that avoid the image token and the pad id."""
    return rng.integers(3, IMAGE_TOKEN, size=length)


def torch_logits(model, input_ids, pixel_values_nhwc=None, attention_mask=None, position_ids=None) -> np.ndarray:
    """The reference forward: NHWC numpy in, float32 logits out."""
    kw = {"input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long)}
    if pixel_values_nhwc is not None:
        kw["pixel_values"] = torch.as_tensor(np.asarray(pixel_values_nhwc).transpose(0, 3, 1, 2).copy())
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
