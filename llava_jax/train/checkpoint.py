"""Training checkpoints: Orbax `CheckpointManager` with state, metadata and data-iterator state together.

A checkpoint holds the trained parameters and their optimizer state, the step, the stage, and
the Grain iterator position, so that a restarted run continues exactly where it stopped. Frozen
parameters are not repeated in every checkpoint: they come from the stage's initial weights.
Orbax writes each step to a temporary directory and renames it when complete, so a killed save
never looks like a checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from llava_jax import paths


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
        """The state, restored directly into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
