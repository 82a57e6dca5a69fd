"""Scale-out: a sharded command (``--shard i/N``) fanned out through prefect-dask's DaskTaskRunner (local
processes, or ``flows.dask_address``), each shard writing its own folder, then the shard folders merged
into the stage's output; :func:`run_sharded_stage` runs a DVC stage that way (``flows.sharded``)."""

from __future__ import annotations

import collections
import os
import shlex
import shutil
from pathlib import Path
from typing import Iterable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.atomic import MARKER, check_replaceable, write_dir
from pipeline.orchestration.settings import FlowSettings, ShardSpec
from pipeline.orchestration.stages import StageFailed, run_logger, run_outside_repro, stream_command


def shard_dir(out: str | Path, index: int) -> Path:
    return Path(f"{out}.shards") / f"shard-{index}"


@task(name="shard", task_run_name="shard-{index}-of-{num_shards}", cache_policy=NO_CACHE, retries=1)
def shard_task(command: str, index: int, num_shards: int, out: str, workspace: str) -> str:
    """Run one shard (``command`` formatted with shard, index, num_shards, out) writing to its own folder."""
    target = Path(workspace) / shard_dir(out, index)
    check_replaceable(target)   # a shard folder is ours (it carries the marker) or new
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    cmd = command.format(shard=f"{index}/{num_shards}", index=index, num_shards=num_shards,
                         out=shlex.quote(str(shard_dir(out, index))))
    run_logger().info("$ %s  (in %s)", cmd, workspace)
    rc, tail = stream_command(cmd, workspace)
    if rc:
        raise StageFailed(f"shard {index}/{num_shards}", f"shard {index}/{num_shards} failed (exit {rc})", tail, rc)
    return str(target)


def merge_shards(shard_dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Union of the shard folders into ``out``: distinct files are copied; a file name present in several
    shards is concatenated when it is a table (.parquet, .csv, .jsonl) and is an error otherwise. Parquet
    tables with an ``id`` column are ordered by id (the order the sharded stages write unsharded). Files
    identical in every shard are kept once; ``out`` is written atomically (pipeline.atomic)."""
    out = Path(out)
    seen: dict[Path, list[Path]] = collections.defaultdict(list)
    for d in shard_dirs:
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file() and p.name != MARKER):
            seen[f.relative_to(d)].append(f)
    with write_dir(out) as tmp:
        written = [_merge_one(rel, files, tmp) for rel, files in sorted(seen.items())]
    return [out / w.relative_to(tmp) for w in written]


def _merge_one(rel: Path, files: list[Path], root: Path) -> Path:
    import pandas as pd

    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if len(files) == 1 or all(f.read_bytes() == files[0].read_bytes() for f in files[1:]):
        shutil.copy2(files[0], dest)
    elif rel.suffix == ".parquet":
        parts = [pd.read_parquet(f) for f in files]
        table = pd.concat(parts, ignore_index=True)
        if all("id" in p.columns for p in parts):   # keyed tables: rows ordered by id, as unsharded
            table = table.sort_values("id", kind="stable").reset_index(drop=True)
        table.to_parquet(dest, index=False)
    elif rel.suffix in {".jsonl", ".csv"}:
        with dest.open("w") as fh:
            for i, f in enumerate(files):
                lines = f.read_text().splitlines(keepends=True)
                fh.writelines(lines[1:] if rel.suffix == ".csv" and i else lines)
    else:
        raise ValueError(f"merge: {rel} is written by {len(files)} shards with different contents and is not "
                         "a table")
    return dest


def dask_task_runner(address: str | None = None, n_workers: int | None = None, num_shards: int = 1):
    """prefect-dask's DaskTaskRunner: a cluster at ``address``, else local processes (one thread each)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    n = n_workers or max(1, min(num_shards, os.cpu_count() or 1))
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="sharded-command", log_prints=True)
def sharded_flow(command: str, num_shards: int, out: str, workspace: str = ".", merge: bool = True) -> list[str]:
    """Fan ``command`` out over ``num_shards`` shards on the flow's task runner, then merge into ``out``."""
    futures = [shard_task.submit(command, i, num_shards, out, str(Path(workspace).resolve()))
               for i in range(num_shards)]
    dirs = [f.result() for f in futures]
    if merge:
        merged = merge_shards(dirs, Path(workspace) / out)
        run_logger().info("merged %d shards into %s (%d files)", num_shards, out, len(merged))
    return dirs


def fan_out(command: str, num_shards: int, out: str, workspace: str | Path = ".", *,
            address: str | None = None, n_workers: int | None = None, merge: bool = True) -> list[str]:
    """Run a sharded command through DaskTaskRunner (``address`` or local processes) and merge the shards.

    ``command`` is formatted with ``{shard}`` (``i/N``), ``{index}``, ``{num_shards}`` and ``{out}`` (the
    shard's folder, relative to ``workspace``), e.g. ``python -m stages.caption --shard {shard} --out {out}``.
    """
    runner = dask_task_runner(address, n_workers, num_shards)
    return sharded_flow.with_options(task_runner=runner)(command, num_shards, out, str(workspace), merge)


def stage_outs(stage: str, workspace: str | Path) -> set[str]:
    """The output paths dvc.yaml declares for ``stage``."""
    import yaml

    spec = yaml.safe_load((Path(workspace) / "dvc.yaml").read_text())["stages"].get(stage) or {}
    return {next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics") for o in spec.get(key, [])}


def run_sharded_stage(stage: str, spec: ShardSpec, workspace: str, settings: FlowSettings) -> dict:
    """``stage`` run as ``spec``'s shards (skipped when up to date), merged, then recorded with ``dvc commit``.
    ``spec.out`` must be one of the stage's DVC outputs: like `dvc repro`, the run removes it first (DVC's
    cache holds it), and nothing else."""
    if spec.out not in stage_outs(stage, workspace):
        raise ValueError(f"flows.sharded.{stage}.out: {spec.out!r} is not an output of DVC stage {stage!r} "
                         f"({sorted(stage_outs(stage, workspace))})")

    def run() -> None:
        shutil.rmtree(Path(workspace) / spec.out, ignore_errors=True)
        fan_out(spec.command, spec.num_shards, spec.out, workspace,
                address=settings.dask_address, n_workers=settings.dask_workers)

    return run_outside_repro(stage, workspace, run)
