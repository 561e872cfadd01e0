"""The one exception type for bad user input."""


class ConfigError(ValueError):
    """Bad user input: a config value, a flag, or a file. The message names the key or path.

    Raised before anything compiles; the entry points print it as one line and exit non-zero.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class RunError(RuntimeError):
    """A run that cannot go on: it diverged, or no checkpoint restores. The message says
    what happened and what was kept; the entry points print it as one line and exit 1."""
