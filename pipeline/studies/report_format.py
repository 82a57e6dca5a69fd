"""How the studies' report modules write what they found: a CI as text, a summary's nested value, the PNG
resolution. Report side only (stage studies_report): no run stage imports this module.

The verdict on a CI (which side of 0 it lies) is pipeline.evaluation.stats.ci_side, shared with the main
report; each study words it in its own module."""

from __future__ import annotations

import math

DPI = 120  # the studies' figures (reports/studies/*.png); pipeline.reporting.figures.save writes them


def has_ci(ci: dict | None) -> bool:
    """Whether ``ci`` (a pipeline.evaluation.stats.paired_difference dict) is there to write or draw: a mean
    that is not None or NaN."""
    return bool(ci) and ci.get("mean") is not None and not math.isnan(ci["mean"])


def ci_text(ci: dict | None, nd: int = 2) -> str:
    """``mean [ci_low, ci_high]`` at ``nd`` decimals; "-" where there is no CI (see has_ci)."""
    if not has_ci(ci):
        return "-"
    return f"{ci['mean']:.{nd}f} [{ci['ci_low']:.{nd}f}, {ci['ci_high']:.{nd}f}]"


def dig(d, *keys):
    """``d[k0][k1]...``; None where a level is missing or None (a study whose runs have not all finished)."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d
