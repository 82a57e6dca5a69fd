"""The fan-out speedup, measured: the same DVC stages run twice in one workspace, back to back, forced --
first one after another with every thread each (what ``dvc repro`` does), then side by side by the
concurrent executor (:func:`.concurrent.run_concurrently`, its thread split) -- and the two wall times and
their ratio written as JSON.

    python -m pipeline.orchestration.fanout --workspace W --jobs 2 --out reports/fanout.json STAGE [STAGE ...]

Both runs recompute the stages' outputs (and ``dvc commit`` them): run it in a scratch clone of a finished
workspace, not in one whose outputs you want to keep bit for bit (thread counts change float summation
order). Stages with a path between them are still ordered by the DAG in the side-by-side run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.atomic import write_file
from pipeline.orchestration.concurrent import default_jobs, run_concurrently, run_stage_command
from pipeline.orchestration.dag import dvc_stages


def measure(workspace: str | Path, stages: list[str], jobs: int) -> dict:
    """Run ``stages`` sequentially (``jobs`` threads each), then concurrently (``jobs`` threads shared);
    returns both wall times, each stage's seconds and threads per mode, and the speedup."""
    workspace = Path(workspace).resolve()
    wanted = set(stages)
    chosen = [s for s in dvc_stages(workspace) if s.address in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"not DVC stages of {workspace}: {sorted(wanted - {s.address for s in chosen})}")
    start = time.monotonic()
    sequential = [run_stage_command(s.address, s.cmd, workspace, jobs, check=False) for s in chosen]
    sequential_s = time.monotonic() - start
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        start = time.monotonic()
        side_by_side = run_concurrently(
            chosen, workspace, jobs,
            lambda st, n: pool.submit(run_stage_command, st.address, st.cmd, workspace, n, check=False),
            force=True)
        concurrent_s = time.monotonic() - start
    keep = ("stage", "threads", "seconds")
    return {"stages": [s.address for s in chosen], "jobs": jobs, "cpus": os.cpu_count(),
            "sequential_seconds": round(sequential_s, 3), "concurrent_seconds": round(concurrent_s, 3),
            "speedup": round(sequential_s / concurrent_s, 4),
            "sequential": [{k: r.get(k) for k in keep} for r in sequential],
            "concurrent": [{k: r.get(k) for k in keep} for r in side_by_side]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", help="DVC stage addresses (matrix entries as name@key)")
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--jobs", "-j", type=int, help="CPU threads (default: the CPU count)")
    ap.add_argument("--out", help="write the record (JSON) here")
    args = ap.parse_args(argv)
    record = measure(args.workspace, args.stages, default_jobs(args.jobs))
    text = json.dumps(record, indent=2) + "\n"
    print(text, end="")
    if args.out:
        write_file(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
