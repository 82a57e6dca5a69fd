"""Independent DVC stages on a ``dask.distributed`` cluster: the Prefect flows' DaskTaskRunner when
``flows.dask_address`` names a scheduler (:func:`.concurrent.run_stages`).

Starting one (the scheduler on any machine, one worker per machine, each in this project's environment)::

    dask scheduler --port 8786                                   # machine 0
    dask worker tcp://HOST0:8786 --nworkers 1 --nthreads 1       # each machine: one stage at a time
    python -m pipeline.flows run ablations -S flows.dask_address=tcp://HOST0:8786

What the cluster decides, and what each machine must share:

* Every ready stage is submitted at once; the workers' threads bound how many run at a time (a worker
  with ``--nthreads k`` runs k stages side by side). A stage running on a worker gets its machine's CPUs
  shared by every worker thread on that machine (:func:`stage_threads`), not the flow machine's budget:
  Dask's nanny starts workers with ``OMP_NUM_THREADS=1``, which a stage would otherwise inherit. A model
  stage asked for several processes (params ``launch``) starts them on its worker's machine, on that
  machine's devices: with such stages, give each machine one worker of one thread.
* The workspace is on a shared filesystem mounted at the same path on every machine (each stage runs its
  ``cmd`` there and ``dvc commit``s it there; the DVC cache is the workspace's ``.dvc/cache`` or a shared
  ``cache.dir``); DVC calls are serialised by a file lock in the workspace (:func:`.stages.dvc_lock`),
  which needs a filesystem with working ``fcntl`` locks (NFSv4, Lustre, CephFS; not every NFSv3 mount).
* Workers report their task runs to the flow's Prefect API: set ``PREFECT_API_URL`` to a server every
  machine reaches (a flow on an ephemeral local API can only use workers on its own machine).
"""

from __future__ import annotations

import os


def current_worker():
    """The ``distributed.Worker`` running the calling task, or None outside a Dask worker."""
    try:
        from distributed import get_worker
    except ImportError:         # dask.distributed not installed: never on a worker
        return None
    try:
        return get_worker()
    except ValueError:
        return None


def host_threads(worker) -> int:
    """The Dask worker threads on ``worker``'s machine (every worker of the cluster on that host): how
    many stages may run there at once. Asked of the scheduler over the worker's own connection (a Client
    in the worker would take seconds to start)."""
    from distributed.utils import sync

    workers = sync(worker.loop, worker.scheduler.identity, n_workers=-1)["workers"].values()
    return sum(w["nthreads"] for w in workers if w["host"] == worker.ip) or worker.state.nthreads


def stage_threads(default: int) -> tuple[int, str | None]:
    """(threads, worker address) for a stage about to run here: on a Dask worker, this machine's CPUs
    divided among the worker threads on it (at least 1); elsewhere ``default`` and no address."""
    worker = current_worker()
    if worker is None:
        return default, None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // host_threads(worker)), worker.address
