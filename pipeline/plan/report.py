"""The plan as a JSON-ready dict and as the two tables the CLI prints (memory, GPU-hours)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.plan.build import StagePlan
from pipeline.plan.cost import Gpu, Line
from pipeline.plan.fit import COMPONENTS

GIB = 2**30
HEADERS = {"weights": "weights", "gradients": "grads", "optimizer": "optimizer", "ema": "EMA",
           "activations": "activations/other"}


@dataclass
class Budget:
    """The device memory a plan is fitted to, less what tensors cannot use."""

    device: int   # bytes of device memory
    reserve: int  # bytes kept free (CUDA context, allocator slack)

    @property
    def usable(self) -> int:
        return self.device - self.reserve


def stage_dict(p: StagePlan, budget: Budget) -> dict:
    """A stage's JSON: its figures at the profile's micro-batch (traced, or read off the line through the
    two traced sizes: ``extrapolated``) and the largest micro-batch within ``budget``."""
    b, fit = p.micro_batch, p.fit
    largest = fit.largest(budget.usable)
    return {"stage": p.stage, "code": p.code, "micro_batch": b, "peak_bytes": round(fit.peak(b)),
            "components_bytes": {k: round(v) for k, v in fit.split(b).items()},
            "weights_by_model_bytes": fit.small.weights,
            "flops_per_call": round(fit.at(b, lambda c: c.trace.flops)),
            "traced_micro_batches": [fit.small.batch, fit.large.batch], "extrapolated": not fit.traced(b),
            "largest_micro_batch": largest, "fits": fit.peak(b) <= budget.usable,
            "trace_seconds": round(fit.small.trace.seconds + fit.large.trace.seconds, 1), "notes": p.notes}


def _table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0, 1)) -> str:
    """A Markdown table; columns ``left`` aligned left, the others (figures) right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "| " + " | ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths)) + " |"
    rule = "|" + "|".join(f"{'-' * (w + 1)}{'-' if i in left else ':'}" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt.format(*headers), rule, *(fmt.format(*r) for r in rows)])


def memory_table(stages: list[dict], budget: Budget) -> str:
    headers = ["stage", "micro-batch", "peak GiB", *(HEADERS[k] for k in COMPONENTS), "fits",
               f"largest micro-batch <= {budget.usable / GIB:.0f} GiB", "traced at"]
    rows = []
    for s in stages:
        mark = "~" if s["extrapolated"] else ""
        largest = "no growth" if s["largest_micro_batch"] is None else str(s["largest_micro_batch"])
        split = (f"{s['components_bytes'][k] / GIB:.1f}" for k in COMPONENTS)
        rows.append([s["stage"], str(s["micro_batch"]), f"{mark}{s['peak_bytes'] / GIB:.1f}", *split,
                     "yes" if s["fits"] else "NO", largest, ", ".join(map(str, s["traced_micro_batches"]))])
    return _table(headers, rows)


def cost_table(lines: list[dict]) -> str:
    """``lines``: pipeline.plan.cost.Line.as_dict()s."""
    rows = [[(f"({x['opt_in']}) " if x["opt_in"] else "") + x["stage"], x["work"], f"{x['seconds']:.2f}",
             f"{x['gpu_hours']:.1f}", x["source"]] for x in lines]
    return _table(["stage", "work", "s each", "GPU-h", "time from"], rows, left=(0, 1, 4))


def totals(lines: list[Line]) -> dict[str, float]:
    main = sum(x.gpu_hours for x in lines if not x.opt_in)
    out = {"main": main}
    for group in sorted({x.opt_in for x in lines if x.opt_in}):
        out[group] = sum(x.gpu_hours for x in lines if x.opt_in == group)
    out["all"] = sum(x.gpu_hours for x in lines)
    return out


def render(plan: dict, gpu: Gpu, budget: Budget) -> str:
    t = plan["gpu_hours"]
    opt = ", ".join(f"+{v:.0f} with {k}" for k, v in t.items() if k not in ("main", "all"))
    return "\n".join([
        f"Memory plan (traced) -- profile {plan['profile']}: {budget.device / GIB:.0f} GiB device, "
        f"{budget.reserve / GIB:.0f} GiB reserved -> {budget.usable / GIB:.0f} GiB for tensors",
        memory_table(plan["stages"], budget),
        "~ = extrapolated linearly from the traced micro-batches; largest micro-batch likewise.",
        "", f"GPU-hours on one {gpu.describe()}", cost_table(plan["cost"]),
        f"total: {t['main']:.0f} GPU-h for the pipeline ({opt}; all: {t['all']:.0f} GPU-h)",
        f"traced in {plan['wall_seconds']:.0f} s on {plan['threads']} CPU thread(s)",
    ])
