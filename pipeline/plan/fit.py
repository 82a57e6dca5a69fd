"""A stage's figures as a function of its micro-batch: traced at two sizes, linear in between and beyond.

Memory and FLOPs of the traced calls grow linearly with the micro-batch (every sample's activations and
work are its own; weights, gradients, optimizer state and EMA do not grow): two traces give the line, and
the largest micro-batch that fits a memory budget is read from it. The traced sizes are reported with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from pipeline.plan.steps import Call

COMPONENTS = ("weights", "gradients", "optimizer", "ema", "activations")  # activations/other: + inputs


def components(call: Call) -> dict[str, int]:
    """The peak's split: CATEGORIES with the inputs counted among activations/other."""
    c = call.trace.by_category
    split = {k: c.get(k, 0) for k in COMPONENTS}
    split["activations"] += c.get("inputs", 0)
    return split


@dataclass
class Linear:
    """Two traced calls of one stage at micro-batches ``small.batch`` < ``large.batch``."""

    small: Call
    large: Call

    def __post_init__(self):
        if not self.small.batch < self.large.batch:
            raise ValueError(f"Linear: traced micro-batches must grow, got {self.small.batch}, {self.large.batch}")

    def at(self, batch: int, figure: Callable[[Call], float]) -> float:
        """``figure`` of a call at ``batch`` (exact at a traced size)."""
        for call in (self.small, self.large):
            if call.batch == batch:
                return float(figure(call))
        lo, hi = figure(self.small), figure(self.large)
        return lo + (hi - lo) * (batch - self.small.batch) / (self.large.batch - self.small.batch)

    def traced(self, batch: int) -> bool:
        return batch in (self.small.batch, self.large.batch)

    def peak(self, batch: int) -> float:
        return self.at(batch, lambda c: c.trace.peak_bytes)

    def split(self, batch: int) -> dict[str, float]:
        return {k: self.at(batch, lambda c, k=k: components(c)[k]) for k in COMPONENTS}

    def largest(self, budget: float) -> int | None:
        """The largest micro-batch whose peak is within ``budget`` bytes (0: not even one sample; None: the
        peak does not grow with the micro-batch)."""
        slope = (self.large.trace.peak_bytes - self.small.trace.peak_bytes) / (self.large.batch - self.small.batch)
        if slope <= 0:
            return None
        fixed = self.small.trace.peak_bytes - slope * self.small.batch
        return max(0, math.floor((budget - fixed) / slope))
