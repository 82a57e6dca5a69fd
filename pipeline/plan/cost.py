"""GPU-hours before a run: each stage's amount of work x the time of one traced call.

The time of a call comes, first found:
- ``measured``: the rate a run of this workspace recorded (metrics/distill/<stage>.json samples_per_s),
  taken only when dvc.lock says that run used the active params (every params key the stage lists). The
  run's device is not recorded: the line shows the FLOPs figure beside it (``--ignore-measured``: FLOPs only);
- ``FLOPs``: the traced call's FLOPs at ``Gpu.utilisation`` of ``Gpu.tflops``; a VLM's decoding steps, one
  token each, read every weight once a step: they cost weight bytes at ``utilisation`` of the GPU's memory
  bandwidth (their FLOPs are negligible beside it), up to caption.qwen.max_new_tokens steps (no early stop).

The ablation matrix and the studies are opt-in lines (not in the main total): their run counts come from
params.yaml's ``ablations`` and studies/params.yaml, their per-step figures are the headline student's
(a variant that changes the student's depth or drops the teacher costs somewhat less or more a step).
Checkpoint prefixes are honoured as pipeline.distill.ablation describes them: a run whose stage 1 is
full's at its seed trains only the stage-1 steps beyond full's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline.config import Config

HOUR = 3600.0


@dataclass(frozen=True)
class Gpu:
    """The GPU costs are stated for: dense bf16 peak, memory bandwidth and the share of both achieved."""

    name: str = "H100 SXM"
    tflops: float = 989.0        # bf16 dense, no sparsity
    bandwidth_tbs: float = 3.35  # HBM3
    utilisation: float = 0.4

    def compute_s(self, flops: float) -> float:
        return flops / (self.tflops * 1e12 * self.utilisation)

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (self.bandwidth_tbs * 1e12 * self.utilisation)

    def describe(self) -> str:
        return (f"{self.name}: {self.tflops:g} TFLOP/s bf16, {self.bandwidth_tbs:g} TB/s, "
                f"at {self.utilisation:.0%} utilisation")


@dataclass
class Line:
    """One line of the bill: ``calls`` x ``seconds`` (one call), how the time was obtained, GPU-hours."""

    stage: str
    work: str
    calls: float
    seconds: float
    source: str
    opt_in: str = ""  # "" (the main pipeline) | ablations | studies

    @property
    def gpu_hours(self) -> float:
        return self.calls * self.seconds / HOUR

    def as_dict(self) -> dict:
        return {**asdict(self), "gpu_hours": self.gpu_hours}


UNKNOWN_ROWS = 1000  # rows a split when the data is not built yet: lines are then per 1000 rows a split


def split_rows(cfg: Config, root: Path = Path(".")) -> dict[str, int]:
    """Rows per split the triplets hold: data.splits for synthetic scenes (the world split trains the tiny
    world only), else metrics/triplets.json of a run when there is one, else UNKNOWN_ROWS a split."""
    if cfg.triplets.source == "synthetic":
        return {k: v for k, v in cfg.data.splits.model_dump().items() if k != "world"}
    path = root / "metrics" / "triplets.json"
    if path.exists():
        import json

        return json.loads(path.read_text())["splits"]
    return dict.fromkeys(("labelled", "unlabelled", "val", "test"), UNKNOWN_ROWS)


def _lock_params(root: Path, stage: str) -> dict | None:
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) or {}
    return (entry.get("params") or {}).get("params.yaml")


def _dotted(raw: dict, key: str):
    for part in key.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return KeyError
        raw = raw[part]
    return raw


def measured_rate(root: Path, raw: dict, dvc_stage: str, metrics: str, key: str) -> float | None:
    """``key`` of ``metrics`` (samples per second) when dvc.lock's record of ``dvc_stage`` has the active
    params ``raw`` (the merged params dict) for every key the stage lists; else None."""
    locked, path = _lock_params(root, dvc_stage), root / metrics
    if not locked or not path.exists():
        return None
    if any(_dotted(raw, k) != v for k, v in locked.items()):
        return None
    import json

    rate = json.loads(path.read_text()).get(key)
    return float(rate) if rate else None


def distill_line(stage: str, cfg: Config, flops: float, gpu: Gpu, rate: float | None, steps: int | None = None,
                 opt_in: str = "", label: str | None = None) -> Line:
    """Distill ``stage``: optimizer steps x accumulation micro-batches of ``flops`` each (or a measured
    ``rate``, samples per second)."""
    d = cfg.distill
    train = getattr(d, stage).train
    steps = train.steps if steps is None else steps
    micro = d.gradient_accumulation_steps
    work = f"{steps} steps x {micro} micro-batches of {train.batch_size}"
    if rate:  # the run's device is not recorded: the FLOPs figure is shown beside it
        return Line(label or f"distill_{stage}", work, steps * micro, train.batch_size / rate,
                    f"measured: {rate:.3g} samples/s by this workspace's run (metrics/distill/{stage}.json, "
                    f"device not recorded); FLOPs would give {gpu.compute_s(flops):.2f} s", opt_in)
    return Line(label or f"distill_{stage}", work, steps * micro, gpu.compute_s(flops),
                f"FLOPs: {flops / 1e12:.0f} TFLOP a micro-batch", opt_in)


def batches_line(stage: str, rows: int, batch: int, seconds: float, source: str, opt_in: str = "",
                 what: str = "rows") -> Line:
    calls = math.ceil(rows / batch)
    return Line(stage, f"{rows} {what} / {batch} a call", calls, seconds, source, opt_in)
