"""The default config every preset starts from: `get_base_config()`.

Every key, its default and its limits are declared in `configs/sections.py`; this file
turns them into the `ConfigDict` that config files edit and `--config.KEY=VALUE` overrides,
so a typo in a key fails at flag parsing instead of being silently ignored.
"""

from ml_collections import ConfigDict

from jaxlm.configs.sections import DEFAULT_RULES, Config

__all__ = ["DEFAULT_RULES", "get_base_config"]


def get_base_config() -> ConfigDict:
    return ConfigDict(Config().to_dict())
