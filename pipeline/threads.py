"""Elastic CPU threads: a stage the concurrent executor runs (pipeline.orchestration.concurrent) may be given
more threads while it runs (a neighbour finished and nothing else is ready) and later be asked to give them
back. The executor writes the count into the file named by ``$REFINE_THREADS_FILE``; long loops (training
steps, sampling steps) call :func:`follow`, which applies it with ``torch.set_num_threads`` (torch's
intra-op pool; the count a process starts with comes from OMP_NUM_THREADS as before).

Outside the executor the variable is unset and :func:`follow` does nothing. It reads the file at most every
``interval`` seconds, so a loop may call it every step.

A stage launched on several processes (pipeline/launch.py) shares its threads among its ranks on a machine
(:func:`share`): the launcher sizes each CPU rank's pools (:data:`THREAD_VARS`) to its share, and
:func:`follow` applies a rank's share of the executor's count (LOCAL_WORLD_SIZE: torchrun's ranks here).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "REFINE_THREADS_FILE"
# Thread pools a process may start: OpenMP (torch's intra-op pool follows OMP_NUM_THREADS), MKL, OpenBLAS,
# numexpr, Accelerate, rayon (tokenizers, polars).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "NUMEXPR_MAX_THREADS", "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS")
_last_read = float("-inf")


def share(threads: int, ranks: int) -> int:
    """Each of ``ranks`` processes' equal share of ``threads``, at least 1."""
    return max(1, threads // max(1, ranks))


def follow(interval: float = 2.0) -> int | None:
    """Apply the executor's current thread count for this process (a launched rank: its share), if it set
    one; returns the count applied (None: no file, not due, or unreadable, in which case nothing changes)."""
    global _last_read
    path = os.environ.get(ENV)
    now = time.monotonic()
    if not path or now - _last_read < interval:
        return None
    _last_read = now
    try:
        n = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    if n < 1:
        return None
    n = share(n, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))   # the count is the stage's, for all its ranks here
    import torch

    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        return n
    return None


def set_threads(path: str | Path, threads: int) -> None:
    """Ask the process that follows ``path`` to use ``threads`` threads (written whole: temp file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{int(threads)}\n")
    os.replace(tmp, path)
