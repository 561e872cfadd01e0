"""What differs between the JAX releases in the supported range, in one place.

The range is pyproject.toml's (jax 0.10.2 to 0.12.x); constraints/*.txt hold the tested
sets of jax, flax, optax, orbax-checkpoint and grain. Code that needs an API that moved
between those releases takes it from here, so no other module compares version numbers.

* `fast_cpu_compile_options()`: XLA:CPU compile options that make the interpreted Pallas
  kernels compile faster. From jax 0.11 on, XLA has no classic (non-MLIR) CPU fusion
  emitters, so `xla_cpu_use_fusion_emitters` is an unknown option there (compilation
  fails).
* `gpu_lowering_target()`: lowering a Pallas Triton kernel for a GPU that is not attached.
  jax 0.10 assumes compute capability 9.0 when it finds no GPU; jax 0.11 and later need
  the target named by an abstract device (`jax.sharding.use_abstract_mesh`). The abstract
  mesh is set on every release, so the lowering is for the same GPU on each.
* `softmax()`, `logsumexp()`: for code inside a `shard_map` that may run in a pipeline
  stage (`parallel/expert.py`). From jax 0.11 on, `jax.nn.softmax` and `jax.nn.logsumexp`
  fail there under differentiation: their custom JVPs are traced lazily, and when a stage
  (a `vmap` with `spmd_axis_name`) holds the `shard_map` and a scan holds the stages, the
  JVP is batched without the vmap's mesh axis, so `max(x, -inf)` in it sees operands
  that vary over different manual axes (a varying-manual-axes error). These versions have
  no custom JVP, compute the same values, and run on every release.
"""

import re

import jax
import jax.numpy as jnp


def _release(version: str) -> tuple[int, ...]:
    """'0.12.0.1' -> (0, 12, 0): the release, without a post-release digit or suffix."""
    return tuple(int(re.match(r"\d+", part).group()) for part in version.split(".")[:3])


JAX_RELEASE = _release(jax.__version__)


def fast_cpu_compile_options() -> dict[str, object]:
    """`jax.jit(..., compiler_options=...)` for programs that XLA:CPU compiles far more
    often than it runs (interpreted kernels in tests and smoke checks): LLVM -O0, and the
    classic fusion emitters where XLA still has them (about 3x faster compiles on
    jax 0.10, the same results)."""
    options: dict[str, object] = {"xla_backend_optimization_level": 0}
    if JAX_RELEASE < (0, 11):
        options["xla_cpu_use_fusion_emitters"] = False
    return options


# The GPU a lowering without an attached GPU targets: Hopper (compute capability 9.0),
# jax 0.10's fallback and the device check's GPU.
ABSTRACT_GPU_KIND = "NVIDIA H100"


def gpu_lowering_target(device_kind: str = ABSTRACT_GPU_KIND):
    """A context manager under which `jit(...).trace(...).lower(lowering_platforms=("cuda",))`
    lowers Pallas Triton kernels for `device_kind` on a machine without that GPU."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.softmax(x, axis)` as plain operations (differentiated by autodiff)."""
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.logsumexp(x, axis)` as plain operations; its gradient is `softmax(x)`."""
    peak = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x - peak), axis)) + jnp.squeeze(peak, axis)
