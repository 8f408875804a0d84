"""Multi-process start-up: `jax.distributed.initialize()` when launched as several processes."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize() -> None:
    """Join the other processes when this is a multi-process launch; a no-op for a single process.

    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` select an explicit local
    coordinator (used by the two-process test); otherwise JAX detects the cluster itself.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif _launched_as_several():
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _launched_as_several() -> bool:
    """SLURM, Open MPI or a Cloud TPU pod slice with more than one host."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or len([h for h in hosts.split(",") if h]) > 1
    )
