"""Directories a command writes: it holds their lock, refuses what is not its own, and
never leaves half of one behind.

Every writer uses these helpers:

* `lock(DIR)`: an advisory `flock` on `DIR/run.lock`, the lock of a run directory
  (`train.py`, an import, a merge's output). `output_lock(DIR)` is the same lock on
  `PARENT/.DIR.lock`, for outputs that are built elsewhere and renamed into place
  (exports, prepared data); that file is removed when the lock is released. A second
  writer is refused with one line naming the holder; the kernel releases a lock when its
  holder exits in any way (also `kill -9`), so a lock left by a dead process is taken over.
* `check_output(DIR, ...)`: a missing or empty directory is new, one of the writer's own
  kind is replaced only when asked (`--overwrite`), anything else is refused; a run
  directory is never an output of anything but a run.
* `staged(DIR)`: build in a hidden sibling `.DIR.partial-HOST-PID`, renamed into place at
  the end (an older `DIR` is swapped aside, then deleted); on failure it is removed, and
  those of dead processes are removed by the next writer.
* `new_run(DIR)`: write a new run into DIR in place (its files name their own directory):
  under DIR's lock, DIR empty, and on failure everything written is removed. A writer
  killed half-way leaves `DIR/.incomplete`, which the next writer clears and `train.py`
  refuses.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxlm.configs.errors import ConfigError

LOCK_FILE = "run.lock"
RUN_CONFIG = "config.json"  # a training run's directory: its resolved config
RUN_CHECKPOINTS = "checkpoints"
INCOMPLETE = ".incomplete"  # a run being written in place; left behind by a killed writer
HOST = socket.gethostname()


def _flag(key: str) -> str:
    """The command-line spelling of `key`: 'output' and '--output' both give '--output'."""
    return "--" + key.lstrip("-")


def write_text_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: a crash never leaves half."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _holder() -> str:
    return f"host {HOST}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def _flock(path: Path, directory: Path, key: str, user: str, unlink: bool,
           wait: bool = False) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; refused (one line naming the holder) while
    another process holds it, or awaited with `wait`. With `unlink`, the file is removed
    on release, and a lock taken on a file that was removed meanwhile is taken again on
    the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(key, f"{directory} is in use by {user} ({holder}); wait for "
                                   f"it to finish or use another {_flag(key)}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it on release: lock the file there now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        yield
    finally:
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(fd)  # releases the lock


def lock(directory: Path, key: str = "workdir", user: str = "another run"
         ) -> contextlib.AbstractContextManager[None]:
    """Hold DIRECTORY/run.lock (created with the directory): the lock of a run directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return _flock(directory / LOCK_FILE, directory, key, user, unlink=False)


def output_lock(output: Path, key: str = "output", user: str = "another process",
                wait: bool = False) -> contextlib.AbstractContextManager[None]:
    """Hold PARENT/.OUTPUT.lock: the lock of an output built by `staged` (with `wait`,
    wait for its holder instead of refusing)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return _flock(output.parent / f".{output.name}.lock", output, key, user, unlink=True,
                  wait=wait)


def is_run_dir(path: Path) -> bool:
    """A training run's directory: its lock, its checkpoints or its run config."""
    path = Path(path)
    if (path / LOCK_FILE).exists() or (path / RUN_CHECKPOINTS).is_dir():
        return True
    try:
        saved = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("model"), dict) and \
        isinstance(saved.get("data"), dict)


def _listing(path: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")


def check_output(output: Path, key: str, kind: str, is_own: Callable[[Path], bool],
                 overwrite: bool = False, same: Callable[[Path], bool] | None = None
                 ) -> bool:
    """Whether `output` must be (re)built: False when it is one of its own kind that
    `same` accepts (nothing to do). A missing or empty directory is built; another of its
    own kind is rebuilt only with `overwrite`; a file, a run directory or any other
    non-empty directory is refused. `kind` names what the writer writes, e.g.
    "a prepared data directory"."""
    output = Path(output)
    if not output.exists():
        return True
    if not output.is_dir():
        raise ConfigError(key, f"{output} is a file, not a directory; choose another {_flag(key)}")
    if is_run_dir(output):
        raise ConfigError(key, f"{output} is a training run's directory, which is never "
                               f"replaced by {kind}; choose another {_flag(key)}")
    if not any(output.iterdir()):
        return True
    if not is_own(output):
        raise ConfigError(key, f"{output} is not empty and is not {kind} (it holds "
                               f"{_listing(output)}); choose a new or empty {_flag(key)}")
    if same is not None and same(output):
        return False
    if not overwrite:
        raise ConfigError(key, f"{output} holds {kind} made from other inputs or settings; "
                               f"pass --overwrite to replace it, or choose another {_flag(key)}")
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_name(output: Path, what: str) -> Path:
    return output.parent / f".{output.name}.{what}-{HOST}-{os.getpid()}"


def clean_stale(output: Path) -> None:
    """Remove the staging (and swapped-out) directories of `output` that processes of this
    host left when they died; those of live processes and other hosts stay."""
    for what in ("partial", "old"):
        for p in output.parent.glob(f".{output.name}.{what}-*"):
            host, _, pid = p.name[len(f".{output.name}.{what}-"):].rpartition("-")
            if host == HOST and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def is_staging(path: Path, output: Path) -> bool:
    """Whether `path` lies in a staging directory of `output` (never read back as input)."""
    return any(p.name.startswith(f".{output.name}.partial-") for p in Path(path).parents)


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A new hidden sibling directory to build `output` in; when the block ends it
    replaces `output` (a missing or empty one, or one that `check_output` allowed), and
    when the block raises it is removed. Hold `output_lock(output)` around it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(output)
    tmp = _staging_name(output, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if output.is_dir() and any(output.iterdir()):  # swap the old one out, then delete it
            old = _staging_name(output, "old")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if output.is_dir():
                output.rmdir()
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_complete(workdir: Path, key: str = "workdir") -> None:
    """Refuse a run directory that a killed import or merge left half-written."""
    if (Path(workdir) / INCOMPLETE).exists():
        raise ConfigError(key, f"{workdir} was left half-written by an import or merge that "
                               f"did not finish ({(Path(workdir) / INCOMPLETE).read_text()}); "
                               f"run that command again, or use another {_flag(key)}")


def _is_lock(name: str) -> bool:
    """The run's lock, or an output's lock inside it (`output_lock`, held while built)."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".lock"))


def _clear(workdir: Path) -> None:
    """Remove everything in `workdir` but its lock file."""
    for p in workdir.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_empty(workdir: Path, key: str) -> None:
    if any(not _is_lock(p.name) for p in workdir.iterdir()):
        run = (workdir / RUN_CHECKPOINTS).is_dir() or (workdir / RUN_CONFIG).is_file()
        raise ConfigError(key, f"{workdir} is {'a run' if run else 'not empty'} (it holds "
                               f"{_listing(workdir)}); write the new run into a new or "
                               f"empty {_flag(key)}")


@contextlib.contextmanager
def new_run(workdir: Path, key: str = "workdir") -> Iterator[Path]:
    """Hold `workdir`'s lock while a new run is written into it in place. `workdir` must be
    missing or empty (apart from its lock and what a killed writer left); when the block
    raises, everything written is removed (and `workdir` itself, if it was made here)."""
    workdir = Path(workdir).absolute()
    created = not workdir.exists()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(key, f"{workdir} is a file, not a directory")
    if not created and not (workdir / INCOMPLETE).exists():
        _check_empty(workdir, key)  # before the lock file is made in it
    with lock(workdir, key):
        marker = workdir / INCOMPLETE
        if marker.exists():  # its writer is gone: it would hold the lock
            _clear(workdir)
        _check_empty(workdir, key)
        marker.write_text(_holder())
        try:
            yield workdir
            marker.unlink()
        except BaseException:
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                _clear(workdir)
            raise
