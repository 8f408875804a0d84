"""A tower's repeated layers: one `nn.scan` over stacked parameters, or the layers unrolled.

Scanned (the default, `LlavaConfig.scan_layers`), the layers are one module named `layers` whose
parameters carry a leading [num_layers] axis with the logical name `layers` (never sharded, see
`parallel/rules.py`): the compiler sees one layer body, so compile time does not grow with depth.
Unrolled, they are modules `layers_0 ... layers_{n-1}`, the per-layer names of the checkpoint
mapping (`weights/mapping.py` converts between the two layouts).

A layer is called as `layer(carry, *args) -> (carry, None)`: `carry` flows from layer to layer,
`args` are the same for every layer (broadcast). Both paths run the same layer code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from llava_jax.models.remat import maybe_remat

STACK_AXIS = "layers"  # the logical axis name of the stacked layer dimension, and the scanned module's name


def layer_stack(layer_cls: type[nn.Module], num_layers: int, *, scan: bool, remat: str, **fields) -> Any:
    """`num_layers` layers of `layer_cls(**fields)`, remat'd with the named policy; run them with `run_layers`.

    Returns the scanned module, or a tuple of modules when unrolled (or when there are no layers).
    Under scan, remat does not need to prevent common-subexpression elimination (the loop already
    keeps the recomputation in place), so `prevent_cse=False` as Flax and MaxText advise.
    """
    cls = maybe_remat(layer_cls, remat, prevent_cse=not scan)
    if not scan or num_layers == 0:
        return tuple(cls(name=f"{STACK_AXIS}_{i}", **fields) for i in range(num_layers))
    scanned = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # each layer its own draws (LoRA dropout, models/lora.py)
        in_axes=nn.broadcast,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: STACK_AXIS},
    )
    return scanned(name=STACK_AXIS, **fields)


def run_layers(layers: Any, carry: Any, *args) -> Any:
    """Apply the layers of `layer_stack` in order; returns the final carry."""
    if isinstance(layers, (tuple, list)):
        for layer in layers:
            carry, _ = layer(carry, *args)
        return carry
    carry, _ = layers(carry, *args)
    return carry
