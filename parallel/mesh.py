"""Build the device mesh from resolved axis sizes (`training/layout.py` resolves and checks
`config.mesh` against the devices)."""

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxlm.configs.sections import MESH_AXES

__all__ = ["MESH_AXES", "make_mesh"]


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the axes of MESH_AXES, sized by `sizes`.

    Axis types are Auto: we place arrays with `jit` shardings and
    `with_sharding_constraint`, and let GSPMD propagate the rest. Explicit axes would
    put shardings into every type, which buys nothing here.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(tuple(int(sizes.get(n, 1)) for n in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
