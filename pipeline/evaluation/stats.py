"""Paired comparisons a reviewer can trust: per-image differences between two models evaluated on the
same test images with the same noise, their mean and a bootstrap confidence interval (scipy), where that
interval lies against 0 (ci_side), and a verdict on an expected ordering."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Verdict = Literal["reproduced", "not significant", "reversed"]


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, n_resamples: int = 10_000,
                      seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired items and its BCa bootstrap ``level`` interval."""
    from scipy.stats import bootstrap

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired_difference: need two 1-d sequences of >= 2 paired values, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("paired_difference: non-finite values")
    mean = float(d.mean())
    if np.ptp(d) == 0:  # every pair differs by the same amount: the bootstrap distribution is a point
        low = high = mean
    else:
        ci = bootstrap((d,), np.mean, confidence_level=level, n_resamples=n_resamples, method="BCa",
                       random_state=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": int(len(d)), "level": level}


def ci_side(diff: dict | None) -> int | None:
    """Where a CI (``paired_difference``'s dict) lies against 0: 1 above it, -1 below it, 0 when it holds 0;
    None when there is no CI to judge (no dict, no finite mean, or a non-finite bound). The one rule every
    report's verdict words stand on."""
    if not diff or diff.get("mean") is None or not math.isfinite(diff["mean"]):
        return None
    low, high = diff["ci_low"], diff["ci_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return 1 if low > 0 else -1 if high < 0 else 0


def verdict(diff: dict, expected: Literal["positive", "negative"] = "positive") -> Verdict:
    """Whether an expected sign of a paired difference is reproduced (the CI excludes 0 on that side),
    not significant (the CI holds 0, or cannot be judged), or reversed (the CI excludes 0 on the other side)."""
    side = ci_side(diff)
    if not side:
        return "not significant"
    return "reproduced" if side == (1 if expected == "positive" else -1) else "reversed"
