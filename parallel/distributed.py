"""Process start-up: fake CPU devices and multi-process initialisation.

Must run before anything asks JAX for its devices.
"""

import os

import jax


def _cluster_detected() -> bool:
    """True under a multi-task SLURM job, an Open MPI launch, or a multi-host TPU pod."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize(cpu_devices: int = 0, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
    """Configure devices and, for multi-process runs, join the other processes.

    `cpu_devices=N` runs on N fake CPU devices. An explicit coordinator address starts a
    multi-process run on those terms; otherwise SLURM, Open MPI and TPU pods are
    detected by `jax.distributed.initialize()` itself.
    """
    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if coordinator_address or (num_processes or 1) > 1:
        if cpu_devices or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
