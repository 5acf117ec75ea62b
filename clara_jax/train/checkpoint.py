"""Orbax checkpoints of a training run: train state (without the frozen base) + data iterator.

Saved under `{workdir}/checkpoints/{step}` by an `ocp.CheckpointManager`: asynchronous, the
last `keep` kept, and atomic (Orbax writes into a temporary directory and renames it when the
save is complete, so a crash mid-save never leaves a step that restores as complete). The
frozen base is not saved again: it comes from the run's `init_from` on resume.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax.train.step import TrainState


def _saved_part(state: TrainState) -> dict:
    return {"step": state.step, "trainable": state.trainable, "frozen": state.frozen,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}


class Checkpointer:
    """Save / restore the train state and the grain iterator state of one work directory."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: Any | None, force: bool = False
             ) -> bool:
        args = {"state": ocp.args.StandardSave(_saved_part(state))}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, template: TrainState, mesh: Mesh | None = None, step: int | None = None
                ) -> tuple[TrainState, Any | None]:
        """Restores onto the shapes and shardings of `template` (so onto any mesh); leaves
        of the template that live on one device (step, rng, optimizer counts) are restored
        replicated over `mesh`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")

        def target(x):
            sharding = getattr(x, "sharding", None)
            if mesh is not None and (sharding is None or len(sharding.device_set) == 1):
                sharding = NamedSharding(mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        abstract = jax.tree_util.tree_map(target, _saved_part(template))
        args = {"state": ocp.args.StandardRestore(abstract)}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        saved = restored["state"]
        state = template.replace(step=saved["step"], trainable=saved["trainable"],
                                 frozen=saved["frozen"], opt_state=saved["opt_state"],
                                 rng=jax.random.wrap_key_data(saved["rng"]))
        return state, (restored["data"] if has_data else None)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
