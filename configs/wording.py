"""How a pydantic validation error reads as one `ConfigError`: the dotted key of the
failing field and a message in the project's words (`must be a positive integer, got 0`,
`unknown value 'x'; choose one of [...]`)."""

from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from jaxlm.configs.errors import ConfigError

_TYPE_NAMES = {"int_type": "an integer", "int_from_float": "an integer",
               "float_type": "a number", "bool_type": "true or false",
               "string_type": "a string", "tuple_type": "a list"}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def choices(literal: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal type (or of the Literals in a union, e.g. an optional
    Literal), e.g. `choices(AttentionImpl)`."""
    if get_origin(literal) is Literal:
        return get_args(literal)
    return tuple(v for arg in get_args(literal) for v in choices(arg))


def _bounds(section: type[BaseModel], name: str) -> dict[str, Any]:
    """The gt/ge/lt/le limits declared on field `name` of `section`."""
    field = section.model_fields.get(name)
    out: dict[str, Any] = {}
    for meta in getattr(field, "metadata", ()):
        for bound in ("gt", "ge", "lt", "le"):
            if getattr(meta, bound, None) is not None:
                out[bound] = getattr(meta, bound)
    return out


def _range_text(b: dict[str, Any]) -> str:
    """`in (0, 1)`, `>= 0`, ... for limits `b`."""
    if ("gt" in b or "ge" in b) and ("lt" in b or "le" in b):
        lo = f"({b['gt']}" if "gt" in b else f"[{b['ge']}"
        hi = f"{b['lt']})" if "lt" in b else f"{b['le']}]"
        return f"in {lo}, {hi}"
    for bound, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if bound in b:
            return f"{op} {b[bound]}"
    return "valid"


def _owner(section: type[BaseModel], loc: list[str]) -> Any:
    """The section class that declares the field at `loc`."""
    owner: Any = section
    for part in loc[:-1]:
        field = owner.model_fields.get(part) if hasattr(owner, "model_fields") else None
        owner = getattr(field, "annotation", None) or owner
    return owner


def config_error(section: type[BaseModel], prefix: str, err: dict[str, Any],
                 unknown_key: Callable[[str], ConfigError]) -> ConfigError:
    """One pydantic error of validating `section` (keys under `prefix`) -> ConfigError.
    `unknown_key(key)` words a key the section does not declare."""
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    owner = _owner(section, loc)
    name = loc[-1] if loc else ""
    key = ".".join(p for p in (prefix, *loc) if p)
    if getattr(section, "FLAT_KEYS", False) and loc:  # flags: nested fields are flat flags
        key = name
    value, kind, ctx = err.get("input"), err["type"], err.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
        inner = ctx["error"]
        return ConfigError(".".join(p for p in (key, inner.key) if p), inner.message)
    if kind in _BOUND_ERRORS:
        bounds = _bounds(owner, name) if isinstance(owner, type) else {}
        if kind == "greater_than" and bounds.get("gt") == 0 and isinstance(value, int):
            return ConfigError(key, f"must be a positive integer, got {value!r}")
        return ConfigError(key, f"must be {_range_text(bounds or ctx)}, got {value!r}")
    if kind == "literal_error":
        field = owner.model_fields.get(name) if isinstance(owner, type) else None
        allowed = list(choices(field.annotation)) if field is not None else ctx.get("expected")
        return ConfigError(key, f"unknown value {value!r}; choose one of {allowed}")
    if kind == "finite_number":
        return ConfigError(key, f"must be a finite number, got {value!r}")
    if kind == "extra_forbidden":
        if isinstance(owner, type) and getattr(owner, "UNKNOWN_KEY", None):
            return ConfigError(key, owner.UNKNOWN_KEY)
        return unknown_key(key)
    if kind in _TYPE_NAMES:
        return ConfigError(key, f"must be {_TYPE_NAMES[kind]}, got {value!r}")
    return ConfigError(key, err["msg"])
