"""Model configuration: one frozen dataclass per tower, parsed from HF or original LLaVA config.json.

Architecture fields mirror Hugging Face names where they exist so that a reader who knows
`transformers` can map them one to one; compute settings (dtype, remat) live beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_jax.models.lora import LoraSpec

from llava_jax import paths


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (defaults: ViT-L/14-336, the LLaVA-1.5 tower)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-family decoder (defaults: Vicuna-7B v1.5 with LLaVA's padded vocabulary)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs so that the dataclass stays hashable (jit static).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The whole LLaVA: vision tower, projector, language model and how they are joined."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_token_index: int = 32000
    # Compute settings: not part of the checkpoint's architecture.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # One nn.scan over each tower's layers, parameters stacked on a leading `layers` axis (compile
    # time independent of depth); False: layers unrolled, parameters per layer (`layers_0`, ...).
    scan_layers: bool = True
    # auto: cuDNN flash attention on GPU, Pallas splash on TPU, XLA elsewhere and wherever a kernel
    # does not apply; or force one of xla | cudnn | splash (models/attention.py: choose_attention).
    attention: str = "auto"
    # A LoRA adapter applied at run time (`models.lora.LoraSpec`); never saved with the base config.
    lora: LoraSpec | None = None

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors each image contributes (the length of one placeholder run)."""
        extra = 1 if self.vision_feature_select_strategy in ("full", "cls_patch") else 0
        return self.vision.num_patches + extra

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers that must run to produce `vision_feature_layer` (HF hidden_states indexing)."""
        n = self.vision.num_layers
        layer = self.vision_feature_layer
        used = layer if layer >= 0 else n + 1 + layer
        if not 0 <= used <= n:
            raise ValueError(f"vision_feature_layer={layer} is outside the {n}-layer vision tower")
        return used

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.replace(lora=None))
        d.pop("lora")
        if d["text"]["rope_scaling"] is not None:
            d["text"]["rope_scaling"] = dict(d["text"]["rope_scaling"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        d = dict(d)
        text = dict(d.pop("text"))
        if text.get("rope_scaling") is not None:
            text["rope_scaling"] = _freeze(text["rope_scaling"])
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)

    def save(self, directory: str) -> None:
        """Write our own config as `llava_jax_config.json`."""
        paths.write_text(os.path.join(directory, CONFIG_FILE), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str) -> "LlavaConfig":
        return cls.from_dict(json.loads(paths.read_text(os.path.join(directory, CONFIG_FILE))))


CONFIG_FILE = "llava_jax_config.json"


def _freeze(d: dict | None) -> tuple | None:
    return None if d is None else tuple(sorted(d.items()))


def vision_config_from_hf(c: dict, source: str = "config") -> VisionConfig:
    """Parse a HF `CLIPVisionConfig` dict (or the `vision_config` of a CLIPConfig)."""
    if "vision_config" in c and "hidden_size" not in c:
        c = c["vision_config"]
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{source}: vision hidden_act {act!r} is not supported (expected quick_gelu or gelu)")
    return VisionConfig(
        hidden_size=c.get("hidden_size", 768),
        intermediate_size=c.get("intermediate_size", 3072),
        num_layers=c.get("num_hidden_layers", 12),
        num_heads=c.get("num_attention_heads", 12),
        image_size=c.get("image_size", 224),
        patch_size=c.get("patch_size", 32),
        num_channels=c.get("num_channels", 3),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        hidden_act=act,
    )


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def text_config_from_hf(c: dict, source: str = "config") -> TextConfig:
    """Parse a HF `LlamaConfig` dict; both `rope_theta`+`rope_scaling` and the newer `rope_parameters`."""
    model_type = c.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "vicuna"):
        raise ValueError(f"{source}: text model_type {model_type!r} is not a LLaMA-family decoder")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: text hidden_act {act!r} is not supported (expected silu)")
    hidden = c.get("hidden_size", 4096)
    heads = c.get("num_attention_heads", 32)
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling:
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        scaling = None if rope_type == "default" else _freeze({"rope_type": rope_type, **scaling})
    eos = c.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    return TextConfig(
        vocab_size=c.get("vocab_size", 32000),
        hidden_size=hidden,
        intermediate_size=c.get("intermediate_size", 11008),
        num_layers=c.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling or None,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        bos_token_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
        eos_token_id=eos if eos is not None else 2,
        pad_token_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else 0,
    )


def llava_config_from_hf(c: dict, source: str = "config.json") -> LlavaConfig:
    """Parse a HF `LlavaConfig` dict (`model_type: llava`)."""
    if c.get("model_type") != "llava":
        raise ValueError(f"{source}: model_type is {c.get('model_type')!r}, expected 'llava'")
    layer = c.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise ValueError(f"{source}: a list of vision_feature_layer values ({layer}) is not supported")
    act = c.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: projector_hidden_act {act!r} is not supported (expected gelu)")
    text = text_config_from_hf(c.get("text_config") or {}, source)
    if c.get("tie_word_embeddings") and not text.tie_word_embeddings:
        text = dataclasses.replace(text, tie_word_embeddings=True)
    return LlavaConfig(
        vision=vision_config_from_hf(c.get("vision_config") or {}, source),
        text=text,
        projector_type="mlp2x_gelu",
        projector_bias=bool(c.get("multimodal_projector_bias", True)),
        vision_feature_layer=layer,
        vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
        image_token_index=c.get("image_token_index", c.get("image_token_id", 32000)),
    )


def llava_config_to_hf(cfg: LlavaConfig) -> dict:
    """Our config as a HF `LlavaConfig` dict (for export); only `mlp2x_gelu` has a HF equivalent."""
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"projector {cfg.projector_type!r} has no transformers equivalent (only mlp2x_gelu)")
    v, t = cfg.vision, cfg.text
    text = {
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": dict(t.rope_scaling) if t.rope_scaling else None,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.num_image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": t.tie_word_embeddings,
    }


# Presets for the shapes users ask for by name.
CLIP_VIT_L14_224 = VisionConfig(image_size=224)
CLIP_VIT_L14_336 = VisionConfig(image_size=336)
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
LLAVA_15_7B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_7B)
LLAVA_15_13B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_13B)
LLAVA_V1_7B = LlavaConfig(vision=CLIP_VIT_L14_224, text=VICUNA_7B, projector_type="linear", vision_feature_layer=-2)
# By name, for configs that need an architecture without a checkpoint (compile-only, benchmarks).
PRESETS = {"llava-1.5-7b": LLAVA_15_7B, "llava-1.5-13b": LLAVA_15_13B, "llava-v1-7b": LLAVA_V1_7B}
