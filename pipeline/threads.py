"""Elastic CPU threads: a stage the concurrent executor runs (pipeline.orchestration.concurrent) may be given
more threads while it runs (a neighbour finished and nothing else is ready) and later be asked to give them
back. The executor writes the count into the file named by ``$REFINE_THREADS_FILE``; long loops (training
steps, sampling steps) call :func:`follow`, which applies it with ``torch.set_num_threads`` (torch's
intra-op pool; the count a process starts with comes from OMP_NUM_THREADS as before).

Outside the executor the variable is unset and :func:`follow` does nothing. It reads the file at most every
``interval`` seconds, so a loop may call it every step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "REFINE_THREADS_FILE"
_last_read = float("-inf")


def follow(interval: float = 2.0) -> int | None:
    """Apply the executor's current thread count for this process, if it set one; returns the count applied
    (None: no file, not due, or unreadable, in which case nothing changes)."""
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
    import torch

    if n >= 1 and n != torch.get_num_threads():
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
