"""Model configuration: one frozen dataclass per tower, parsed from HF or original LLaVA config.json.

Architecture fields mirror Hugging Face names where they exist so that a reader who knows
`transformers` can map them one to one; compute settings (dtype, remat) live beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from llava_jax import anyres as anyres_lib
from llava_jax import paths


# The decoder layer's Linear layers, named as our parameter paths name them under a layer.
DECODER_LINEARS = (
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj",
)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which of the decoder's Linear layers carry an adapter, and its rank, alpha and dropout."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # from DECODER_LINEARS, e.g. ("self_attn/q_proj", "mlp/down_proj")
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in DECODER_LINEARS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: expected a non-empty subset of "
                             f"{list(DECODER_LINEARS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """peft's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def replace(self, **kw) -> "LoraSpec":
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        """Inverse of `dataclasses.asdict` (what a training checkpoint records)."""
        return cls(**{**d, "targets": tuple(d["targets"])})


# Vision towers, by the transformers config class they mirror (models/vision.py builds each).
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
# The MLP activations the towers compute (names as transformers' ACT2FN; models/layers.py ACTIVATIONS).
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower (defaults: CLIP ViT-L/14-336, the LLaVA-1.5 tower).

    CLIP and SigLIP share the encoder layer; they differ in the embeddings (CLIP: a class token and
    `pre_layrnorm`, no patch bias; SigLIP: a patch bias, no class token) and in what follows the
    layers, which LLaVA never runs. `model_type` names which, as transformers' config classes do.
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    model_type: str = "clip_vision_model"  # one of VISION_MODEL_TYPES
    # SigLIP's attention-pooling `head` (transformers' `vision_use_head`): never built, as LLaVA reads the
    # hidden states; recorded so that export writes back the checkpoint's tensors and config as they were.
    vision_use_head: bool = False

    def __post_init__(self):
        if self.model_type not in VISION_MODEL_TYPES:
            raise ValueError(f"vision model_type {self.model_type!r}: expected one of {VISION_MODEL_TYPES}")
        if self.vision_use_head and self.model_type != "siglip_vision_model":
            raise ValueError(f"vision_use_head: only a SigLIP tower has a pooling head, not {self.model_type!r}")

    @property
    def has_class_token(self) -> bool:
        """Whether the tower puts a class token before the patches (CLIP does, SigLIP does not)."""
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        """Patches per image (the CLS token not counted)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens the encoder runs on: the patches, and the class token where the tower has one."""
        return self.num_patches + int(self.has_class_token)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


# Decoder families one decoder covers; Yi and Vicuna are "llama" (the same layout and config).
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The MLP activations the decoder computes (names as transformers' ACT2FN; models/layers.py ACTIVATIONS).
TEXT_ACTIVATIONS = ("silu", "gelu")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A LLaMA-family decoder (defaults: Vicuna-7B v1.5 with LLaVA's padded vocabulary).

    Families are configuration, not separate modules: Llama (Llama 1/2/3, Vicuna, Yi), Mistral and
    Qwen2 differ only in the fields below (`model_type`, the biases, `sliding_window`, ties).
    """

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
    # Llama's `attention_bias`: a bias on all four of q, k, v and o_proj.
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # The transformers config class the checkpoint names (what export writes back): one of TEXT_MODEL_TYPES.
    model_type: str = "llama"
    # A bias on q, k and v_proj only (Qwen2); o_proj has one only with `attention_bias`.
    qkv_bias: bool = False
    # Sliding-window attention in every layer: query position i sees key positions j with
    # i - sliding_window < j <= i (transformers' `sliding_window_overlay`); None = full causal.
    sliding_window: int | None = None

    def __post_init__(self):
        if self.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(f"text model_type {self.model_type!r}: expected one of {TEXT_MODEL_TYPES}")
        if self.hidden_act not in TEXT_ACTIVATIONS:
            raise ValueError(f"text hidden_act {self.hidden_act!r}: expected one of {TEXT_ACTIVATIONS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"text sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def qkv_has_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj carry a bias (Llama's attention_bias, or Qwen2's q/k/v bias)."""
        return self.attention_bias or self.qkv_bias

    @property
    def o_has_bias(self) -> bool:
        """Whether o_proj carries a bias (only Llama's attention_bias gives it one)."""
        return self.attention_bias


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
    # A LoRA adapter applied at run time (`LoraSpec` below, used by models/lora.py); never saved with the base config.
    lora: LoraSpec | None = None
    # LLaVA-NeXT's anyres tiling (pinpoints, `spatial_unpad` merge, `image_newline`); None: LLaVA-1.5, one tile.
    # OneVision's anyres_max_9 and untiled multi-image, and video pooling, are fields of it.
    anyres: anyres_lib.AnyresConfig | None = None
    # The `<video>` placeholder's id (OneVision, NeXT-Video: a geometry with `video` pooling); None: no video.
    video_token_index: int | None = None

    @property
    def geometry(self) -> anyres_lib.AnyresConfig:
        """How an image becomes tokens (`llava_jax.anyres`): `anyres`, or the one-tile layout of LLaVA-1.5."""
        if self.anyres is not None:
            return self.anyres
        extra = int(self.vision_feature_select_strategy in ("full", "cls_patch") and self.vision.has_class_token)
        v = self.vision
        return anyres_lib.AnyresConfig.flat(v.image_size, v.image_size // v.patch_size, extra)

    @property
    def is_anyres(self) -> bool:
        """Whether an image's token count depends on its size (LLaVA-NeXT), not one constant (LLaVA-1.5)."""
        return self.geometry.merge != "flat"

    def image_layout(self, size: tuple[int, int]) -> anyres_lib.ImageLayout:
        """What an image of `size` (height, width) becomes: patches, tile grid, token count."""
        return anyres_lib.layout(self.geometry, size)

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors each image contributes (LLaVA-1.5: one constant; anyres: see `image_layout`)."""
        if self.is_anyres:
            raise ValueError("an anyres (LLaVA-NeXT) image's token count depends on its size: "
                             "use LlavaConfig.image_layout(size).num_tokens")
        return self.geometry.tile_tokens

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
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Plain-JSON form (`llava_jax_config.json`); the run-time LoRA spec is left out."""
        d = dataclasses.asdict(self.replace(lora=None))
        d.pop("lora")
        if d["video_token_index"] is None:
            d.pop("video_token_index")  # configs without video read and write exactly as before
        if d["anyres"] is None:
            d.pop("anyres")  # LLaVA-1.5 configs read and write exactly as before
        else:
            d["anyres"]["pinpoints"] = [list(p) for p in d["anyres"]["pinpoints"]]
        if d["text"]["rope_scaling"] is not None:
            d["text"]["rope_scaling"] = dict(d["text"]["rope_scaling"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        """Inverse of `to_dict`."""
        d = dict(d)
        text = dict(d.pop("text"))
        if text.get("rope_scaling") is not None:
            text["rope_scaling"] = _freeze(text["rope_scaling"])
        geometry = d.pop("anyres", None)
        geometry = None if geometry is None else anyres_lib.AnyresConfig(**geometry)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), anyres=geometry, **d)

    def save(self, directory: str) -> None:
        """Write our own config as `llava_jax_config.json`."""
        paths.write_text(os.path.join(directory, CONFIG_FILE), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str) -> "LlavaConfig":
        """Read `directory/llava_jax_config.json`."""
        return cls.from_dict(json.loads(paths.read_text(os.path.join(directory, CONFIG_FILE))))


CONFIG_FILE = "llava_jax_config.json"


def _freeze(d: dict | None) -> tuple | None:
    return None if d is None else tuple(sorted(d.items()))


# What each transformers vision config class (5.x) defaults where a config.json leaves a field out.
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                vision_use_head=True),
}
# A full CLIPModel / SiglipModel config holds its vision tower's config under `vision_config`.
_VISION_PARENTS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def vision_config_from_hf(c: dict, source: str = "config") -> VisionConfig:
    """Parse a HF `CLIPVisionConfig` or `SiglipVisionConfig` dict (or the `vision_config` of a CLIPConfig /
    SiglipConfig), each field missing from it defaulted as that class defaults it; no `model_type`: CLIP."""
    if "vision_config" in c and "hidden_size" not in c:
        parent = _VISION_PARENTS.get(c.get("model_type"), "clip_vision_model")
        c = {"model_type": parent, **c["vision_config"]}
    model_type = c.get("model_type", "clip_vision_model")
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"{source}: vision model_type {model_type!r} is not supported "
                         f"(expected one of {list(VISION_MODEL_TYPES)})")
    d = _VISION_DEFAULTS[model_type]
    act = c.get("hidden_act", d["hidden_act"])
    if act not in VISION_ACTIVATIONS:
        raise ValueError(f"{source}: vision hidden_act {act!r} is not supported (expected one of {VISION_ACTIVATIONS})")
    return VisionConfig(
        hidden_size=c.get("hidden_size", d["hidden_size"]),
        intermediate_size=c.get("intermediate_size", d["intermediate_size"]),
        num_layers=c.get("num_hidden_layers", d["num_hidden_layers"]),
        num_heads=c.get("num_attention_heads", d["num_attention_heads"]),
        image_size=c.get("image_size", d["image_size"]),
        patch_size=c.get("patch_size", d["patch_size"]),
        num_channels=c.get("num_channels", 3),
        layer_norm_eps=c.get("layer_norm_eps", d["layer_norm_eps"]),
        hidden_act=act,
        model_type=model_type,
        vision_use_head=bool(c.get("vision_use_head", d.get("vision_use_head", False))),
    )


def vision_config_to_hf(v: VisionConfig) -> dict:
    """Our vision config as its transformers config dict (`vision_config_from_hf`'s inverse)."""
    d = {
        "model_type": v.model_type,
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
    if v.model_type == "siglip_vision_model":
        d["vision_use_head"] = v.vision_use_head
    return d


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# What each transformers config class (5.x) defaults where a config.json leaves a field out.
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, intermediate_size=11008, num_key_value_heads=None,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28),
}
# Names under which the families appear in configs; Vicuna is a Llama.
_TEXT_ALIASES = {"llama": "llama", "vicuna": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def _qwen2_sliding_window(c: dict, layers: int, source: str) -> int | None:
    """Qwen2's window as transformers applies it: only with `use_sliding_window`, and only in the
    layers `layer_types` marks "sliding_attention" (by default layers >= `max_window_layers`)."""
    d = _TEXT_DEFAULTS["qwen2"]
    if not c.get("use_sliding_window", d["use_sliding_window"]):
        return None
    window = c.get("sliding_window", d["sliding_window"])
    if window is None:
        return None
    types = c.get("layer_types") or [
        "sliding_attention" if i >= c.get("max_window_layers", d["max_window_layers"]) else "full_attention"
        for i in range(layers)
    ]
    sliding = {t == "sliding_attention" for t in types}
    if sliding == {True, False}:
        raise ValueError(f"{source}: qwen2 sliding window in some layers only ({types.count('sliding_attention')} of "
                         f"{layers}: max_window_layers / layer_types) is not supported; every layer or none")
    return window if sliding == {True} else None


def text_config_from_hf(c: dict, source: str = "config") -> TextConfig:
    """Parse a HF `LlamaConfig`, `MistralConfig` or `Qwen2Config` dict, each field missing from it
    defaulted as that class defaults it; rope from `rope_theta`+`rope_scaling` or `rope_parameters`."""
    given_type = c.get("model_type", "llama")
    if given_type not in _TEXT_ALIASES:
        raise ValueError(f"{source}: text model_type {given_type!r} is not a LLaMA-family decoder "
                         f"(expected one of {sorted(_TEXT_ALIASES)})")
    model_type = _TEXT_ALIASES[given_type]
    d = _TEXT_DEFAULTS[model_type]
    act = c.get("hidden_act", "silu")
    if act not in TEXT_ACTIVATIONS:
        raise ValueError(f"{source}: text hidden_act {act!r} is not supported (expected one of {TEXT_ACTIVATIONS})")
    hidden = c.get("hidden_size", 4096)
    heads = c.get("num_attention_heads", 32)
    layers = c.get("num_hidden_layers", 32)
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling:
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        scaling = None if rope_type == "default" else _freeze({"rope_type": rope_type, **scaling})
    if model_type == "mistral":  # every layer, whenever the config sets a window
        window = c.get("sliding_window", d["sliding_window"])
    elif model_type == "qwen2":
        window = _qwen2_sliding_window(c, layers, source)
    else:  # LlamaConfig has no window: transformers' Llama ignores one
        window = None
    # Llama's attention_bias covers q, k, v and o; Mistral has no biases; Qwen2 always has q/k/v ones.
    attention_bias = model_type == "llama" and bool(c.get("attention_bias", False))
    mlp_bias = model_type == "llama" and bool(c.get("mlp_bias", False))
    bos = c.get("bos_token_id", d["bos_token_id"])
    eos = c.get("eos_token_id", d["eos_token_id"])
    if isinstance(eos, list):
        eos = eos[0]
    pad = c.get("pad_token_id")
    return TextConfig(
        vocab_size=c.get("vocab_size", d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=c.get("intermediate_size", d["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads", d["num_key_value_heads"]) or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling or None,
        max_position_embeddings=c.get("max_position_embeddings", d["max_position_embeddings"]),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        hidden_act=act,
        # Our ids are ints: a config without them (Qwen2's defaults) takes LLaMA's.
        bos_token_id=bos if bos is not None else 1,
        eos_token_id=eos if eos is not None else 2,
        pad_token_id=pad if pad is not None else 0,
        model_type=model_type,
        qkv_bias=model_type == "qwen2",
        sliding_window=None if window is None else int(window),
    )


LLAVA_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "llava_next_video")
# What each family's transformers config class defaults the placeholder ids to.
_TOKEN_DEFAULTS = {"llava": (32000, None), "llava_next": (32000, None), "llava_onevision": (151646, 151647),
                   "llava_next_video": (32001, 32000)}
_LAYER_DEFAULTS = {"llava_onevision": (-1, "full")}


def llava_config_from_hf(c: dict, source: str = "config.json") -> LlavaConfig:
    """Parse a HF `LlavaConfig` (`model_type: llava`), `LlavaNextConfig` (`llava_next`: anyres),
    `LlavaOnevisionConfig` (`llava_onevision`: anyres_max_9, many images, video) or `LlavaNextVideoConfig`
    (`llava_next_video`: anyres and average-pooled video) dict."""
    if c.get("model_type") not in LLAVA_MODEL_TYPES:
        raise ValueError(f"{source}: model_type is {c.get('model_type')!r}, expected one of {list(LLAVA_MODEL_TYPES)}")
    image_token, video_token = _TOKEN_DEFAULTS[c["model_type"]]
    default_layer, default_strategy = _LAYER_DEFAULTS.get(c["model_type"], (-2, "default"))
    layer = c.get("vision_feature_layer", default_layer)
    if isinstance(layer, list):
        raise ValueError(f"{source}: a list of vision_feature_layer values ({layer}) is not supported")
    act = c.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: projector_hidden_act {act!r} is not supported (expected gelu)")
    text = text_config_from_hf(c.get("text_config") or {}, source)
    if c.get("tie_word_embeddings") and not text.tie_word_embeddings:
        text = dataclasses.replace(text, tie_word_embeddings=True)
    cfg = LlavaConfig(
        vision=vision_config_from_hf(c.get("vision_config") or {}, source),
        text=text,
        projector_type="mlp2x_gelu",
        projector_bias=bool(c.get("multimodal_projector_bias", True)),
        vision_feature_layer=layer,
        vision_feature_select_strategy=c.get("vision_feature_select_strategy", default_strategy),
        image_token_index=c.get("image_token_index", c.get("image_token_id", image_token)),
        video_token_index=c.get("video_token_index", c.get("video_token_id", video_token)),
    )
    if c["model_type"] == "llava":
        return cfg
    flat = cfg.geometry
    geometry = anyres_lib.from_hf_config(c, flat.tile_size, flat.grid, flat.extra_tokens, source)
    return cfg.replace(anyres=geometry)


def text_config_to_hf(t: TextConfig) -> dict:
    """Our decoder config as its own family's transformers config dict (`text_config_from_hf`'s inverse).

    Raises ValueError when the fields are not a layout that family's transformers class builds
    (e.g. a Mistral with biases, a Llama with a sliding window, a Qwen2 without q/k/v bias).
    """
    bias = {"llama": (t.attention_bias, t.attention_bias), "mistral": (False, False), "qwen2": (True, False)}
    qkv, o = bias[t.model_type]
    problems = []
    if (t.qkv_has_bias, t.o_has_bias) != (qkv, o) or (t.mlp_bias and t.model_type != "llama"):
        problems.append(f"q/k/v bias {t.qkv_has_bias}, o bias {t.o_has_bias}, mlp bias {t.mlp_bias}")
    if t.sliding_window is not None and t.model_type == "llama":
        problems.append(f"sliding_window {t.sliding_window}")
    if problems:
        raise ValueError(f"text model_type {t.model_type!r} cannot express {'; '.join(problems)} in transformers")
    d = {
        "model_type": t.model_type,
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
        "hidden_act": t.hidden_act,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    if t.model_type == "llama":
        d.update(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias)
    elif t.model_type == "mistral":
        d.update(sliding_window=t.sliding_window)  # null: full attention (absent would mean 4096)
    else:  # qwen2: a window only with use_sliding_window, in the layers from max_window_layers on
        d.update(use_sliding_window=t.sliding_window is not None, sliding_window=t.sliding_window,
                 max_window_layers=0 if t.sliding_window is not None else t.num_layers)
    return d


def llava_config_to_hf(cfg: LlavaConfig) -> dict:
    """Our config as a HF `LlavaConfig` dict (for export); only `mlp2x_gelu` has a HF equivalent."""
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"projector {cfg.projector_type!r} has no transformers equivalent (only mlp2x_gelu)")
    v, t = cfg.vision, cfg.text
    text = text_config_to_hf(t)
    vision = vision_config_to_hf(v)
    out = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.geometry.tile_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if cfg.is_anyres:
        g = cfg.geometry
        family = ("LlavaOnevision", "llava_onevision") if g.max_tiles or g.untiled_multi else \
            ("LlavaNextVideo", "llava_next_video") if g.video == "average" else ("LlavaNext", "llava_next")
        if g.video == "bilinear" and family[1] != "llava_onevision":
            raise ValueError("bilinear video pooling without anyres_max has no transformers class")
        out.update(architectures=[f"{family[0]}ForConditionalGeneration"], model_type=family[1],
                   **anyres_lib.to_hf_fields(g))
        if g.video:
            out["video_token_index"] = cfg.video_token_index
    return out


# Presets for the shapes users ask for by name.
CLIP_VIT_L14_224 = VisionConfig(image_size=224)
CLIP_VIT_L14_336 = VisionConfig(image_size=336)
# google/siglip-so400m-patch14-384 as LLaVA-OneVision runs it: 26 of its 27 layers (the original deletes the
# last, transformers' LlavaOnevisionConfig keeps 26 and reads layer -1), no pooling head.
SIGLIP_SO400M_384 = VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, image_size=384,
                                 patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                 model_type="siglip_vision_model")
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
LLAVA_15_7B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_7B)
LLAVA_15_13B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_13B)
LLAVA_V1_7B = LlavaConfig(vision=CLIP_VIT_L14_224, text=VICUNA_7B, projector_type="linear", vision_feature_layer=-2)
# LLaVA-NeXT (v1.6): the 1.5 tower and projector, anyres tiling with the v1.6 pinpoints
# (`AnyresConfig()`'s defaults: 336-px tiles, a 24 x 24 grid, spatial_unpad, image_newline). Numbers from
# the llava-hf `*-hf` checkpoints' config.json (text_config) and ../shared/LLAVA_REFERENCE.md (LLaVA-NeXT).
# Yi and Llama-3 are the Llama layout (`model_type` "llama"); the v1.6 Mistral config has `sliding_window`
# null (full causal attention), so its preset sets none.
NEXT_ANYRES = anyres_lib.AnyresConfig()
# llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2 (rope_theta 1e6, 8 KV heads, intermediate
# 14336, max_position_embeddings 32768), vocab 32064 with <image> = 32000.
MISTRAL_7B_V02 = TextConfig(intermediate_size=14336, num_kv_heads=8, rope_theta=1e6, max_position_embeddings=32768,
                            model_type="mistral")
# llava-hf/llava-v1.6-34b-hf: Nous-Hermes-2-Yi-34B (Llama layout): hidden 7168, 60 layers, 56 / 8 heads,
# intermediate 20480, rope_theta 5e6, vocab 64064 with <image> = 64000, bos 1, eos 7 (<|im_end|>).
YI_34B = TextConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
                    num_kv_heads=8, rope_theta=5e6, eos_token_id=7)
# llava-hf/llama3-llava-next-8b-hf: Meta-Llama-3-8B-Instruct, rope_theta 5e5, 8 KV heads, intermediate 14336,
# max_position_embeddings 8192, vocab 128320 (128256 + <image> + padding to a multiple of 64), <image> = 128256,
# bos 128000, eos 128009 (<|eot_id|>).
LLAMA3_8B = TextConfig(vocab_size=128320, intermediate_size=14336, num_kv_heads=8, rope_theta=5e5,
                       max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128009)
LLAVA_NEXT_MISTRAL_7B = LlavaConfig(vision=CLIP_VIT_L14_336, text=MISTRAL_7B_V02, anyres=NEXT_ANYRES)
LLAVA_NEXT_VICUNA_7B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_7B, anyres=NEXT_ANYRES)
LLAVA_NEXT_VICUNA_13B = LlavaConfig(vision=CLIP_VIT_L14_336, text=VICUNA_13B, anyres=NEXT_ANYRES)
LLAVA_NEXT_34B = LlavaConfig(vision=CLIP_VIT_L14_336, text=YI_34B, image_token_index=64000, anyres=NEXT_ANYRES)
LLAVA_NEXT_LLAMA3_8B = LlavaConfig(vision=CLIP_VIT_L14_336, text=LLAMA3_8B, image_token_index=128256,
                                   anyres=NEXT_ANYRES)
# LLaVA-OneVision (llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf): SigLIP-SO400M (26 layers, layer -1, all 729
# tokens), Qwen2 (q/k/v bias, rope_theta 1e6, no BOS, eos 151645 <|im_end|>), pinpoints (1x1)..(6x6) x 384 with
# anyres_max_9, untiled multi-image, bilinear video pooling; <image> = 151646, <video> = 151647.
ONEVISION_ANYRES = anyres_lib.AnyresConfig(
    tile_size=384, grid=27, pinpoints=anyres_lib.parse_pinpoints("(1x1),...,(6x6)", 384), max_tiles=9,
    untiled_multi=True, video="bilinear")
QWEN2_7B = TextConfig(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                      bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, model_type="qwen2",
                      qkv_bias=True)
QWEN2_05B = dataclasses.replace(QWEN2_7B, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
_ONEVISION = dict(vision=SIGLIP_SO400M_384, vision_feature_layer=-1, vision_feature_select_strategy="full",
                  image_token_index=151646, video_token_index=151647, anyres=ONEVISION_ANYRES)
LLAVA_ONEVISION_7B = LlavaConfig(text=QWEN2_7B, **_ONEVISION)
LLAVA_ONEVISION_05B = LlavaConfig(text=QWEN2_05B, **_ONEVISION)
# By name, for configs that need an architecture without a checkpoint (compile-only, benchmarks).
# "llava-next-7b" is LLaVA-NeXT-7B as issue 20 names it: the Mistral checkpoint.
PRESETS = {
    "llava-1.5-7b": LLAVA_15_7B, "llava-1.5-13b": LLAVA_15_13B, "llava-v1-7b": LLAVA_V1_7B,
    "llava-next-7b": LLAVA_NEXT_MISTRAL_7B, "llava-v1.6-mistral-7b": LLAVA_NEXT_MISTRAL_7B,
    "llava-v1.6-vicuna-7b": LLAVA_NEXT_VICUNA_7B, "llava-v1.6-vicuna-13b": LLAVA_NEXT_VICUNA_13B,
    "llava-v1.6-34b": LLAVA_NEXT_34B, "llama3-llava-next-8b": LLAVA_NEXT_LLAMA3_8B,
    "llava-onevision-qwen2-7b": LLAVA_ONEVISION_7B, "llava-onevision-qwen2-0.5b": LLAVA_ONEVISION_05B,
}


# ---------------------------------------------------------------------------------------------
# Image processor settings (the preprocessing itself is data/image.py)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP's processors, and LLaVA-OneVision's

PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 may nest each processor's settings here
# LlavaOnevisionImageProcessor's default `image_grid_pinpoints` (every (1..6)x(1..6) multiple of 384).
ONEVISION_PINPOINTS = "(1x1),...,(6x6)"
ONEVISION_TILE = 384
# PIL's enum value for bicubic (also what HF stores as "resample": 3).
BICUBIC = 3  # == int(PIL.Image.Resampling.BICUBIC); a literal so that config.py needs no PIL



@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the CLIP/LLaVA image processor, and of LLaVA-NeXT's anyres tiling.

    Attributes:
      size: target length of the shortest side after resizing (HF `size["shortest_edge"]`).
      crop_size: side of the square centre crop (HF `crop_size["height"]`); with anyres, the tile side.
      mean, std: per-channel normalisation, RGB order.
      pad_to_square: LLaVA-1.5 `image_aspect_ratio = "pad"` (HF Llava `do_pad`): pad the image to
        a square with the mean colour before resizing, so nothing is cropped away.
      rescale_factor: multiplies the uint8 pixel values before normalisation.
      resample: PIL resampling filter for the resize (bicubic for CLIP).
      grid_pinpoints: LLaVA-NeXT anyres (`image_grid_pinpoints`): the candidate resolutions in pixels, as the
        checkpoint writes them; an image becomes a base view plus `crop_size` tiles of the best one
        (data/image.py). Empty: LLaVA-1.5's one crop.
      pinpoint_convention: how `grid_pinpoints` pairs read: "transformers" (height, width), llava-hf's
        LlavaNextImageProcessor; "original" (width, height), LLaVA-NeXT's config.json (`llava_jax.anyres.AnyresConfig`).
      onevision: LlavaOnevisionImageProcessor's rules (`processor_type`): tiles as LLaVA-NeXT's when a prompt row
        has one image; each image of a row with several is padded to a square (background `background_color`)
        and resized to one tile, untiled (data/image.py). Needs grid pinpoints and size == crop_size (its
        tile is `size`, resized to exactly size x size: no separate crop).
    """

    size: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    pinpoint_convention: str = "transformers"
    onevision: bool = False

    def __post_init__(self):
        # Lists (e.g. from JSON) would make the frozen dataclass unhashable.
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        object.__setattr__(self, "grid_pinpoints", tuple((int(a), int(b)) for a, b in self.grid_pinpoints))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got mean={self.mean}, std={self.std}")
        if self.size <= 0 or self.crop_size <= 0:
            raise ValueError(f"size and crop_size must be positive; got {self.size}, {self.crop_size}")
        if self.pinpoint_convention not in anyres_lib.CONVENTIONS:
            raise ValueError(f"pinpoint_convention {self.pinpoint_convention!r} is not one of {anyres_lib.CONVENTIONS}")
        if self.grid_pinpoints and self.pad_to_square:
            raise ValueError("pad_to_square (LLaVA-1.5's 'pad') and grid_pinpoints (LLaVA-NeXT's anyres) "
                             "exclude each other")
        if self.onevision and (not self.grid_pinpoints or self.size != self.crop_size):
            raise ValueError(f"LlavaOnevisionImageProcessor settings need grid pinpoints and size == crop_size "
                             f"(its tile); got {len(self.grid_pinpoints)} pinpoints, size {self.size}, "
                             f"crop_size {self.crop_size}")
        self.anyres_config(grid=1)  # the pinpoints must be multiples of the tile: AnyresConfig says so

    @property
    def processor_type(self) -> str:
        """The transformers image processor these settings reproduce (its `image_processor_type`, PIL path)."""
        if self.onevision:
            return "LlavaOnevisionImageProcessor"
        if self.grid_pinpoints:
            return "LlavaNextImageProcessor"
        return "LlavaImageProcessor" if self.pad_to_square else "CLIPImageProcessor"

    @property
    def is_anyres(self) -> bool:
        """Whether images are cut into a base and tiles (LLaVA-NeXT) rather than one crop (LLaVA-1.5)."""
        return bool(self.grid_pinpoints)

    def anyres_config(self, grid: int, extra_tokens: int = 0) -> anyres_lib.AnyresConfig:
        """The image geometry of these settings with the tower's feature `grid` a tile side (24 for CLIP-336).

        LLaVA-1.5 settings give the flat one-tile geometry. Which patches an image becomes does not depend
        on `grid`; its token count does.
        """
        if not self.grid_pinpoints:
            return anyres_lib.AnyresConfig.flat(self.crop_size, grid, extra_tokens)
        return anyres_lib.AnyresConfig(tile_size=self.crop_size, grid=grid, pinpoints=self.grid_pinpoints,
                                   convention=self.pinpoint_convention, extra_tokens=extra_tokens)

    @property
    def background_color(self) -> tuple[int, int, int]:
        """Pad colour: `int(255 * mean)` per channel, (122, 116, 104) for CLIP, as LLaVA and HF use."""
        return tuple(int(x * 255) for x in self.mean)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of this config (our own field names)."""
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std),
                                           "grid_pinpoints": [list(p) for p in self.grid_pinpoints]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """Inverse of `to_dict`; unknown keys are an error (they are probably typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown ImageProcessorConfig keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as an HF `preprocessor_config.json` dict (CLIP keys plus Llava's `do_pad`; `processor_type`).

        Anyres settings become a LlavaNextImageProcessor: its pinpoints are (height, width), so original
        (width, height) pinpoints are written swapped, in their order: every image gets the same patches.
        """
        common = {
            # CLIPImageProcessor reads every key below; LlavaImageProcessor also reads do_pad.
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.grid_pinpoints:
            # LlavaNext's do_pad pads the patch axis of a batch with zero patches (its default), not the image.
            resolutions = self.anyres_config(grid=1).resolutions()
            if self.onevision:
                # OneVision resizes every patch to exactly size x size and crops nothing.
                common = {k: v for k, v in common.items() if k not in ("crop_size", "do_center_crop")}
                common["size"] = {"height": self.size, "width": self.size}
            return {"image_processor_type": self.processor_type, **common, "do_pad": True,
                    "image_grid_pinpoints": [list(r) for r in resolutions]}
        return {"image_processor_type": self.processor_type, **common, "do_pad": self.pad_to_square}

    def save(self, directory: str) -> str:
        """Writes `directory/preprocessor_config.json` in HF format; returns the file path."""
        paths.makedirs(directory)
        path = os.path.join(directory, PREPROCESSOR_CONFIG)
        paths.write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str, image_aspect_ratio: str | None = None) -> "ImageProcessorConfig":
        """Reads the processor settings of a checkpoint directory.

        Sources, in order:
        1. `preprocessor_config.json` (HF CLIP / Llava / LlavaNext image processor JSON: size, crop_size,
           image_mean, image_std, rescale_factor, resample, do_pad, image_grid_pinpoints). A LlavaNext one
           (its type, or pinpoints) tiles, pinpoints read as (height, width). If it has neither and the
           directory's `config.json` is an original-LLaVA one with `image_aspect_ratio`, that decides:
           "anyres" tiles by its pinpoints (original convention), else, when the JSON has no `do_pad`,
           the padding, as in the original (CLIP processor + the model's aspect-ratio flag).
        2. Otherwise an original-LLaVA `config.json`: `image_aspect_ratio` ("pad" pads, "anyres" tiles by
           `image_grid_pinpoints` read as (width, height) with `mm_patch_merge_type` "spatial_unpad",
           "anyres_max_N" (LLaVA-OneVision) tiles likewise and pads each image of a multi-image sample to a
           square untiled (`onevision`, as the original's train.py overrides to "pad" there), anything else
           neither) and the image size from `mm_vision_tower` (a name ending in -336 or -384: that many px,
           else 224 px), CLIP mean/std, SigLIP's (0.5) for a SigLIP tower.
        `image_aspect_ratio` ("pad" | "square"), when given, overrides the padding choice of LLaVA-1.5
        settings. Note that llava-hf/llava-1.5-*-hf ships a CLIPImageProcessor without do_pad (centre
        crop) although the original LLaVA-1.5 pads: pass image_aspect_ratio="pad" to evaluate as the
        original did.

        Raises FileNotFoundError naming the directory when neither file exists, and ValueError naming the
        file and key of a value that cannot be used.
        """
        hf_path = os.path.join(directory, PREPROCESSOR_CONFIG)
        llava_path = os.path.join(directory, "config.json")
        llava = _read_json(llava_path) if paths.isfile(llava_path) else None
        if paths.isfile(hf_path):
            hf = _read_json(hf_path)
            cfg = _from_hf_json(hf, hf_path)
            if not cfg.grid_pinpoints and llava is not None and _is_anyres_max(llava):
                cfg = _original_onevision(llava, llava_path, cfg)
            elif not cfg.grid_pinpoints and llava is not None and "image_aspect_ratio" in llava:
                pinpoints = original_grid_pinpoints(llava, llava_path, cfg.size)
                if pinpoints:
                    cfg = _validated(llava_path, "image_grid_pinpoints", dataclasses.replace, cfg,
                                     pad_to_square=False, grid_pinpoints=pinpoints, pinpoint_convention="original")
                elif "do_pad" not in hf:
                    cfg = dataclasses.replace(cfg, pad_to_square=_aspect_ratio_pads(llava["image_aspect_ratio"]))
        elif llava is not None:
            cfg = _from_llava_config(llava, llava_path)
        else:
            raise FileNotFoundError(
                f"No image processor settings in {directory!r}: expected {PREPROCESSOR_CONFIG} "
                "(HF CLIP/Llava image processor) or config.json (original LLaVA, with mm_vision_tower)."
            )
        return cfg.with_aspect_ratio(image_aspect_ratio)

    def with_aspect_ratio(self, image_aspect_ratio: str | None) -> "ImageProcessorConfig":
        """These settings with the padding `image_aspect_ratio` ("pad" | "square") asks for; None keeps them.

        Only LLaVA-1.5 settings have that choice: anyres settings refuse it (a NeXT model is fed tiles).
        """
        if image_aspect_ratio is None:
            return self
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square'; got {image_aspect_ratio!r}")
        if self.grid_pinpoints:
            raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r} is LLaVA-1.5's padding choice; these "
                             f"settings tile images (anyres, grid pinpoints {list(self.grid_pinpoints)})")
        return dataclasses.replace(self, pad_to_square=_aspect_ratio_pads(image_aspect_ratio))


VIDEO_PROCESSOR_TYPES = ("LlavaNextVideoVideoProcessor", "LlavaOnevisionVideoProcessor")
# Which video processor a transformers model type uses when its directory names none (AutoVideoProcessor).
_VIDEO_PROCESSOR_OF_MODEL = {"llava_next_video": "LlavaNextVideoVideoProcessor",
                             "llava_onevision": "LlavaOnevisionVideoProcessor"}


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig:
    """Settings of transformers' LLaVA video processors: the steps each sampled frame goes through (data/video.py).

    Defaults are `LlavaNextVideoVideoProcessor`'s; `onevision()` gives `LlavaOnevisionVideoProcessor`'s.

    Attributes:
      processor_type: the transformers class these settings come from (VIDEO_PROCESSOR_TYPES).
      size: pixels the frame is resized to: the shortest side (HF `size["shortest_edge"]`, NeXT-Video), or
        both sides when `resize_to_square` (HF `size` {"height": s, "width": s}, OneVision: aspect not kept).
      resize_to_square: see `size`.
      crop_size: side of the centre crop after the resize (NeXT-Video 224); 0: no crop (OneVision).
      mean, std, rescale_factor, resample: as in ImageProcessorConfig.
      num_frames: frames sampled from a video when the caller does not say (NeXT-Video's demo: 32).
    """

    processor_type: str = "LlavaNextVideoVideoProcessor"
    size: int = 224
    resize_to_square: bool = False
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    num_frames: int = 32

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.processor_type not in VIDEO_PROCESSOR_TYPES:
            raise ValueError(f"video processor {self.processor_type!r} is not one of {VIDEO_PROCESSOR_TYPES}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got mean={self.mean}, std={self.std}")
        if self.size <= 0 or self.crop_size < 0 or self.num_frames <= 0:
            raise ValueError(f"size and num_frames must be positive and crop_size not negative; got size {self.size}, "
                             f"crop_size {self.crop_size}, num_frames {self.num_frames}")

    @classmethod
    def onevision(cls, **overrides: Any) -> "VideoProcessorConfig":
        """`LlavaOnevisionVideoProcessor()`'s defaults (384 x 384, no crop, CLIP mean/std), with `overrides`."""
        fields = dict(processor_type="LlavaOnevisionVideoProcessor", size=ONEVISION_TILE, resize_to_square=True,
                      crop_size=0)
        return cls(**(fields | overrides))

    @classmethod
    def from_image_processor(cls, image: "ImageProcessorConfig", pooling: str,
                             num_frames: int = 0) -> "VideoProcessorConfig":
        """The frames' settings a model's image processor implies (the originals' video demos run it on every
        frame): OneVision's for `bilinear` pooling (resized to a tile, no crop), else NeXT-Video's (shortest side
        to the image's size, centre crop), normalised as the images are; `num_frames` (0: the default)."""
        norm = dict(mean=image.mean, std=image.std, rescale_factor=image.rescale_factor, resample=image.resample)
        if num_frames:
            norm["num_frames"] = num_frames
        if pooling == "bilinear":
            return cls.onevision(size=image.crop_size, **norm)
        return cls(size=image.size, crop_size=image.crop_size, **norm)

    @property
    def frame_size(self) -> int:
        """Side of a processed frame: the crop, or the square resize."""
        return self.crop_size or self.size

    def to_hf_dict(self) -> dict[str, Any]:
        """The settings as an HF `video_preprocessor_config.json` dict, which the processor class reads back."""
        size = {"height": self.size, "width": self.size} if self.resize_to_square else {"shortest_edge": self.size}
        crop = {"do_center_crop": True, "crop_size": {"height": self.crop_size, "width": self.crop_size}} \
            if self.crop_size else {"do_center_crop": False}
        return {"video_processor_type": self.processor_type, "do_convert_rgb": True, "do_resize": True, "size": size,
                "resample": self.resample, **crop, "do_rescale": True, "rescale_factor": self.rescale_factor,
                "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                "num_frames": self.num_frames}

    def save(self, directory: str) -> str:
        """Writes `directory/video_preprocessor_config.json` in HF format; returns the file path."""
        paths.makedirs(directory)
        path = os.path.join(directory, VIDEO_PREPROCESSOR_CONFIG)
        paths.write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], processor_type: str | None = None,
                     path: str = VIDEO_PREPROCESSOR_CONFIG) -> "VideoProcessorConfig":
        """Settings from an HF video (or image) processor dict; keys absent take the processor class's defaults.

        `processor_type` (else the dict's `video_processor_type`) names the class. Raises ValueError naming `path`
        and the key of a value these settings cannot reproduce.
        """
        kind = str(processor_type or d.get("video_processor_type") or "")
        kind = kind.removesuffix("Fast")
        if kind not in VIDEO_PROCESSOR_TYPES:
            raise ValueError(f"{path}: video_processor_type {kind or None!r} is not supported; expected one of "
                             f"{VIDEO_PROCESSOR_TYPES}")
        base = cls.onevision() if kind == "LlavaOnevisionVideoProcessor" else cls()
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is False:
                raise ValueError(f"{path}: {key}: false is not supported (the {kind} steps are all taken)")
        fields: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if isinstance(size, dict) and "shortest_edge" in size:
                fields.update(size=int(size["shortest_edge"]), resize_to_square=False)
            else:
                fields.update(size=_edge(size, ("height",), "size", path), resize_to_square=True)
        do_crop = d.get("do_center_crop")
        if do_crop is None:  # the class default: NeXT-Video crops, OneVision does not
            do_crop = bool(base.crop_size)
        crop = d.get("crop_size")
        crop = (_edge(crop, ("height",), "crop_size", path) if crop is not None else base.crop_size or base.size)
        fields["crop_size"] = crop if do_crop else 0
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std"), ("rescale_factor", "rescale_factor"),
                             ("resample", "resample"), ("num_frames", "num_frames")):
            if d.get(theirs) is not None:
                fields[ours] = d[theirs]
        return _validated(path, None, dataclasses.replace, base, **fields)

    @classmethod
    def from_pretrained(cls, directory: str) -> "VideoProcessorConfig":
        """The video processor settings of a checkpoint directory, found where transformers' AutoVideoProcessor looks.

        In order: `processor_config.json`'s nested "video_processor", `video_preprocessor_config.json`, then the
        image processor's `preprocessor_config.json` (llava-hf directories saved before video processors had their
        own file). The class is the file's `video_processor_type`, else the one `config.json`'s model_type uses
        (llava_next_video, llava_onevision). Raises FileNotFoundError naming the directory when none exists.
        """
        nested = os.path.join(directory, PROCESSOR_CONFIG)
        found = None
        if paths.isfile(nested):
            d = _read_json(nested)
            if isinstance(d.get("video_processor"), dict):
                found = (d["video_processor"], nested)
        for name in (VIDEO_PREPROCESSOR_CONFIG, PREPROCESSOR_CONFIG):
            path = os.path.join(directory, name)
            if found is None and paths.isfile(path):
                found = (_read_json(path), path)
        if found is None:
            raise FileNotFoundError(f"No video processor settings in {directory!r}: expected "
                                    f"{VIDEO_PREPROCESSOR_CONFIG} or {PREPROCESSOR_CONFIG}")
        d, path = found
        kind = d.get("video_processor_type")
        model_path = os.path.join(directory, "config.json")
        if not kind and paths.isfile(model_path):
            kind = _VIDEO_PROCESSOR_OF_MODEL.get(_read_json(model_path).get("model_type"))
        return cls.from_hf_dict(d, kind, path)


def _read_json(path: str) -> dict[str, Any]:
    with paths.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _validated(path: str, key: str | None, make, *args, **kwargs):
    """`make(*args, **kwargs)`, its ValueError as one line naming the file (and the key the value came from)."""
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {key}: {e}" if key else f"{path}: {e}") from None


def _aspect_ratio_pads(image_aspect_ratio: str | None) -> bool:
    # Original LLaVA: only "pad" pads; "square", None or anything else goes straight to the processor
    # (anyres is read by original_grid_pinpoints before this is asked).
    return image_aspect_ratio == "pad"


def original_max_tiles(d: dict[str, Any]) -> int | None:
    """N of an original config's `image_aspect_ratio: anyres_max_N` (LLaVA-OneVision), else None."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(d.get("image_aspect_ratio")))
    return int(match.group(1)) if match else None


def original_grid_pinpoints(d: dict[str, Any], path: str, tile_size: int) -> tuple[tuple[int, int], ...]:
    """The grid pinpoints an original LLaVA-NeXT config.json tiles by (as written: (width, height)); () if none.

    The original's string form "(1x1),...,(3x3)" counts tiles of the processor's `size` (its train.py).
    """
    aspect = d.get("image_aspect_ratio")
    if not (isinstance(aspect, str) and aspect.startswith("anyres")):
        return ()
    if aspect != "anyres" and original_max_tiles(d) is None:
        raise ValueError(f"{path}: image_aspect_ratio {aspect!r} is not supported; expected 'anyres', "
                         f"'anyres_max_N' (LLaVA-OneVision's), 'pad' or 'square'")
    merge = d.get("mm_patch_merge_type", "flat")  # the original's default when the key is absent
    if merge != "spatial_unpad":
        raise ValueError(f"{path}: mm_patch_merge_type {merge!r} with image_aspect_ratio 'anyres' is not "
                         f"supported; expected 'spatial_unpad' (LLaVA-NeXT's)")
    if not d.get("image_grid_pinpoints"):
        raise ValueError(f"{path}: image_aspect_ratio 'anyres' needs image_grid_pinpoints, found "
                         f"{d.get('image_grid_pinpoints')!r}")
    return _validated(path, "image_grid_pinpoints", anyres_lib.parse_pinpoints, d["image_grid_pinpoints"], tile_size)


def _edge(value: Any, keys: Sequence[str], what: str, path_hint: str) -> int:
    """HF stores sizes as an int or a dict ({"shortest_edge": N} / {"height": H, "width": W})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in keys:
            if k in value:
                if k == "height" and value.get("width", value[k]) != value[k]:
                    raise ValueError(f"{path_hint}: non-square {what} {value} is not supported")
                return int(value[k])
    raise ValueError(f"{path_hint}: cannot read {what} from {value!r}; expected an int or a dict with {keys}")


def _from_hf_json(d: dict[str, Any], path: str = PREPROCESSOR_CONFIG) -> ImageProcessorConfig:
    defaults = ImageProcessorConfig()
    size = _edge(d.get("size", defaults.size), ("shortest_edge", "height"), "size", path)
    crop = _edge(d.get("crop_size", size), ("height",), "crop_size", path)
    kind = str(d.get("image_processor_type", ""))
    onevision = kind.startswith("LlavaOnevision")
    pinpoints = d.get("image_grid_pinpoints")
    if pinpoints is not None and kind and not (kind.startswith("LlavaNext") or onevision):
        raise ValueError(f"{path}: image_processor_type {kind!r} with image_grid_pinpoints is not supported "
                         f"(expected LlavaNextImageProcessor or LlavaOnevisionImageProcessor)")
    if onevision and "crop_size" in d and crop != size:
        # Its patches would be cut at crop_size and resized to size: no checkpoint does that.
        raise ValueError(f"{path}: crop_size: a {kind} with crop_size {crop} other than its size {size} "
                         f"is not supported")
    if onevision:
        crop = size  # OneVision's tile is its size: every patch is resized to size x size, nothing cropped
    if kind.startswith("LlavaNext") or onevision:
        # The processors' default pinpoints when the key is absent: the v1.6 list; OneVision's 6x6 multiples.
        default = anyres_lib.parse_pinpoints(ONEVISION_PINPOINTS, ONEVISION_TILE) if onevision else \
            anyres_lib.V16_PINPOINTS
        pinpoints = default if pinpoints is None else pinpoints
        pinpoints = _validated(path, "image_grid_pinpoints", anyres_lib.parse_pinpoints, pinpoints, crop)
        if not pinpoints:
            raise ValueError(f"{path}: image_grid_pinpoints of a {kind} must name at least one resolution")
    fields = dict(
        size=size,
        crop_size=crop,
        mean=tuple(d.get("image_mean", CLIP_MEAN)),
        std=tuple(d.get("image_std", CLIP_STD)),
        # LlavaNext's do_pad pads the patch axis of a batch, not the image: anyres never pads to a square.
        pad_to_square=bool(d.get("do_pad", False)) and not pinpoints,
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        resample=int(d.get("resample", BICUBIC)),
        grid_pinpoints=pinpoints or (),
        onevision=onevision,
    )
    return _validated(path, "image_grid_pinpoints" if pinpoints else None, ImageProcessorConfig, **fields)


def _from_llava_config(d: dict[str, Any], path: str) -> ImageProcessorConfig:
    tower = d.get("mm_vision_tower") or d.get("vision_tower") or ""
    if not tower:
        raise ValueError(f"{path} has no mm_vision_tower: not an original LLaVA config, and no {PREPROCESSOR_CONFIG}")
    # openai/clip-vit-large-patch14-336 -> 336 px, google/siglip-so400m-patch14-384 -> 384; plain ViT-L/14: 224.
    name = str(tower).rstrip("/")
    size = int(name[-3:]) if re.search(r"-(336|384)$", name) else 224
    norm = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD) if "siglip" in name.lower() else {}
    if _is_anyres_max(d):
        return _original_onevision(d, path, ImageProcessorConfig(size=size, crop_size=size, pad_to_square=False, **norm))
    pinpoints = original_grid_pinpoints(d, path, size)
    if pinpoints:
        return _validated(path, "image_grid_pinpoints", ImageProcessorConfig, size=size, crop_size=size,
                          pad_to_square=False, grid_pinpoints=pinpoints, pinpoint_convention="original", **norm)
    return ImageProcessorConfig(
        size=size, crop_size=size, pad_to_square=_aspect_ratio_pads(d.get("image_aspect_ratio")), **norm
    )


def _is_anyres_max(d: dict[str, Any]) -> bool:
    """Whether an original config.json asks for LLaVA-OneVision's anyres ("anyres_max_9": tiles, then the model
    downscales the feature grid past 9 tiles' worth)."""
    return bool(re.fullmatch(r"anyres_max_\d+", str(d.get("image_aspect_ratio", ""))))


def _original_onevision(d: dict[str, Any], path: str, base: ImageProcessorConfig) -> ImageProcessorConfig:
    """`base` (the tower's size, mean, std) with an original OneVision config.json's tiling.

    The original (LLaVA-NeXT's mm_utils.process_anyres_image) tiles as LLaVA-NeXT does, its pinpoints read as
    (width, height) and "(1x1),...,(6x6)" counting tiles of the processor's size; its train.py processes each
    image of a multi-image sample with "pad" instead (expand2square, then the tower's processor), which is what
    `onevision` settings do with an image that is not alone in its row.
    """
    merge = d.get("mm_patch_merge_type", "flat")
    if not str(merge).startswith("spatial_unpad"):
        raise ValueError(f"{path}: mm_patch_merge_type {merge!r} with image_aspect_ratio "
                         f"{d['image_aspect_ratio']!r} is not supported; expected 'spatial_unpad'")
    if not d.get("image_grid_pinpoints"):
        raise ValueError(f"{path}: image_aspect_ratio {d['image_aspect_ratio']!r} needs image_grid_pinpoints, "
                         f"found {d.get('image_grid_pinpoints')!r}")
    pinpoints = _validated(path, "image_grid_pinpoints", anyres_lib.parse_pinpoints, d["image_grid_pinpoints"],
                           base.size)
    return _validated(path, "image_grid_pinpoints", dataclasses.replace, base, crop_size=base.size,
                      pad_to_square=False, grid_pinpoints=pinpoints, pinpoint_convention="original", onevision=True)
