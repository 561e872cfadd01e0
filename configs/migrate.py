"""Configs written by earlier versions of this code (a run's config.json) read as today's:
`upgrade` fills in what such a config lacks before the sections validate it."""

from collections.abc import Mapping
from typing import Any

# Logical axes added after configs were first saved, with their default rule.
LATER_RULES: tuple[tuple[str, Any], ...] = (("lora_rank", None),)


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a ConfigDict as a dict) with `sharding.rules` given the default rule of
    every later logical axis they do not name."""
    sharding = values.get("sharding")
    rules = sharding.get("rules") if isinstance(sharding, Mapping) else None
    if not isinstance(rules, (list, tuple)):
        return values
    named = {r[0] for r in rules if isinstance(r, (list, tuple)) and r}
    missing = [r for r in LATER_RULES if r[0] not in named]
    if not missing:
        return values
    return {**values, "sharding": {**sharding, "rules": [*rules, *missing]}}
