"""Wall-clock timing that is right on GPUs, for every benchmark and timed figure in the project.

CUDA kernels run asynchronously: reading the clock right after a call measures the launch, not the work.
Every reading here first waits for the device (``torch.cuda.synchronize``) when CUDA is in use; on CPU
that is a no-op.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the queued work of ``device`` (None: the current CUDA device, if CUDA was ever used)."""
    if device is not None and torch.device(device).type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work."""
    sync(device)
    return time.perf_counter()


@dataclass
class Elapsed:
    seconds: float = 0.0


@contextmanager
def stopwatch(device: torch.device | str | None = None) -> Iterator[Elapsed]:
    """``with stopwatch(device) as t: ...`` then ``t.seconds``: the block's time, device work included."""
    out = Elapsed()
    t0 = clock(device)
    try:
        yield out
    finally:
        out.seconds = clock(device) - t0


def median_ms(fn: Callable[[], object], warmup: int, repeats: int,
              device: torch.device | str | None = None) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (run it under
    ``torch.no_grad()`` yourself for inference)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with stopwatch(device) as t:
            fn()
        times.append(t.seconds)
    return 1000 * statistics.median(times)
