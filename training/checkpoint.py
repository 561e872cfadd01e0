"""Orbax checkpoints of the train state together with the grain iterator.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it when complete), so a crash or SIGTERM mid-save never damages the last good step.
"""

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items `state` and `data`.

    Read-only on a directory that does not exist, it simply has no steps.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.manager = None
        if read_only and not self.directory.is_dir():
            return
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None, create=not read_only,
            enable_async_checkpointing=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)  # leftovers of a killed save
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return None if self.manager is None else self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return [] if self.manager is None else sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore the state (sharded as `abstract_state` says) and, if given, the iterator."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only `state.params` (no optimizer state), sharded as `abstract_params` says: a
        partial restore, for a frozen model such as a distillation teacher."""
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
