"""Orbax checkpoints of the train state together with the grain iterator.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it when complete), so a crash or SIGTERM mid-save never damages the last good step.
A step that was damaged later (a truncated file, deleted metadata) fails to restore:
`restore_latest` then falls back to the newest step that restores.
"""

import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.configs.errors import RunError, environment_error, environment_message


class _OrbaxNoise(logging.Filter):
    """Drops orbax's warnings that a read-only manager (eval, convert, resume checks) saves
    nothing, which is what read-only asks for, and its error logs (with tracebacks) of a
    failed save or restore: each failure also reaches `Checkpointer` as an exception, which
    it reports as one line."""

    NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return not str(record.getMessage()).startswith(self.NOTES)


logging.getLogger("absl").addFilter(_OrbaxNoise())


class _AbandonedIO(logging.Filter):
    """Silences the echoes of a failed restore or save.

    When one array of a step fails to read or write, orbax closes its event loop while
    tensorstore still completes the step's other reads and writes: each then reports
    `RuntimeError: Event loop is closed` (its completion callback), an abandoned
    `_read_array_index_and_device_put` coroutine, or `_GatheringFuture exception was never
    retrieved` (asyncio), at any later time up to the process's exit; a save that a second
    Ctrl-C cuts short leaves a `write_fragment` coroutine never awaited. The failure itself
    reaches `Checkpointer` as an exception and is reported as one line. An echo can print
    before that exception arrives, so from the first `Checkpointer` on, these are dropped
    (`sys.unraisablehook`, `sys.excepthook`, which a callback that tensorstore runs on its
    own thread reports through, the `asyncio` logger, and the never-awaited warning of those
    coroutines); everything else passes.
    """

    # Orbax's coroutines that a failed read or an interrupted write leaves unfinished.
    ECHO_COROUTINES = ("_read_array_index_and_device_put", "write_fragment")

    def __init__(self) -> None:
        super().__init__()
        self.previous_hook: Callable[[Any], None] | None = None
        self.previous_excepthook: Callable[..., None] | None = None

    def start(self) -> None:
        """Drop the echoes from now on (idempotent)."""
        if sys.unraisablehook is not self.unraisable:
            self.previous_hook = sys.unraisablehook
            sys.unraisablehook = self.unraisable
        if sys.excepthook is not self.excepthook:
            self.previous_excepthook = sys.excepthook
            sys.excepthook = self.excepthook
        logging.getLogger("asyncio").addFilter(self)  # a second add is a no-op
        names = "|".join(self.ECHO_COROUTINES)
        warnings.filterwarnings("ignore", rf"coroutine '(.*\.)?({names})' was never awaited",
                                RuntimeWarning)

    def is_echo(self, exc: BaseException | None, obj: Any) -> bool:
        closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        return closed or getattr(obj, "__qualname__", None) in self.ECHO_COROUTINES

    def unraisable(self, unraisable: Any) -> None:
        if not self.is_echo(unraisable.exc_value, unraisable.object):
            (self.previous_hook or sys.__unraisablehook__)(unraisable)

    def excepthook(self, kind: type, exc: BaseException, tb: Any) -> None:
        if not self.is_echo(exc, None):
            (self.previous_excepthook or sys.__excepthook__)(kind, exc, tb)

    def filter(self, record: logging.LogRecord) -> bool:
        first_line = str(record.msg).split("\n", 1)[0]  # then "future: <Task ...>"
        return not first_line.endswith("exception was never retrieved")


_ABANDONED_IO = _AbandonedIO()

DAMAGED = "damaged_checkpoints"  # beside the checkpoints directory
T = TypeVar("T")


def restore_failure(error: Exception) -> str:
    """Why a checkpoint does not restore, in one line: the exception's type and first line."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


class SaveFailed(RunError):
    """A checkpoint could not be written (e.g. a full disk); the message names the last
    complete checkpoint, which the next run resumes from."""


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
        _ABANDONED_IO.start()

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
        try:  # also raises the failure of the previous, asynchronous save
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
            raise self._save_failed(e) from None

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore the state (sharded as `abstract_state` says) and, if given, the iterator."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state: Any, data_iter: Any | None = None, *,
                       move_aside: bool = False, warn: Callable[[str], None] = print
                       ) -> tuple[Any, int] | None:
        """(state, step) of the newest checkpoint that restores (`newest_restoring`)."""
        return self.newest_restoring(lambda step: self.restore(step, abstract_state, data_iter),
                                     move_aside=move_aside, warn=warn)

    def restore_latest_params(self, abstract_params: Any, *,
                              warn: Callable[[str], None] = print) -> tuple[Any, int] | None:
        """(params, step) of the newest checkpoint whose parameters restore
        (`restore_params`); a damaged newer step is reported, never moved."""
        return self.newest_restoring(lambda step: self.restore_params(step, abstract_params),
                                     warn=warn)

    def newest_restoring(self, restore: Callable[[int], T], *, move_aside: bool = False,
                         warn: Callable[[str], None] = print) -> tuple[T, int] | None:
        """(restore(step), step) for the newest step that restores, or None without
        checkpoints.

        A step that fails while an older one restores is damaged: one warning line names it
        and, with `move_aside` (for the run's own trainer; readers of a run never change
        it), it goes to `../damaged_checkpoints/` (never deleted). If none restores (e.g. a
        config that does not match them), nothing is moved and RunError names every step
        and why.
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                value = restore(step)
            except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
                failed.append((step, restore_failure(e)))
                continue
            for bad, reason in failed:
                where = self.move_aside(bad) if move_aside else None
                warn(f"warning: checkpoint step {bad} in {self.directory} does not restore "
                     f"({reason})" + (f"; moved to {where}" if where else "")
                     + f"; using step {step}")
            return value, step
        if failed:
            raise RunError(f"no checkpoint in {self.directory} restores (does the config "
                           "still match the run?): " + "; ".join(f"step {s} ({r})"
                                                                 for s, r in failed))
        return None

    def restore_given(self, step: int, restore: Callable[[int], T]) -> T:
        """restore(step) for a step the user named: if it does not restore, RunError names
        it (there is no falling back to another)."""
        try:
            return restore(step)
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
            raise RunError(f"checkpoint step {step} in {self.directory} does not restore "
                           f"({restore_failure(e)})") from None

    def move_aside(self, step: int) -> Path:
        """Move a damaged step to WORKDIR/damaged_checkpoints/ (process 0 only)."""
        target = self.directory.parent / DAMAGED / str(step)
        if jax.process_index() == 0:
            if target.exists():
                target = target.with_name(f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only `state.params` (no optimizer state), sharded as `abstract_params` says: a
        partial restore, for a frozen model such as a distillation teacher."""
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def wait(self) -> None:
        """Wait for the asynchronous save; SaveFailed if it failed."""
        if self.manager is not None:
            try:
                self.manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
                raise self._save_failed(e) from None

    def _save_failed(self, error: Exception) -> SaveFailed:
        """The one line for a failed save: why, and the last complete checkpoint (an
        unfinished one is only a temporary directory, removed at the next start)."""
        self.manager.reload()
        last = self.manager.latest_step()
        resume = f"step {last}" if last is not None else "step 0 (there is no checkpoint yet)"
        env = environment_error(error)
        if env is not None:
            return SaveFailed(f"saving a checkpoint in {self.directory} failed: "
                              + environment_message(env, f"run the same command again: it "
                                                         f"resumes from {resume}"))
        return SaveFailed(f"saving a checkpoint in {self.directory} failed ("
                          f"{type(error).__name__}: {str(error).strip()[:200]}); the next run "
                          f"resumes from {resume}")

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
