"""Training checkpoints: Orbax `CheckpointManager` with state, metadata and data-iterator state together.

A checkpoint holds the trained parameters and their optimizer state, the step, the stage, and
the Grain iterator position, so that a restarted run continues exactly where it stopped. Frozen
parameters are not repeated in every checkpoint: they come from the stage's initial weights.
Orbax writes each step to a temporary directory and renames it when complete, so a killed save
never looks like a checkpoint.

States are saved in the model's layout (scanned layers stacked). A checkpoint written before
layers were scanned (one `layers_{i}` subtree per layer) restores into a stacked state: it is read
in its own layout and stacked on the devices, one parameter at a time.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from llava_jax import paths
from llava_jax.weights import mapping


class Checkpointer:
    """Save and restore `{state, meta, data}` under `directory/<global step>`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.absolute(directory)  # local or gs:// (Orbax writes both)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, data_state: dict) -> None:
        """Start saving (asynchronously when enabled); returns once the device arrays are copied."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                data=ocp.args.JsonSave(data_state),
            ),
            force=True,
        )

    def restore_meta(self, step: int) -> tuple[dict, dict]:
        """(meta, data iterator state) of a checkpoint, without touching the arrays."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        return dict(out.meta), dict(out.data)

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The state, restored directly into the shardings of `abstract_state` (ShapeDtypeStructs),
        whichever layer layout the checkpoint was written in."""
        if _per_layer(self._stored_tree(step)) and not _per_layer(abstract_state):
            return _stack_into(self._restore(step, mapping.unstack_layers(abstract_state)), abstract_state)
        return self._restore(step, abstract_state)

    def _restore(self, step: int, abstract_state: Any) -> Any:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def _stored_tree(self, step: int) -> Any:
        meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)
        return getattr(meta, "tree", meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _per_layer(tree: Any) -> bool:
    """Whether a tree keeps layers one subtree each (`layers_0`, ...)."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return any(mapping.layer_index(tuple(str(getattr(k, "key", "")) for k in kp)) is not None for kp, _ in paths)


def _stack_into(per_layer: Any, target: Any) -> Any:
    """A restored per-layer tree in the layout and shardings of `target`; each stacked array is made
    from its rows, which are dropped at once (the whole tree is never held twice)."""
    rows = dict(jax.tree_util.tree_flatten_with_path(per_layer)[0])
    del per_layer
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for kp, t in flat:
        names = tuple(str(getattr(k, "key", "")) for k in kp)
        if mapping.is_stacked_path(names):
            parts = [rows.pop(_row_keypath(kp, i)) for i in range(t.shape[0])]
            out.append(mapping.stack(parts) if t.sharding is None else mapping.stack_rows(parts, t.sharding))
            del parts
        else:
            out.append(rows.pop(kp))
    return jax.tree_util.tree_unflatten(treedef, out)


def _row_keypath(kp: tuple, layer: int) -> tuple:
    stack = jax.tree_util.DictKey(mapping.STACK_AXIS)
    return tuple(jax.tree_util.DictKey(f"{mapping.STACK_AXIS}_{layer}") if k == stack else k for k in kp)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
