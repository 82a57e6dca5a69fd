"""Prefect 3 flows that run the DVC pipeline; DVC stays the one description of the DAG and the one cache.

* The stage order comes from DVC itself (``dvc.repo.Repo(root).index.graph``); a flow picks a sub-DAG by
  target stages (plus everything upstream of them) or by a glob on stage names (``ablat*``).
* Stages with no path between them run side by side (:mod:`pipeline.orchestration.concurrent`), within
  ``jobs`` CPU threads (``--jobs N``, ``flows.jobs``, default the CPU count): each is one Prefect task
  that runs the stage's command with its share of the threads (OMP_NUM_THREADS, ...), then records it
  with ``dvc commit`` (concurrent ``dvc repro`` calls would fail on DVC's lock). With ``jobs`` 1 each
  stage is one task running ``dvc repro --single-item <stage>``, one after another. Either way a stage's
  output is streamed into its task's log; a failure raises :class:`StageFailed` naming the stage and the
  tail of its output. Transient failures are retried (``flows.retries`` in params); validation failures
  (:class:`GateFailed`, stages matching ``flows.no_retry_stages``) are not.
* Artifacts: one table per Great Expectations gate (``metrics/gates/*.json``), one table of the run's
  metrics (``metrics/**/*.json``), the report (``reports/report.md``) and the run's parameters.
* Scale-out: a model stage's own command starts its processes, one per device (params ``launch``,
  pipeline/launch.py), so a flow runs each stage's ordinary command and gets the same processes as
  ``dvc repro``; such a stage runs alone. Independent stages fan out to the workers of a dask.distributed
  cluster when ``flows.dask_address`` names its scheduler (:mod:`pipeline.orchestration.cluster`).

This module holds the flows, their deployments (:func:`serve`) and the CLI; the pieces are in
:mod:`pipeline.orchestration` (settings, dag, stages, shards, artifacts, parameters), whose public names
are re-exported here.

CLI: ``python -m pipeline.flows {run,serve,dag} ...`` (``--help`` on each); ``run full --jobs N``
is what ``make run`` does (``dvc repro`` is its sequential equivalent); ``--wall-time FILE`` records a
run's wall time and each stage's threads and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from pipeline.orchestration.artifacts import (
    GATES_DIR,
    METRICS_DIR,
    REPORT,
    artifact_key,
    gate_failures,
    metric_rows,
    publish_artifacts,
)
from pipeline.orchestration.concurrent import (
    concurrent_flow,
    concurrent_stage_task,
    default_jobs,
    run_concurrently,
    run_stage,
    run_stages,
)
from pipeline.orchestration.dag import Stage, dvc_stages, product_stages, select_stages, stage_matches
from pipeline.orchestration.parameters import apply_parameters, record_parameters
from pipeline.orchestration.settings import FlowSettings, flow_settings, launches_ranks
from pipeline.orchestration.shards import dask_task_runner, merge_shards, shard_dir
from pipeline.orchestration.stages import (
    DVC,
    TAIL_LINES,
    GateFailed,
    NotRetried,
    StageFailed,
    _retry_transient,
    commit_stage,
    dvc_stage_is_current,
    dvc_stage_task,
    run_dvc_stage,
    run_logger,
    stream_command,
)

__all__ = [
    # flows and CLI (this module)
    "EVALUATE_STAGES", "FLOWS", "ablations_flow", "evaluate_flow", "main", "pipeline_flow", "run_pipeline",
    "serve", "timed_run",
    # re-exported from pipeline.orchestration
    "DVC", "GATES_DIR", "METRICS_DIR", "REPORT", "TAIL_LINES", "FlowSettings", "GateFailed",
    "NotRetried", "Stage", "StageFailed", "_retry_transient",
    "apply_parameters", "artifact_key", "commit_stage", "concurrent_flow", "concurrent_stage_task",
    "dask_task_runner", "default_jobs", "dvc_stage_is_current", "run_concurrently", "run_stage", "run_stages",
    "dvc_stage_task", "dvc_stages", "flow_settings", "gate_failures", "launches_ranks",
    "merge_shards", "metric_rows", "publish_artifacts", "record_parameters", "run_dvc_stage",
    "select_stages", "shard_dir", "stream_command",
]

EVALUATE_STAGES = ("evaluate", "benchmark", "report")


# ----------------------------------------------------------------------------- flows


def run_pipeline(workspace: str | Path = ".", targets: list[str] | None = None, *, upstream: bool = True,
                 profile: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False,
                 missing_ok: bool = False, jobs: int | None = None) -> list[dict]:
    """The body shared by the flows (call it inside a flow): parameters, the selected stages (side by side
    within ``jobs`` threads, default ``flows.jobs`` or the CPU count; 1: in DAG order, one at a time), then
    artifacts (published also when a stage fails) and the gate check."""
    workspace = str(Path(workspace).resolve())
    log = run_logger()
    record = apply_parameters(workspace, profile, overrides)
    settings = flow_settings(workspace)
    # No targets: the product pipeline (the root dvc.yaml); sub-pipelines such as studies/dvc.yaml run
    # when targeted (their addresses are 'studies/dvc.yaml:NAME'), so `make run` keeps its time budget.
    everything = dvc_stages(workspace)
    stages = (select_stages(everything, targets, upstream=upstream, missing_ok=missing_ok) if targets
              else product_stages(everything))
    if not stages:
        raise ValueError(f"no DVC stage selected by {targets!r} in {workspace}")
    record_parameters(record, [s.address for s in stages])
    _refuse_machines(workspace)
    jobs = default_jobs(jobs, settings)
    how = (f"on the Dask cluster at {settings.dask_address}" if settings.dask_address
           else f"side by side within {jobs} threads" if jobs > 1 else "in DAG order, one at a time")
    log.info("running %d DVC stages (%s): %s", len(stages), how, ", ".join(s.address for s in stages))
    try:
        results = run_stages(stages, workspace, settings, jobs, force)
    except BaseException:
        try:                              # what the gates and metrics said, also for a failed run
            publish_artifacts(workspace)
        except Exception as exc:          # never hide the stage's failure behind an artifact error
            log.warning("could not publish artifacts: %r", exc)
        raise
    published = publish_artifacts(workspace)
    failed = [f for fs in published["gates"].values() for f in fs]
    if failed:
        raise GateFailed("gates", "validation gate failed: " + "; ".join(failed))
    return results


def _refuse_machines(workspace: str) -> None:
    """A stage on M > 1 machines needs its command running on every machine at once; the flow starts it on
    one, which would wait at the rendezvous for ever: refused before anything runs (README "Scaling out")."""
    from pipeline.config import load
    from pipeline.launch import settings as launch_settings

    machines = launch_settings(load(Path(workspace) / "params.yaml")).machines
    if machines > 1:
        raise ValueError(f"launch.machines is {machines}: the flows run a stage on one machine; run stages on "
                         "several machines with the README's recipe (dvc repro STAGE on machine 0, the stage's "
                         "command on the others), or set launch.machines: 1")


@flow(name="refine-control-pipeline", log_prints=True)
def pipeline_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                  targets: list[str] | None = None, force: bool = False, jobs: int | None = None) -> list[dict]:
    """The full pipeline (every DVC stage), or the sub-DAG up to ``targets``."""
    return run_pipeline(workspace, targets, profile=profile, overrides=overrides, force=force, jobs=jobs)


@flow(name="refine-control-ablations", log_prints=True)
def ablations_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                   pattern: str = "ablat*", upstream: bool = True, force: bool = False,
                   jobs: int | None = None) -> list[dict]:
    """The ablation stages (names matching ``pattern``, e.g. every ``ablate@...`` matrix entry) and,
    with ``upstream``, whatever they depend on (DVC skips what is up to date)."""
    return run_pipeline(workspace, [pattern], upstream=upstream, profile=profile, overrides=overrides,
                        force=force, jobs=jobs)


@flow(name="refine-control-evaluate", log_prints=True)
def evaluate_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                  stages: list[str] | None = None, force: bool = False, jobs: int | None = None) -> list[dict]:
    """Evaluate + report only, on the models already in the workspace: ``stages`` (default: those of
    evaluate, benchmark, report that exist), without their upstream."""
    return run_pipeline(workspace, stages or list(EVALUATE_STAGES), upstream=False, profile=profile,
                        overrides=overrides, force=force, missing_ok=stages is None, jobs=jobs)


FLOWS = {"full": pipeline_flow, "ablations": ablations_flow, "evaluate": evaluate_flow}


# ----------------------------------------------------------------------------- CLI


def serve(workspace: str = ".", limit: int = 1) -> None:
    """Serve one deployment per flow from this machine (``limit=1``: runs never overlap in a workspace)."""
    from prefect import serve as prefect_serve

    params = {"workspace": str(Path(workspace).resolve())}
    prefect_serve(*(f.to_deployment(name=f"{key}-local", parameters=params, tags=["refine-control"])
                    for key, f in FLOWS.items()), limit=limit)


def timed_run(flow_, kwargs: dict[str, Any], out: str | Path | None = None) -> Any:
    """Run ``flow_(**kwargs)``; print its wall time and, with ``out``, write it with each stage's threads
    and seconds as JSON (also when the run fails)."""
    start, results, error = time.monotonic(), None, None
    try:
        results = flow_(**kwargs)
        return results
    except BaseException as exc:
        error = exc
        raise
    finally:
        wall = time.monotonic() - start
        print(f"{flow_.name}: wall time {wall:.1f} s" + (f" (failed: {type(error).__name__})" if error else ""),
              file=sys.stderr)
        if out:
            try:
                jobs = default_jobs(kwargs.get("jobs"), flow_settings(kwargs.get("workspace", ".")))
            except Exception:      # noqa: BLE001 -- a bad params file: the run's own error says so
                jobs = kwargs.get("jobs")
            record = {"flow": flow_.name, "jobs": jobs, "wall_seconds": round(wall, 3),
                      "ok": error is None, "error": None if error is None else str(error).splitlines()[0],
                      "stages": results or []}
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a flow now")
    r.add_argument("flow", choices=sorted(FLOWS))
    r.add_argument("--workspace", default=".")
    r.add_argument("--profile")
    r.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE", help="params override")
    r.add_argument("--target", action="append", help="full flow: stop at these stages")
    r.add_argument("--force", action="store_true")
    r.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="CPU threads shared by stages run side by side (default: flows.jobs, else the CPU "
                        "count); 1: one stage at a time (dvc repro --single-item)")
    r.add_argument("--wall-time", metavar="FILE",
                   help="write the run's wall time and each stage's threads and seconds (JSON) to FILE")
    s = sub.add_parser("serve", help="serve the three deployments from this machine")
    s.add_argument("--workspace", default=".")
    s.add_argument("--limit", type=int, default=1)
    d = sub.add_parser("dag", help="print the stage order DVC gives")
    d.add_argument("--workspace", default=".")
    d.add_argument("targets", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        kw: dict[str, Any] = {"workspace": args.workspace, "profile": args.profile,
                              "overrides": _parse_sets(args.set) or None, "force": args.force, "jobs": args.jobs}
        if args.target:
            if args.flow != "full":
                raise SystemExit("--target applies to the full flow")
            kw["targets"] = args.target
        timed_run(FLOWS[args.flow], kw, args.wall_time)
    elif args.cmd == "serve":
        serve(args.workspace, args.limit)
    elif args.cmd == "dag":
        for st in select_stages(dvc_stages(args.workspace), args.targets or None):
            print(st.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
