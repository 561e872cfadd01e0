"""Helpers for `get_sweep(arg)` in config files: named override dicts, their product and zip.

A sweep is a list of `Variant(name, overrides)`; `overrides` maps dotted config keys
("model.d_model") to values. Build axes with `axis`, combine them with `product` (every
combination) or `zip` (element by element), and concatenate lists with `+`:

    from jaxlm.configs import sweep_utils as su

    def get_sweep(arg=None):
        return su.product(su.axis("model.d_model", [64, 128]),
                          su.zip(su.axis("model.num_layers", [2, 4]),
                                 su.axis("model.num_heads", [2, 4], label="heads")))
        # -> d_model=64,num_layers=2,heads=2  d_model=64,num_layers=4,heads=4  ...

Names become directory names under the sweep's --workdir, so they may only use letters,
digits and `._=,+-`. This module imports nothing heavy: config files stay cheap to load.
"""

import builtins
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

NAME_RE = re.compile(r"^[A-Za-z0-9._=,+-]+$")


class Variant(NamedTuple):
    name: str
    overrides: dict[str, Any]


def format_value(value: Any) -> str:
    """A short, filesystem-safe rendering of an override value for variant names."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value))
    return text or "_"


def named(name: str, overrides: Mapping[str, Any] | None = None) -> Variant:
    """One hand-named variant: `named("baseline")`, `named("wide", {"model.d_model": 256})`."""
    return Variant(name, dict(overrides or {}))


def axis(key: str, values: Iterable[Any], *, label: str | None = None) -> list[Variant]:
    """One variant per value of `key`, named `<label>=<value>` (label: the key's last part)."""
    values = list(values)
    if not values:
        raise ValueError(f"sweep axis {key!r} has no values")
    label = key.rsplit(".", 1)[-1] if label is None else label
    return [Variant(f"{label}={format_value(v)}", {key: v}) for v in values]


def _merge(parts: Sequence[Variant]) -> Variant:
    overrides: dict[str, Any] = {}
    for part in parts:
        clash = set(overrides) & set(part.overrides)
        if clash:
            raise ValueError(f"sweep: key {sorted(clash)[0]!r} is set by two combined axes")
        overrides.update(part.overrides)
    return Variant(",".join(p.name for p in parts if p.name), overrides)


def product(*axes: Sequence[Variant]) -> list[Variant]:
    """Every combination, the last axis varying fastest; names joined with commas."""
    return [_merge(parts) for parts in itertools.product(*axes)]


def zip(*axes: Sequence[Variant]) -> list[Variant]:  # noqa: A001 (as big_vision's hyper.zip)
    """Element-wise combination of axes of equal length."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"sweep zip: axes have different lengths {[len(a) for a in axes]}")
    return [_merge(parts) for parts in builtins.zip(*axes)]
