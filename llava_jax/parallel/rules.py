"""Logical axis names -> mesh axes: the one table that shards every parameter and activation.

Each parameter carries logical names (`embed`, `mlp`, `heads`, `vocab`, ...; see the models).
`DEFAULT_RULES` maps them to the mesh axes `data`, `fsdp`, `tensor`; a name with no rule is an
error, never a silent replication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax.sharding import Mesh

# jax and flax are imported where the functions below run: the table alone is what the training
# config (train/defaults.py) reads, so that a CLI can reject a bad flag without importing them.

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # Activations: the batch is split over data and fsdp; length and width stay whole.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # The stacked layer axis of scanned towers: each device holds its part of every layer.
    ("layers", None),
    # Language model: FSDP over the model width, tensor parallel over heads / MLP / vocab.
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    # LoRA A [in, r] / B [r, out] split like their kernel's in / out axes; B's out axis is often not
    # split over fsdp (heads, mlp), so its rank takes fsdp (A's rank stays whole: embed took fsdp first).
    ("lora_rank", "fsdp"),
    # Vision tower and projector.
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("proj_mlp", "tensor"),
)


def check_rules(boxed_params: Any, rules: Rules = DEFAULT_RULES) -> None:
    """Raise if a parameter is unannotated or uses a logical name the rules do not map."""
    import flax.linen as nn
    import jax

    known = {name for name, _ in rules}
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        if not isinstance(leaf, nn.Partitioned):
            bad.append(f"{where}: no logical axis names")
            continue
        unknown = [n for n in leaf.names if n is not None and n not in known]
        if unknown:
            bad.append(f"{where}: logical axes {unknown} have no sharding rule")
    if bad:
        raise ValueError(f"{len(bad)} parameters cannot be sharded by the rules table, e.g. " + "; ".join(bad[:4]))


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of boxed (abstract) parameters, after checking the rules cover it."""
    import flax.linen as nn

    check_rules(boxed_abstract, rules)
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
