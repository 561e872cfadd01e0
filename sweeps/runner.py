"""Run a sweep's variants as subprocesses, one at a time or `parallel` at once.

Each variant runs `sweep.py --variant=NAME` in a fresh interpreter (a crash, a leak or a
different device count in one variant cannot touch the others), with its output in
`DIR/<variant>/sweep.log`. With `parallel=K` the devices are split into K disjoint slots:

* CPU: the process's cores are split into K disjoint sets and each subprocess pins
  itself to its set (`--cpu_affinity`, applied before JAX starts: XLA sizes its CPU
  thread pool from the affinity mask).
  With `--cpu_devices=N`, each subprocess gets N / K fake CPU devices.
* GPU: `CUDA_VISIBLE_DEVICES` gives each subprocess its own n / K GPUs.

The parent never initialises a JAX backend itself (it would hold the accelerators): the
device count comes from a short-lived probe subprocess.
"""

import contextlib
import dataclasses
import os
import signal
import subprocess
import threading
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.sweeps.results import (LOG_FILE, RESULT_FILE, check_recorded_config, first_line,
                                  is_finished, read_result, variant_dir, write_result)
from jaxlm.sweeps.spec import Sweep

SWEEP_PY = Path(__file__).resolve().parents[1] / "sweep.py"


@dataclasses.dataclass
class Slot:
    """The share of the machine one concurrently running variant gets."""

    flags: list[str]
    env: dict[str, str]
    cpus: list[int] | None  # CPU affinity, None = inherit
    description: str


def probe_devices(python: str = sys.executable) -> tuple[str, int]:
    """(platform, local device count) as a fresh JAX process sees them."""
    code = "import jax; print(jax.default_backend(), jax.local_device_count())"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise ConfigError("parallel", f"could not probe the devices: {first_line(res.stderr)}")
    platform, count = res.stdout.split()[-2:]
    return platform, int(count)


def make_slots(parallel: int, platform: str, num_devices: int, cpu_devices: int = 0,
               cores: list[int] | None = None,
               visible: list[str] | None = None) -> list[Slot]:
    """Split the machine into `parallel` disjoint slots (see the module docstring)."""
    if parallel < 1:
        raise ConfigError("parallel", f"must be >= 1, got {parallel}")
    if platform == "cpu":
        cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
        per_slot_devices = 0
        if cpu_devices:
            if cpu_devices % parallel:
                raise ConfigError("cpu_devices", f"{cpu_devices} fake CPU devices cannot be "
                                                 f"split into {parallel} equal parts")
            per_slot_devices = cpu_devices // parallel
        flags = [f"--cpu_devices={per_slot_devices}"] if per_slot_devices else []
        if parallel == 1:
            return [Slot(flags, {}, None, "all cores")]
        if len(cores) < parallel:  # cannot be disjoint: share all cores
            return [Slot(flags, {}, None, f"{len(cores)} shared cores")
                    for _ in range(parallel)]
        n = len(cores) // parallel
        return [Slot(flags, {}, cores[i * n:(i + 1) * n],
                     f"cores {cores[i * n]}-{cores[(i + 1) * n - 1]}" if n > 1 else
                     f"core {cores[i]}"
                     + (f", {per_slot_devices} fake devices" if per_slot_devices else ""))
                for i in range(parallel)]
    if parallel == 1:
        return [Slot([], {}, None, f"all {num_devices} {platform} devices")]
    if platform in ("gpu", "cuda", "rocm"):
        if num_devices % parallel:
            raise ConfigError("parallel", f"{num_devices} GPUs cannot be split into {parallel} "
                                          "equal parts")
        env_name = "HIP_VISIBLE_DEVICES" if platform == "rocm" else "CUDA_VISIBLE_DEVICES"
        if visible is None:
            listed = os.environ.get(env_name, "")
            visible = [d for d in listed.split(",") if d] or [str(i) for i in
                                                              range(num_devices)]
        n = num_devices // parallel
        return [Slot([], {env_name: ",".join(visible[i * n:(i + 1) * n])}, None,
                     f"GPUs {','.join(visible[i * n:(i + 1) * n])}")
                for i in range(parallel)]
    raise ConfigError("parallel", f"splitting {platform} devices between processes is not "
                                  "supported; use --parallel=1 or --emit=slurm")


def worker_command(sweep: Sweep, workdir: Path, name: str, slot: Slot,
                   python: str = sys.executable) -> list[str]:
    affinity = [f"--cpu_affinity={','.join(map(str, slot.cpus))}"] if slot.cpus else []
    return [python, str(SWEEP_PY), f"--config={sweep.spec}", f"--workdir={workdir}",
            f"--variant={name}", *sweep.cli_overrides, *slot.flags, *affinity]


def _launch(cmd: list[str], slot: Slot, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("a")
    log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}"
                   f" [{slot.description}]\n")
    log_file.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **slot.env)
    # A session of its own: Ctrl-C reaches only the sweep, which then sends SIGTERM so
    # that each running variant saves a checkpoint before it exits.
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            cwd=SWEEP_PY.parent, start_new_session=True)
    proc.log_file = log_file  # type: ignore[attr-defined]
    return proc


def _last_error_line(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):  # a Python traceback ends with "Type: message"
        if not ln.startswith((" ", "\t", "===")):
            return ln.strip()
    return "no output"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM to the sweep (a scheduler, `kill`) stops it like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start(sweep: Sweep, workdir: Path, v: Any, slot: Slot, python: str,
           log: Callable[[str], None]) -> subprocess.Popen:
    vdir = variant_dir(workdir, v.name)
    if read_result(vdir) is not None:  # a failed or stale result: this run replaces it
        (vdir / RESULT_FILE).unlink()
    ckpts = vdir / "checkpoints"
    resuming = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    log(f"[{v.name}] {'resuming' if resuming else 'starting'} on {slot.description}; "
        f"log: {vdir / LOG_FILE}")
    return _launch(worker_command(sweep, workdir, v.name, slot, python), slot, vdir / LOG_FILE)


def _finish(workdir: Path, v: Any, proc: subprocess.Popen, t0: float,
            log: Callable[[str], None]) -> str:
    """Read the result of a finished worker; a worker that died gets a failed result."""
    proc.log_file.close()
    vdir = variant_dir(workdir, v.name)
    result = read_result(vdir)
    if result is None:
        error = f"exit code {proc.returncode}: {_last_error_line(vdir / LOG_FILE)}"
        result = {"name": v.name, "overrides": v.overrides, "config": v.config_json(),
                  "status": "failed", "error": error, "wall_seconds": round(time.time() - t0, 1)}
        write_result(vdir, result)
    if result["status"] == "ok":
        log(f"[{v.name}] done in {result.get('wall_seconds', 0):.0f} s: eval loss "
            f"{result['final_eval_loss']:.4f}")
    else:
        log(f"[{v.name}] {result['status']}: {result.get('error')}")
    return result["status"]


def run_sweep(sweep: Sweep, workdir: str | Path, *, parallel: int = 1, cpu_devices: int = 0,
              python: str = sys.executable, log: Callable[[str], None] = print,
              poll_seconds: float = 0.2) -> dict[str, str]:
    """Run every unfinished variant; returns {name: status}. Never raises for a variant."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    todo = []
    status: dict[str, str] = {}
    for v in sweep.variants:
        vdir = variant_dir(workdir, v.name)
        check_recorded_config(vdir, v.name, v.config)  # before any variant runs
        if is_finished(vdir, v.config_json()):
            status[v.name] = "ok"
            log(f"[{v.name}] finished earlier; skipping.")
        else:
            todo.append(v)
    if not todo:
        return status

    if parallel > 1 and not cpu_devices and os.environ.get("JAX_PLATFORMS", "") != "cpu":
        platform, count = probe_devices(python)
    else:
        platform, count = "cpu", cpu_devices or 1
    slots = make_slots(min(parallel, len(todo)), platform, count, cpu_devices)

    free = list(range(len(slots)))
    running: dict[int, tuple[Any, subprocess.Popen, float]] = {}
    with _sigterm_as_interrupt():
        try:
            while todo or running:
                while todo and free:
                    v, i = todo.pop(0), free.pop(0)
                    running[i] = (v, _start(sweep, workdir, v, slots[i], python, log),
                                  time.time())
                time.sleep(poll_seconds)
                for i, (v, proc, t0) in list(running.items()):
                    if proc.poll() is not None:
                        del running[i]
                        free.append(i)
                        status[v.name] = _finish(workdir, v, proc, t0, log)
        except BaseException:  # Ctrl-C or SIGTERM: running variants checkpoint and exit
            for _, proc, _ in running.values():
                proc.terminate()
            for _, proc, _ in running.values():
                proc.wait()
            raise
    return status
