"""Vision towers by name: the vision config's `model_type` picks the module (CLIP or SigLIP)."""

from __future__ import annotations

import flax.linen as nn

from llava_jax.config import LlavaConfig
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.siglip import SiglipVisionTower

VISION_TOWERS: dict[str, type[nn.Module]] = {
    "clip_vision_model": CLIPVisionTower,
    "siglip_vision_model": SiglipVisionTower,
}


def build_vision_tower(cfg: LlavaConfig, **kw) -> nn.Module:
    """The tower `cfg.vision.model_type` names, running the layers up to `cfg.vision_feature_layer`.

    `kw`: the module's compute settings (dtype, param_dtype, remat, scan_layers, name). Raises
    ValueError for strategy "default" on a tower without a class token: transformers would drop
    the first patch there, which no checkpoint does and no token count here allows for.
    """
    v = cfg.vision
    if not v.has_class_token and cfg.vision_feature_select_strategy in ("default", "patch"):
        raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} drops the class "
                         f"token, which a {v.model_type} tower does not have: use 'full'")
    return VISION_TOWERS[v.model_type](v, cfg.num_vision_layers_used, attention=cfg.attention, **kw)
