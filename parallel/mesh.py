"""Build the device mesh from `config.mesh`."""

from collections.abc import Mapping, Sequence
import math

import jax
from jax.sharding import AxisType, Mesh

from configs.errors import ConfigError

# Outermost to innermost: tensor parallelism talks most, so its devices are adjacent.
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "tensor")


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Sizes per mesh axis, with the one -1 (if any) taking the devices left over."""
    sizes = {name: int(mesh_cfg.get(name, 1)) for name in MESH_AXES}
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"mesh.{sorted(unknown)[0]}", f"unknown mesh axis; use {MESH_AXES}")
    wild = [n for n, s in sizes.items() if s == -1]
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}", f"must be a positive size or -1, got {size}")
    if len(wild) > 1:
        raise ConfigError(f"mesh.{wild[1]}", "only one mesh axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if num_devices % fixed:
            raise ConfigError(f"mesh.{wild[0]}",
                              f"-1 cannot fill the mesh: {num_devices} devices are not "
                              f"divisible by the other axes' product {fixed}")
        sizes[wild[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items() if s != 1) or "all 1"
        raise ConfigError("mesh", f"mesh product {product} ({shape}) != device count "
                                  f"{num_devices}")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the axes of MESH_AXES.

    Axis types are Auto: we place arrays with `jit` shardings and
    `with_sharding_constraint`, and let GSPMD propagate the rest. Explicit axes would
    put shardings into every type, which buys nothing here.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)

