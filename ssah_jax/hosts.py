"""The processes of a run: one per host on a TPU pod slice or a multi-node GPU job, one on a
single machine.

Every process runs the same command. Training is one SPMD program over the global mesh: each
host feeds its own rows of the global batch (:mod:`ssah_jax.data.batching`) and orbax writes
checkpoints collectively. Evaluation and generation split their prompts over the hosts, each
decoding its share with a whole copy of the model on its first device, and :func:`gather` hands
every process all the rows, so what follows runs unchanged. Files other than checkpoints (run
records, metrics, rows, reports, plots, exports) are written by process 0 alone
(:func:`is_main`), and the others wait at a barrier (:func:`sync`) before they read one; the
workdir must be on a filesystem every host sees (NFS, or a GCS FUSE mount without a metadata
cache on a TPU VM).

On one process every function here is the trivial one (no initialisation, no collectives).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to the run's other processes (``jax.distributed.initialize``).

    Without arguments JAX detects the cluster: a Cloud TPU VM slice, SLURM, Open MPI, or a
    Kubernetes job; set all three to start processes by hand (e.g. several on one machine:
    ``localhost:PORT``, with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` each).
    Must run before anything touches a device.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_main() -> bool:
    """True in process 0: the one that writes files and shows progress."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reached the barrier ``name`` (e.g. files process 0 wrote are
    complete before the others read them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def my_block(n: int, size: int) -> slice:
    """The items this process takes of a round of ``n <= size * processes`` items: process ``i``
    takes the ``i``-th block of ``size`` (the blocks of a single process's loop over the same
    items, so a batch holds the same rows however many hosts run); :func:`gather` puts the
    blocks back together."""
    if n > size * jax.process_count():
        raise ValueError(f"a round of {n} items is more than {jax.process_count()} blocks of {size}")
    i = jax.process_index()
    return slice(min(i * size, n), min((i + 1) * size, n))


def gather(items: list[Any]) -> list[Any]:
    """Every process's ``items`` (JSON-serialisable), concatenated in process order, on every
    process; ``items`` itself on one process."""
    if jax.process_count() == 1:
        return list(items)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(items).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    blobs = multihost_utils.process_allgather(padded)
    out: list[Any] = []
    for blob, size in zip(blobs, np.asarray(sizes).reshape(-1)):
        out.extend(json.loads(bytes(blob[: int(size)]).decode()))
    return out


def fetch(tree: Any) -> Any:
    """``tree``'s arrays as whole numpy arrays on every process (arrays sharded over several
    hosts are gathered; every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(whole, tree)
