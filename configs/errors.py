"""The exception types for bad user input and for runs that cannot go on, and how a
failure of the machine (a full disk, a read-only directory) reads as one line."""

import errno
import os


class ConfigError(ValueError):
    """Bad user input: a config value, a flag, or a file. The message names the key or path.

    Raised before anything compiles; the entry points print it as one line and exit non-zero.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `condition` (inside validators: key "" is the
    field being validated)."""
    if not condition:
        raise ConfigError(key, message)


class RunError(RuntimeError):
    """A run that cannot go on: it diverged, or no checkpoint restores. The message says
    what happened and what was kept; the entry points print it as one line and exit 1."""


# Failures of the machine rather than of the input: a full disk, a directory that cannot be
# written. errno -> what to do about it.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EROFS: "make it writable or use another directory",
    errno.EACCES: "make it writable or use another directory",
    errno.EPERM: "make it writable or use another directory",
}


def environment_error(error: BaseException) -> OSError | None:
    """The OSError of a full disk or an unwritable path behind `error` (itself, or its
    cause or context), or None when `error` is not such a failure."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
            return error
        for number in _ENVIRONMENT_ERRNOS:  # tensorstore raises ValueError("...: <strerror>")
            if not isinstance(error, OSError) and os.strerror(number) in str(error):
                return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__
    return None


def environment_message(error: OSError, then: str = "run the same command again") -> str:
    """One line for a failure found by `environment_error`: the path, the reason, what to
    do, e.g. `/runs/x/metrics.jsonl: No space left on device; free some space and run the
    same command again`."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}; {_ENVIRONMENT_ERRNOS[error.errno]} and {then}"


def exit_on_environment_error(error: BaseException) -> None:
    """For the entry points' `except`: exit with one `error:` line when `error` is a full
    disk or an unwritable path; re-raise anything else."""
    env = environment_error(error)
    if env is None:
        raise error
    raise SystemExit(f"error: {environment_message(env)}") from None
