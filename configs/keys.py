"""Dotted config keys ("model.moe.top_k"): read, set and list them, with "did you mean".

One helper for every place that addresses a config by dotted key: command-line and sweep
overrides, error messages and tests. It works on ConfigDicts, plain dicts and on the
typed sections (attribute access).
"""

import difflib
from collections.abc import Mapping
from typing import Any

from jaxlm.configs.errors import ConfigError


def _children(node: Any) -> dict[str, Any] | None:
    """The sub-keys of a mapping-like node, or None for a leaf value."""
    if isinstance(node, Mapping) or hasattr(node, "items") and hasattr(node, "keys"):
        return dict(node.items())
    fields = getattr(type(node), "model_fields", None)  # a typed section
    if fields is not None:
        return {name: getattr(node, name) for name in fields}
    return None


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included ("model", "model.d_model", ...)."""
    keys = []
    for name, value in (_children(config) or {}).items():
        keys.append(prefix + name)
        if _children(value) is not None and not isinstance(value, (tuple, list)):
            keys += flat_keys(value, prefix + name + ".")
    return keys


def unknown_key(config: Any, key: str, where: str = "") -> ConfigError:
    """The error for a key that `config` does not have, with the closest existing key."""
    close = difflib.get_close_matches(key, flat_keys(config), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only: compare leaf names within the parent
        parent, _, leaf = key.rpartition(".")
        siblings = [k for k in flat_keys(config) if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"unknown config key{' in ' + where if where else ''}{hint}")


def get(config: Any, key: str) -> Any:
    """The value at dotted `key`; an unknown key raises ConfigError with a suggestion."""
    node = config
    for part in key.split("."):
        children = _children(node)
        if children is None or part not in children:
            raise unknown_key(config, key)
        node = children[part]
    return node


def set_value(config: Any, key: str, value: Any, where: str = "") -> None:
    """Set dotted `key` of a ConfigDict (or dict); unknown keys and wrong types are errors."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        children = _children(node)
        if children is None or part not in children:
            raise unknown_key(config, key, where)
        node = children[part]
    leaf = parts[-1]
    children = _children(node)
    if children is None or leaf not in children:
        raise unknown_key(config, key, where)
    if _children(children[leaf]) is not None and not isinstance(children[leaf], (tuple, list)):
        raise ConfigError(key, f"is a section, not a value{' (' + where + ')' if where else ''};"
                               " override its keys")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"cannot set {value!r}{' (' + where + ')' if where else ''}: "
                               f"{e}") from None


def parse_override(config: Any, key: str, text: str, where: str = "") -> Any:
    """The value of `--config.KEY=TEXT` for `config`, typed like the key's current value
    (bools: true/false; numbers; tuples: comma-separated; anything else: the text)."""
    try:
        current = get(config, key)
    except ConfigError:
        raise unknown_key(config, key, where) from None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(key, f"expected true or false{' (' + where + ')' if where else ''}"
                                   f", got {text!r}")
        return text.lower() in ("true", "1")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        kind = type(current).__name__
        raise ConfigError(key, f"expected {'an' if kind == 'int' else 'a'} {kind}"
                               f"{' (' + where + ')' if where else ''}, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text
