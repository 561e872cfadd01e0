"""What the entry points share: config files as `path.py[:arg]`, and bad flags as one line.

`ml_collections.config_flags` loads `--config=FILE[:ARG]` and applies `--config.KEY=VALUE`
while absl parses the command line; its failures are tracebacks (`AttributeError: 'foo'`,
`OSError: ... Failed loading config file`). `parse_flags` is the entry points' absl
`flags_parser`: it turns them into one `error: KEY: ...` line with the closest existing key.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from absl import flags
from ml_collections import config_flags
from pydantic import model_validator

from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import NonNegativeInt, PositiveInt, Section, require


def split_spec(config_spec: str) -> tuple[Path, str | None]:
    """"configs/x.py:arg" -> (absolute path, "arg" or None)."""
    path, _, arg = config_spec.partition(":")
    return Path(path).absolute(), (arg or None)


def load_module(file: Path) -> ModuleType:
    """Import a config file by path (config files are not a package of the library)."""
    if not file.is_file():
        raise ConfigError("config", f"no such file: {file}")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(str(file)))}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- a broken config file is the user's input
        raise ConfigError("config", f"{file} does not load: {type(e).__name__}: {e}") from None
    return module


def load_config_file(config_spec: str) -> Any:
    """The ConfigDict of `FILE[:ARG]` (its `get_config(arg)`), with one-line errors."""
    file, arg = split_spec(config_spec)
    module = load_module(file)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError("config", f"{file} defines no get_config(arg)")
    try:
        return module.get_config(arg)
    except (ValueError, KeyError) as e:  # an unknown preset
        raise ConfigError("config", f"{file}:{arg or ''}: {e}") from None


def explain_flag_error(argv: list[str], error: Exception, config_flag: str = "config",
                       default_spec: Any = None) -> ConfigError:
    """The ConfigError behind a failed parse of `argv`: a missing or broken config file, an
    override of an unknown key (with the closest key), or a value of the wrong type.
    `default_spec`: the default config file, or the default ConfigDict itself."""
    spec = default_spec
    for arg in argv[1:]:
        if arg.startswith(f"--{config_flag}="):
            spec = arg.split("=", 1)[1]
    if spec is None:
        return ConfigError(config_flag, str(error).splitlines()[0])
    config = load_config_file(spec) if isinstance(spec, str) else spec
    for arg in argv[1:]:
        if arg.startswith(f"--{config_flag}."):
            key, _, value = arg[len(config_flag) + 3:].partition("=")
            try:
                keys.get(config, key)
            except ConfigError as e:
                return keys.unknown_key(config, key, "--config override") if \
                    "unknown config key" in e.message else e
    text = str(error).strip().splitlines()
    return ConfigError(config_flag, text[-1] if text else type(error).__name__)


def flags_parser(default_spec: Any = None):
    """An absl `flags_parser` for an entry point whose `--config` defaults to `default_spec`:
    on a bad config file or override it prints one `error:` line and exits 1."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # unknown flags, bad flag values: absl's own message
            if "flag --config" not in str(e):
                sys.exit(f"error: {e}")
            sys.exit(f"error: {_explained(argv, e, default_spec)}")
        except Exception as e:  # noqa: BLE001 -- config_flags raises what its loader raised
            sys.exit(f"error: {_explained(argv, e, default_spec)}")
    return parse


def define_config_flag(default: Any, help_text: str) -> Any:
    """`--config` for an entry point: a config file (`default` its path) or a fixed
    ConfigDict (`default` itself), with `--config.KEY=VALUE` overrides. With a default,
    `config_flags` applies the command line's overrides while the flag is defined, so a bad
    override fails here: it is one `error:` line, as in `flags_parser`."""
    try:
        if isinstance(default, str):
            return config_flags.DEFINE_config_file("config", default, help_text,
                                                   lock_config=True)
        return config_flags.DEFINE_config_dict("config", default, help_text)
    except Exception as e:  # noqa: BLE001 -- config_flags raises what its parser raised
        sys.exit(f"error: {_explained(sys.argv, e, default)}")


def config_value(holder: Any, argv: list[str], default_spec: str | None = None) -> Any:
    """`holder.value` of a config flag (config_flags defers a failed file load to here),
    with the failure explained as a ConfigError."""
    try:
        value = holder.value
        value.to_dict()  # a failed load is a proxy that raises on first use
        return value
    except Exception as e:  # noqa: BLE001 -- config_flags raises what its loader raised
        raise _explained(argv, e, default_spec) from None


def _explained(argv: list[str], error: Exception, default_spec: Any) -> ConfigError:
    try:
        return explain_flag_error(argv, error, default_spec=default_spec)
    except ConfigError as inner:  # the config file itself is missing or broken
        return inner


class Launch(Section):
    """How a process joins the devices: fake CPU devices, multi-process coordinates."""
    cpu_devices: NonNegativeInt = 0  # N fake CPU devices; 0 = the real devices
    coordinator_address: str | None = None  # HOST:PORT of process 0
    num_processes: PositiveInt | None = None
    process_id: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _process_in_range(self) -> "Launch":
        if self.process_id is not None and self.num_processes is not None:
            require(self.process_id < self.num_processes, "process_id",
                   f"{self.process_id} is not below num_processes {self.num_processes}")
        return self
