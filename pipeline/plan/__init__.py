"""Memory and GPU-hours of a profile, known before it runs, with no GPU (issue 24).

    python -m pipeline.plan [--profile sd3] [--device-memory 80GiB] [--params params.yaml]
                            [--out reports/plan.json]     (--help: GPU peak, utilisation, reserve)

Each model stage's own code runs one call at the profile's real model configurations on fake tensors
(torch's FakeTensorMode: nothing is allocated) while live tensor bytes and FLOPs are counted; the peak is
split into weights, gradients, optimizer state, EMA and activations/other. From two traced micro-batch
sizes the largest micro-batch that fits the device follows; FLOPs (or a measured rate) x the profile's
rows and steps give the GPU-hours, with the ablation matrix and the studies as opt-in lines.

Modules, in the order data flows:
  trace   the fake world, the live-bytes counter, the FLOP counter, ``trace``
  models  where each model's config comes from (workspace, hub cache, configs/reference), fake builds
  steps   one traced call per stage, of the stage's own code
  fit     two traced sizes -> a line in the micro-batch; the largest that fits
  build   trace every stage of a profile
  cost    a call's time (measured or FLOPs) and GPU-hour lines
  bill    the lines of the pipeline, the ablations and the studies
  report  JSON-ready dict, tables
  cli     ``python -m pipeline.plan``

What "traced" means and does not (the README's "Memory plan (traced)" lists it): tensor storages on the
device, as CPU kernels allocate them (CPU flash attention keeps no score matrix, like CUDA's); not the CUDA
context, the caching allocator's rounding and fragmentation (``--reserve``), nor kernel workspaces.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config


def make_plan(cfg: Config, raw: dict, gpu, budget, root: Path, studies: Path, log=print) -> dict:
    """The plan of ``cfg`` as a JSON-ready dict: config sources, per-stage memory, cost lines and totals.
    ``raw``: its params as a dict, to take the rates of this workspace's runs made with them (None: FLOPs
    only)."""
    from pipeline.plan.bill import ablation_lines, main_lines, study_lines, test_images
    from pipeline.plan.build import trace_stages
    from pipeline.plan.cost import split_rows
    from pipeline.plan.report import stage_dict, totals

    stages, flops, sources = trace_stages(cfg, root, log)
    lines, rates = main_lines(cfg, raw, {p.stage: p for p in stages}, flops, gpu, root)
    rows = split_rows(cfg, root)
    test = test_images(cfg, rows)
    lines += ablation_lines(cfg, rates, test)
    if studies.exists():
        enc = next(x for x in lines if x.stage == "encode")
        lines += study_lines(cfg, rates, test, rows, enc.seconds, cfg.runtime.encode_batch_size, studies)
    return {"sources": sources, "gpu": vars(gpu), "device_memory_bytes": budget.device,
            "reserve_bytes": budget.reserve, "rows": rows,
            "stages": [stage_dict(p, budget) for p in stages], "cost": [x.as_dict() for x in lines],
            "gpu_hours": totals(lines)}
