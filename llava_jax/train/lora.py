"""LoRA stages: the adapter a stage's `lora` field asks for, its start, and what the stage writes.

A LoRA stage trains the adapters (at the stage's learning rate) and the parameters its `trainable`
patterns name (the projector in LLaVA's recipe, at `lora.non_lora_learning_rate`); the base stays
frozen in the compute dtype with no optimizer state. Its model directory is the base with the
trained projector, as every stage writes, plus `adapter/` in PEFT's layout (weights/peft.py).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import flax.traverse_util as tu
import jax

from llava_jax.config import LlavaConfig
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import abstract_params, init_params

# Trainable-path patterns of the adapters themselves.
ADAPTER_PATTERNS = (f".*/{lora_lib.LORA_A}", f".*/{lora_lib.LORA_B}")
_DECODER_KERNEL = re.compile(r"language_model/layers(?:_(\d+))?/(\w+/\w+)/kernel")


def resolve_spec(stage_lora, cfg: LlavaConfig) -> lora_lib.LoraSpec:
    """A stage's `lora` settings as a `LoraSpec`: its target patterns (over our parameter paths) resolved
    to the decoder layers' Linear layers; an error names a pattern that matches anything else, or
    matches a Linear layer in only some layers (every layer carries the same adapters)."""
    patterns = [re.compile(p) for p in stage_lora.targets]
    shapes = abstract_params(cfg.replace(lora=None))
    found: dict[str, set[int]] = {}
    for path in tu.flatten_dict(shapes):
        name = "/".join(path)
        if not any(p.fullmatch(name) for p in patterns):
            continue
        m = _DECODER_KERNEL.fullmatch(name)
        if m is None or m.group(2) not in lora_lib.DECODER_LINEARS:
            raise ValueError(f"LoRA target patterns {list(stage_lora.targets)} match {name}; LoRA goes only on the "
                             f"kernels of the decoder layers' Linear layers ({', '.join(lora_lib.DECODER_LINEARS)})")
        found.setdefault(m.group(2), set()).add(int(m.group(1) or -1))
    if not found:
        raise ValueError(f"LoRA target patterns {list(stage_lora.targets)} match no decoder-layer kernel")
    for module, layers in found.items():
        if -1 not in layers and len(layers) != cfg.text.num_layers:
            raise ValueError(f"LoRA target patterns match {module} in layers {sorted(layers)} only; every layer "
                             f"carries the same adapters")
    return lora_lib.LoraSpec(rank=int(stage_lora.rank), alpha=float(stage_lora.alpha),
                             targets=tuple(t for t in lora_lib.DECODER_LINEARS if t in found),
                             dropout=float(stage_lora.dropout))


def init_adapter(cfg: LlavaConfig, key: jax.Array, shardings: Any) -> dict:
    """Fresh adapters for `cfg.lora` (A as peft draws it, B zero), created directly in their shardings.

    Only the adapter leaves leave the jitted init; the rest of the model's init is dead code to XLA.
    """
    def init(k):
        adapter, _ = lora_lib.split(nn.unbox(init_params(cfg, k)))  # each leaf has its own stream (llava.py)
        return adapter

    adapter_shardings, _ = lora_lib.split(shardings)
    return jax.jit(init, out_shardings=adapter_shardings)(key)


def merged(cfg: LlavaConfig, params: Any, shardings: Any) -> tuple[LlavaConfig, Any]:
    """(base config, parameters with `cfg.lora`'s adapters folded in), kept in `shardings` (base tree)."""
    out = jax.jit(lambda p: lora_lib.merge(p, cfg.lora), out_shardings=shardings)(params)
    return cfg.replace(lora=None), out


def merge_stage_adapter(source: str, cfg: LlavaConfig, params: Any, shardings: Any) -> tuple[LlavaConfig, Any]:
    """A stage's starting weights from a directory that may carry an adapter (a LoRA stage's output):
    the adapter is merged in, so that the next stage starts from what the LoRA stage trained."""
    from llava_jax.weights import peft

    adapter = peft.find_adapter(source)
    if adapter is None:
        return cfg, params
    return merged(*peft.apply_adapter(cfg, params, adapter), shardings)


def save_stage_adapter(model_dir: str, cfg: LlavaConfig, adapter: Any) -> str:
    """`model_dir/adapter/` in PEFT's layout from a stage's trained adapter leaves."""
    import os

    from llava_jax.weights import peft

    return peft.save_adapter(os.path.join(model_dir, peft.ADAPTER_DIR), cfg, jax.device_get(adapter))


def check_rank_splits(spec: lora_lib.LoraSpec, mesh, rules) -> None:
    """A clear error when the rules split the LoRA rank over more devices than it divides into."""
    axes = dict(rules).get("lora_rank")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = 1
    for a in axes:
        ways *= mesh.shape[a]
    if spec.rank % ways:
        raise ValueError(f"LoRA rank {spec.rank} does not split over the {ways} devices of mesh axes {axes} "
                         f"(the sharding rules map 'lora_rank' there): use a rank divisible by {ways}, or rules "
                         f"with ('lora_rank', None)")
