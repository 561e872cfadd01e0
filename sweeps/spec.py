"""Load a sweep from a config file and resolve every variant's config, checking all of them.

`--config=configs/<file>.py[:arg]` names a file that defines `get_config(arg)` (the base)
and `get_sweep(arg)` (the variants). Command-line overrides (`--config.KEY=VALUE`) change
the base, so they apply to every variant; a key that the variants set is theirs. Every
override key must exist in the base config, and every resolved config must validate
(`configs/sections.py`), before anything runs.
"""

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from jaxlm.configs import keys
from jaxlm.configs.cli import load_module, split_spec
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.configs.sweep_utils import NAME_RE, Variant


@dataclasses.dataclass
class ResolvedVariant:
    name: str
    overrides: dict[str, Any]
    config: ConfigDict

    def config_json(self) -> dict[str, Any]:
        return json.loads(self.config.to_json_best_effort())


@dataclasses.dataclass
class Sweep:
    spec: str  # "/abs/path/configs/file.py[:arg]", as the workers are given it
    file: Path
    arg: str | None
    base: ConfigDict
    variants: list[ResolvedVariant]
    # `--config.KEY=VALUE` arguments applied to the base, as the workers are given them.
    cli_overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.file.stem + (f"_{self.arg}" if self.arg else "")

    def variant(self, name: str) -> ResolvedVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError("variant", f"no variant named {name!r} in {self.spec}; have "
                                     f"{[v.name for v in self.variants]}")

    def override_keys(self) -> list[str]:
        keys: list[str] = []
        for v in self.variants:
            keys += [k for k in v.overrides if k not in keys]
        return keys


def _as_variants(raw: Any, file: Path) -> list[Variant]:
    if isinstance(raw, Mapping):
        raw = list(raw.items())
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError("sweep", f"get_sweep in {file} must return a non-empty list of "
                                   f"named override dicts, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        if (not isinstance(item, (tuple, list)) or len(item) != 2
                or not isinstance(item[0], str) or not isinstance(item[1], Mapping)):
            raise ConfigError("sweep", f"variant {i} from {file} is not (name, overrides); "
                                       "build variants with configs.sweep_utils")
        out.append(Variant(item[0], dict(item[1])))
    return out


def split_cli_overrides(argv: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(argv without `--config.KEY=VALUE` arguments, those arguments)."""
    overrides = tuple(a for a in argv[1:] if a.startswith("--config."))
    for a in overrides:
        if "=" not in a:
            raise ConfigError(a[len("--config."):], "an override needs a value: "
                                                    "--config.KEY=VALUE")
    return [a for a in argv if a not in overrides], overrides


def load_sweep(config_spec: str, cli_overrides: tuple[str, ...] = ()) -> Sweep:
    """Expand and resolve the sweep in `config_spec`, with `cli_overrides`
    (`--config.KEY=VALUE`) applied to its base; raises ConfigError on any bad variant."""
    file, arg = split_spec(config_spec)
    module = load_module(file)
    for fn in ("get_config", "get_sweep"):
        if not callable(getattr(module, fn, None)):
            raise ConfigError("config", f"{file} defines no {fn}(arg)")
    try:
        base = module.get_config(arg)
        raw = module.get_sweep(arg)
    except (ValueError, KeyError) as e:  # unknown preset, mismatched zip, clashing keys
        raise ConfigError("config", f"{file}:{arg or ''}: {e}") from None
    variants = _as_variants(raw, file)
    for override in cli_overrides:
        key, _, text = override[len("--config."):].partition("=")
        keys.set_value(base, key, keys.parse_override(base, key, text, "--config override"),
                       "--config override")

    seen: set[str] = set()
    resolved = []
    for v in variants:
        if not NAME_RE.match(v.name) or v.name in (".", ".."):
            raise ConfigError("sweep", f"variant name {v.name!r} may only use letters, digits "
                                       "and ._=,+-")
        if v.name in seen:
            raise ConfigError("sweep", f"two variants are named {v.name!r}")
        seen.add(v.name)
        config = copy.deepcopy(base)
        where = f"sweep variant {v.name!r} of {file.name}"
        for key, value in v.overrides.items():
            keys.set_value(config, key, value, where)
        _validate(config, where)
        resolved.append(ResolvedVariant(v.name, dict(v.overrides), config))
    return Sweep(spec=f"{file}" + (f":{arg}" if arg else ""), file=file, arg=arg, base=base,
                 variants=resolved, cli_overrides=tuple(cli_overrides))


def _validate(config: ConfigDict, where: str) -> None:
    try:
        Config.from_dict(config)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} ({where})") from None
