"""Logical axis names -> mesh shardings: the one place where the two meet.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...). Config rules
(`config.sharding.rules`) map each logical axis to zero or more mesh axes. Parameters
carry their logical axes as metadata; activations are constrained with `constrain`,
which is a no-op unless a `use_rules` context is active (i.e. while tracing a step).
"""

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
Logical = Sequence[str | None]


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        if name in table:
            continue  # first rule wins
        if axes is None:
            table[name] = ()
        elif isinstance(axes, str):
            table[name] = (axes,)
        else:
            table[name] = tuple(axes)
    return table


def _lookup(table: dict[str, tuple[str, ...]], name: str) -> tuple[str, ...]:
    """Mesh axes of logical axis `name` (the config's Sharding section guarantees a rule
    for every axis the model names; a missing one is a programming error)."""
    if name not in table:
        raise ValueError(f"no rule for logical axis {name!r}")
    return table[name]


def logical_to_spec(logical: Logical, rules: Rules) -> P:
    """PartitionSpec for an array whose dimensions have the given logical names.

    A mesh axis used by an earlier dimension is skipped for later ones (an array cannot
    be split twice over one mesh axis).
    """
    table = _rule_table(rules)
    used: set[str] = set()
    spec = []
    for name in logical:
        if name is None:
            spec.append(None)
            continue
        axes = tuple(a for a in _lookup(table, name) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def named_sharding(mesh: Mesh, logical: Logical, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, rules))


def mesh_axes_of(logical_axis: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to (empty: replicated)."""
    return _lookup(_rule_table(rules), logical_axis)


def mesh_axes_size(mesh: Mesh, logical_axis: str, rules: Rules) -> int:
    """How many shards an array dimension named `logical_axis` is split into."""
    return math.prod(mesh.shape[a] for a in mesh_axes_of(logical_axis, rules))


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def tree_shardings(mesh: Mesh, logical_tree: Any, rules: Rules) -> Any:
    """Map a pytree of logical PartitionSpecs (leaves) to NamedShardings."""
    return jax.tree.map(lambda spec: named_sharding(mesh, tuple(spec), rules), logical_tree,
                        is_leaf=_is_spec)


def indivisible_dims(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules
                     ) -> Iterator[tuple[str, int, str, int, tuple[str, ...], int]]:
    """(path, dim, logical name, size, mesh axes, shards) of every array dimension that its
    mesh axes do not divide (`training/layout.py` turns the first into an error)."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_specs = jax.tree.leaves(logical_tree, is_leaf=_is_spec)
    for (path, leaf), logical in zip(flat_shapes, flat_specs, strict=True):
        spec = logical_to_spec(tuple(logical), rules)
        for dim, (size, axes, name) in enumerate(zip(leaf.shape, spec, logical)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            shards = math.prod(mesh.shape[a] for a in axes)
            if size % shards:
                where = jax.tree_util.keystr(path, simple=True, separator=".")
                yield where, dim, name, size, axes, shards


_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Make `constrain` place activations on `mesh` by `rules` while tracing."""
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> Mesh | None:
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx[0]


def current_rules() -> Rules | None:
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx[1]


def constrain(x: jax.Array, logical: Logical) -> jax.Array:
    """Pin an activation's layout by its logical axes (no-op outside `use_rules`)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {len(logical)} logical axes for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, rules))


def shard_map_logical(fn: Any, args: Sequence[jax.Array], in_logical: Sequence[Logical],
                      out_logical: Logical, *, tied: Sequence[Sequence[str]] = ()) -> Any:
    """Run `fn(*args)` once per shard (`shard_map`), with specs from logical axis names.

    For kernels that must see whole local arrays (e.g. a Pallas attention kernel over the
    batch and head axes). Outside `use_rules` this is just `fn(*args)`.
    A logical axis is replicated instead of split when its mesh axes do not divide every
    dimension it names, and each group of `tied` logical axes is split only if all of them
    map to the same mesh axes (e.g. query heads and KV heads, so that each shard holds
    whole GQA groups). Dimensions named None, and mesh axes that no spec names, are
    replicated: `fn` sees them whole.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return fn(*args)
    mesh, rules = ctx
    table = _rule_table(rules)
    dropped: set[str] = set()
    for arg, logical in zip(args, in_logical, strict=True):
        if len(logical) != arg.ndim:
            raise ValueError(f"shard_map_logical: {len(logical)} logical axes for an array "
                             f"of rank {arg.ndim}")
        for size, name in zip(arg.shape, logical):
            if name is None:
                continue
            if size % math.prod(mesh.shape[a] for a in _lookup(table, name)):
                dropped.add(name)
    for group in tied:
        if dropped & set(group) or len({table[name] for name in group}) > 1:
            dropped.update(group)

    def spec(logical: Logical) -> P:
        return logical_to_spec(tuple(None if n in dropped else n for n in logical), rules)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(lg) for lg in in_logical),
                         out_specs=spec(out_logical), check_vma=False)(*args)
