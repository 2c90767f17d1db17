"""Several processes, one program: `jax.distributed`, process-local data, failures.

Every process runs the same script. After `initialize(...)`, `jax.devices()` lists the
devices of all processes and `make_mesh` spans them; each process only materialises the
shards of an input its own devices hold (`global_array`), and reads results back with
`to_numpy`. On TPU pod slices, GKE and SLURM `initialize()` needs no arguments; elsewhere
pass (or export) the coordinator address, process count and id:

    KVJAX_COORDINATOR=10.0.0.1:1234 KVJAX_NUM_PROCESSES=2 KVJAX_PROCESS_ID=0 python run.py

A process that dies makes the others fail instead of hang: its sockets close, so the
next collective raises (turned into `PeerFailure` by `peer_guard`); a process that hangs
stops its heartbeats, and the coordination service terminates the job after
`heartbeat_timeout_s`; `peer_guard(timeout_s=...)` adds a watchdog that ends this process
with a message if a step takes longer than that.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

#: exit status of a process ended by the `peer_guard` watchdog.
EXIT_TIMEOUT = 75

_PEER_SIGNS = (
    "gloo",
    "connection closed",
    "connection reset",
    "heartbeat",
    "coordination",
    "unavailable",
    "broken pipe",
    "peer",
    "barrier",
    "nccl",
    "deadline",
)


class PeerFailure(RuntimeError):
    """A collective failed because another process of the job died or stopped answering."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_s: int = 30,
    init_timeout_s: int = 120,
    cpu_collectives: str | None = "gloo",
) -> None:
    """`jax.distributed.initialize` with kvjax's defaults; call before any other JAX use.

    Arguments default to the env vars KVJAX_COORDINATOR ("host:port"), KVJAX_NUM_PROCESSES
    and KVJAX_PROCESS_ID, else to JAX's cluster auto-detection (TPU, GKE, SLURM).
    cpu_collectives: the CPU cross-process backend ("gloo"; None keeps JAX's default)."""
    env = os.environ
    coordinator = coordinator or env.get("KVJAX_COORDINATOR")
    if num_processes is None and "KVJAX_NUM_PROCESSES" in env:
        num_processes = int(env["KVJAX_NUM_PROCESSES"])
    if process_id is None and "KVJAX_PROCESS_ID" in env:
        process_id = int(env["KVJAX_PROCESS_ID"])
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = dict(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=heartbeat_timeout_s,
    )
    accepted = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})


def global_array(load: Callable, shape: tuple, dtype, sharding) -> jax.Array:
    """A global array whose shards are produced where they live: `load(index)` (index: a
    tuple of slices of the global shape) is called only for this process's devices."""
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.asarray(load(idx), dtype=dtype))


def replicate(tree, mesh):
    """Put every leaf of a host/device pytree on every device of `mesh` (all processes
    must pass the same values, e.g. weights loaded or initialised from the same seed)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        host = np.asarray(x)
        return global_array(lambda idx: host[idx], host.shape, host.dtype, sharding)

    return jax.tree.map(put, tree)


def to_numpy(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array on this process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _looks_like_peer_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return any(s in text for s in _PEER_SIGNS)


@contextlib.contextmanager
def peer_guard(what: str, timeout_s: float | None = None):
    """Run a multi-process step: a collective error caused by a dead peer becomes a
    `PeerFailure` naming the step and this process; with `timeout_s`, a watchdog prints a
    message and ends the process (exit EXIT_TIMEOUT) if the step has not finished."""
    done = threading.Event()
    me = f"process {jax.process_index()}/{jax.process_count()}"
    if timeout_s is not None:

        def watch():
            if not done.wait(timeout_s):
                sys.stderr.write(
                    f"kvjax.parallel: {what} did not finish within {timeout_s:.0f} s in {me}; "
                    "another process has probably died or hung. Exiting.\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_TIMEOUT)

        threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    except Exception as err:
        if jax.process_count() > 1 and _looks_like_peer_failure(err):
            raise PeerFailure(f"{what} failed in {me}: another process of the job stopped ({err})") from err
        raise
    finally:
        done.set()


def launch_local(
    num_processes: int,
    argv: Sequence[str],
    *,
    port: int,
    devices_per_process: int = 1,
    env: dict | None = None,
    **popen_kwargs,
) -> list[subprocess.Popen]:
    """Start `num_processes` CPU processes of `python argv...` on this machine, each with
    KVJAX_COORDINATOR / KVJAX_NUM_PROCESSES / KVJAX_PROCESS_ID set (for trying multi-host
    code, and for the tests)."""
    procs = []
    for pid in range(num_processes):
        e = dict(os.environ if env is None else env)
        e.update(
            KVJAX_COORDINATOR=f"127.0.0.1:{port}",
            KVJAX_NUM_PROCESSES=str(num_processes),
            KVJAX_PROCESS_ID=str(pid),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        )
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, **popen_kwargs))
    return procs
