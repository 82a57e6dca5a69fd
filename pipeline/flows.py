"""Prefect 3 flows that run the DVC pipeline; DVC stays the one description of the DAG and the one cache.

* The stage order comes from DVC itself (``dvc.repo.Repo(root).index.graph``); a flow picks a sub-DAG by
  target stages (plus everything upstream of them) or by a glob on stage names (``ablat*``).
* Each stage is one Prefect task that runs ``dvc repro --single-item <stage>`` serially in one
  workspace (concurrent repros fail on DVC's lock). Its output is streamed into the task's log; a
  failure raises :class:`StageFailed` naming the stage and the tail of its output. Transient failures
  are retried (``flows.retries`` in params); validation failures (:class:`GateFailed`, stages matching
  ``flows.no_retry_stages``) are not.
* Artifacts: one table per Great Expectations gate (``metrics/gates/*.json``), one table of the run's
  metrics (``metrics/**/*.json``), the report (``reports/report.md``) and the run's parameters.
* Scale-out: :func:`fan_out` runs a sharded command (``--shard i/N``) through prefect-dask's
  DaskTaskRunner (local processes, or ``flows.dask_address``) and merges the shard folders; stages listed
  under ``flows.sharded`` and, when ``flows.accelerate_config`` is set, the stages matching
  ``flows.accelerate_stages`` are run that way by the pipeline flow and recorded with ``dvc commit``.

CLI: ``python -m pipeline.flows {run,serve,dag,shard} ...`` (``--help`` on each).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict, Field

TAIL_LINES = 40
DVC = [sys.executable, "-m", "dvc"]   # the dvc of this interpreter, activated venv or not
GATES_DIR = Path("metrics") / "gates"
METRICS_DIR = Path("metrics")
REPORT = Path("reports") / "report.md"
EVALUATE_STAGES = ("evaluate", "benchmark", "report")
TRAINING_STAGES = ("foundation*", "teacher*", "stage1*", "stage2*", "ablat*")


# ----------------------------------------------------------------------------- settings (params: flows)


class ShardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = Field(..., description="template with {shard} (i/N), {index}, {num_shards}, {out}")
    num_shards: int = Field(2, ge=1)
    out: str = Field(..., description="the stage's output folder; shard i writes to <out>.shards/shard-i")


class FlowSettings(BaseModel):
    """The ``flows:`` section of params.yaml (all optional)."""

    model_config = ConfigDict(extra="forbid")
    retries: int = Field(1, ge=0, description="retries of a stage after a transient failure")
    retry_delay_seconds: float = Field(10, ge=0)
    no_retry_stages: list[str] = Field(["validate*"], description="globs: failures here are never retried")
    dask_address: str | None = Field(None, description="scheduler address; None = local processes")
    dask_workers: int | None = Field(None, ge=1, description="local cluster size (default: min(shards, CPUs))")
    accelerate_config: str | None = Field(None, description="accelerate config file for training stages")
    accelerate_stages: list[str] = Field(list(TRAINING_STAGES))
    sharded: dict[str, ShardSpec] = Field(default_factory=dict, description="stage -> sharded command")


def flow_settings(workspace: str | Path) -> FlowSettings:
    path = Path(workspace) / "params.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return FlowSettings(**(raw.get("flows") or {}))


# ----------------------------------------------------------------------------- errors


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and ends with its output's tail."""

    retryable = True

    def __init__(self, stage: str, message: str, tail: str = "", returncode: int | None = None):
        self.stage, self.tail, self.returncode = stage, tail, returncode
        super().__init__(f"{message}\n--- last lines of '{stage}' ---\n{tail}" if tail else message)


class GateFailed(StageFailed):
    """A validation gate failed (never retried); the message names the failing expectations."""

    retryable = False


class NotRetried(StageFailed):
    """A failure in a stage matching ``flows.no_retry_stages``."""

    retryable = False


# ----------------------------------------------------------------------------- the DAG, from DVC


@dataclass(frozen=True)
class Stage:
    address: str            # what `dvc repro` takes: "name", "name@key" (matrix/foreach), "sub/dvc.yaml:name"
    name: str               # the stage name without its dvc.yaml path
    cmd: str
    upstream: tuple[str, ...]   # addresses of the stages it depends on directly


def dvc_stages(workspace: str | Path = ".") -> list[Stage]:
    """Every pipeline stage of the workspace in DAG order (dependencies first; ties in dvc.yaml order).

    `.dvc` data sources (``dvc add``) are dependencies, not steps, and are left out.
    """
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph           # edge u -> v: stage u depends on stage v
        nodes = [s for s in graph.nodes if s.cmd]

        def address(s) -> str:            # `s.addressing` is relative to the process's cwd, not the workspace
            rel = Path(os.path.relpath(s.path, repo.root_dir)).as_posix()
            return s.name if rel == "dvc.yaml" else f"{rel}:{s.name}"

        addr = {s: address(s) for s in nodes}
        stages = {
            addr[s]: Stage(
                address=addr[s],
                name=s.name,
                cmd=" && ".join(s.cmd) if isinstance(s.cmd, list) else s.cmd,
                upstream=tuple(sorted(addr[v] for v in graph.successors(s) if v in addr)),
            )
            for s in nodes
        }
        position = {addr[s]: i for i, s in enumerate(nodes)}
        deps = nx.DiGraph()
        deps.add_nodes_from(stages)
        deps.add_edges_from((up, st.address) for st in stages.values() for up in st.upstream)
    order = nx.lexicographical_topological_sort(deps, key=lambda a: f"{position[a]:08d}")
    return [stages[a] for a in order]


def _matches(stage: Stage, pattern: str) -> bool:
    stem = stage.name.split("@", 1)[0]
    return any(fnmatch.fnmatchcase(x, pattern) for x in {stage.address, stage.name, stem})


def select_stages(
    stages: list[Stage],
    targets: Iterable[str] | None = None,
    *,
    upstream: bool = True,
    missing_ok: bool = False,
) -> list[Stage]:
    """The sub-DAG to run, in DAG order.

    ``targets``: stage addresses, names, matrix/foreach stems (``ablate`` = every ``ablate@...``) or
    globs (``ablat*``); None = every stage. ``upstream`` adds everything the targets depend on.
    An unknown target raises ValueError listing the stages there are (unless ``missing_ok``).
    """
    if targets is None:
        return list(stages)
    by_address = {s.address: s for s in stages}
    chosen: set[str] = set()
    for target in targets:
        hits = {s.address for s in stages if _matches(s, target)}
        if not hits and not missing_ok:
            raise ValueError(
                f"no DVC stage matches {target!r}; stages: {', '.join(s.address for s in stages) or 'none'}"
            )
        chosen |= hits
    if upstream:
        todo = list(chosen)
        while todo:
            for up in by_address[todo.pop()].upstream:
                if up not in chosen:
                    chosen.add(up)
                    todo.append(up)
    return [s for s in stages if s.address in chosen]


# ----------------------------------------------------------------------------- running commands


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pipeline.flows")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # DVC_IGNORE_ISATTY=1 *forces* DVC's progress bars onto non-TTY output (dvc/progress.py); leaving it
    # unset keeps the logs of a piped `dvc repro` free of bar redraws.
    env.pop("DVC_IGNORE_ISATTY", None)
    # stage commands say `python ...`: make it this interpreter's environment even when not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream_command(cmd: list[str] | str, cwd: str | Path, log=None) -> tuple[int, str]:
    """Run ``cmd`` in ``cwd``, streaming each output line (stdout+stderr) into ``log``; (returncode, tail)."""
    log = log or _logger()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd, cwd=str(cwd), env=_env(), shell=isinstance(cmd, str), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.rstrip("\n").split("\r"):   # progress bars redraw with \r
            if line.strip():
                tail.append(line)
                log.info(line)
    return proc.wait(), "\n".join(tail)


def _gate_mtimes(workspace: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in sorted((workspace / GATES_DIR).glob("*.json"))}


def dvc_stage_is_current(stage: str, workspace: str | Path) -> bool:
    proc = subprocess.run([*DVC, "status", "--json", stage], cwd=str(workspace), env=_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        return False
    try:
        return json.loads(proc.stdout or "{}") == {}
    except json.JSONDecodeError:
        return False


def run_dvc_stage(stage: str, workspace: str | Path = ".", *, force: bool = False,
                  no_retry: Iterable[str] = ()) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``workspace``; raises StageFailed / GateFailed / NotRetried."""
    workspace = Path(workspace)
    log = _logger()
    before = _gate_mtimes(workspace)
    cmd = [*DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    log.info("$ dvc %s  (in %s)", shlex.join(cmd[3:]), workspace)
    rc, tail = stream_command(cmd, workspace, log)
    if rc == 0:
        return {"stage": stage, "skipped": "didn't change, skipping" in tail}
    code = re.findall(r"exited with (-?\d+)", tail)
    message = f"DVC stage '{stage}' failed (" + (f"its command exited with {code[-1]}" if code else f"dvc exit {rc}") + ")"
    changed = [p for p, m in _gate_mtimes(workspace).items() if before.get(p) != m]
    failures = [f for p in changed for f in gate_failures(p)]
    if failures:
        raise GateFailed(stage, f"{message}: gate failed: " + "; ".join(failures), tail, rc)
    if any(fnmatch.fnmatchcase(stage.split("@", 1)[0], g) or fnmatch.fnmatchcase(stage, g) for g in no_retry):
        raise NotRetried(stage, message, tail, rc)
    raise StageFailed(stage, message, tail, rc)


def _retry_transient(task_, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        return "GateFailed" not in (state.message or "") and "NotRetried" not in (state.message or "")
    return getattr(exc, "retryable", True)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def dvc_stage_task(stage: str, workspace: str, force: bool = False, no_retry: list[str] | None = None) -> dict:
    """One DVC stage as a Prefect task (its own log, retries, failed state naming the stage)."""
    return run_dvc_stage(stage, workspace, force=force, no_retry=no_retry or ())


def commit_stage(stage: str, workspace: str | Path) -> None:
    """Record outputs produced outside ``dvc repro`` (sharded or accelerate runs) in dvc.lock and the cache."""
    rc, tail = stream_command([*DVC, "commit", "--force", stage], workspace)
    if rc:
        raise StageFailed(stage, f"'dvc commit {stage}' failed (exit {rc})", tail, rc)


def accelerate_command(cmd: str, config_file: str) -> str:
    """``python -m mod args`` / ``python script.py args`` -> ``accelerate launch --config_file CFG ...``."""
    argv = shlex.split(cmd)
    if not argv or Path(argv[0]).name not in {"python", "python3", Path(sys.executable).name}:
        raise ValueError(f"cannot launch through accelerate: {cmd!r} is not a 'python ...' command")
    return shlex.join([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
                       *argv[1:]])


@task(name="dvc-stage-launched", task_run_name="{stage}", cache_policy=NO_CACHE,
      retry_condition_fn=_retry_transient)
def launched_stage_task(stage: str, cmd: str, workspace: str) -> dict:
    """Run a stage's command through ``accelerate launch`` (multi-GPU / multi-node), then ``dvc commit``."""
    if dvc_stage_is_current(stage, workspace):
        _logger().info("Stage '%s' didn't change, skipping", stage)
        return {"stage": stage, "skipped": True}
    _logger().info("$ %s  (in %s)", cmd, workspace)
    rc, tail = stream_command(cmd, workspace)
    if rc:
        raise StageFailed(stage, f"DVC stage '{stage}' failed under accelerate (exit {rc})", tail, rc)
    commit_stage(stage, workspace)
    return {"stage": stage, "skipped": False}


# ----------------------------------------------------------------------------- scale-out


def shard_dir(out: str | Path, index: int) -> Path:
    return Path(f"{out}.shards") / f"shard-{index}"


@task(name="shard", task_run_name="shard-{index}-of-{num_shards}", cache_policy=NO_CACHE, retries=1)
def shard_task(command: str, index: int, num_shards: int, out: str, workspace: str) -> str:
    """Run one shard (``command`` formatted with shard, index, num_shards, out) writing to its own folder."""
    target = Path(workspace) / shard_dir(out, index)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    cmd = command.format(shard=f"{index}/{num_shards}", index=index, num_shards=num_shards,
                         out=shlex.quote(str(shard_dir(out, index))))
    _logger().info("$ %s  (in %s)", cmd, workspace)
    rc, tail = stream_command(cmd, workspace)
    if rc:
        raise StageFailed(f"shard {index}/{num_shards}", f"shard {index}/{num_shards} failed (exit {rc})", tail, rc)
    return str(target)


def merge_shards(shard_dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Union of the shard folders into ``out``: distinct files are copied; a file name present in several
    shards is concatenated when it is a table (.parquet, .csv, .jsonl) and is an error otherwise. Parquet
    tables with an ``id`` column are ordered by id (the order the sharded stages write unsharded)."""
    import pandas as pd

    out = Path(out)
    seen: dict[Path, list[Path]] = collections.defaultdict(list)
    for d in shard_dirs:
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file()):
            seen[f.relative_to(d)].append(f)
    if out.exists():
        shutil.rmtree(out)
    written = []
    for rel, files in sorted(seen.items()):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if len(files) == 1:
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
            raise ValueError(f"merge: {rel} is written by {len(files)} shards and is not a table")
        written.append(dest)
    return written


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
        _logger().info("merged %d shards into %s (%d files)", num_shards, out, len(merged))
    return dirs


def fan_out(command: str, num_shards: int, out: str, workspace: str | Path = ".", *,
            address: str | None = None, n_workers: int | None = None, merge: bool = True) -> list[str]:
    """Run a sharded command through DaskTaskRunner (``address`` or local processes) and merge the shards.

    ``command`` is formatted with ``{shard}`` (``i/N``), ``{index}``, ``{num_shards}`` and ``{out}`` (the
    shard's folder, relative to ``workspace``), e.g. ``python -m stages.caption --shard {shard} --out {out}``.
    """
    runner = dask_task_runner(address, n_workers, num_shards)
    return sharded_flow.with_options(task_runner=runner)(command, num_shards, out, str(workspace), merge)


def run_sharded_stage(stage: str, spec: ShardSpec, workspace: str, settings: FlowSettings) -> dict:
    if dvc_stage_is_current(stage, workspace):
        _logger().info("Stage '%s' didn't change, skipping", stage)
        return {"stage": stage, "skipped": True}
    fan_out(spec.command, spec.num_shards, spec.out, workspace,
            address=settings.dask_address, n_workers=settings.dask_workers)
    commit_stage(stage, workspace)
    return {"stage": stage, "skipped": False}


# ----------------------------------------------------------------------------- artifacts


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-") or "artifact"


def _gate_rows(data: Any) -> list[dict[str, Any]]:
    """Rows (expectation, column, success, details) from a gate JSON: GX's validation-result dict
    (``results[].expectation_config.type``) or a flat list of ``{expectation, success, ...}``."""
    items = data.get("results", data.get("expectations", [])) if isinstance(data, dict) else data
    rows = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        config = item.get("expectation_config") or {}
        kwargs = config.get("kwargs") or item.get("kwargs") or {}
        name = (item.get("expectation") or item.get("expectation_type") or item.get("type")
                or config.get("type") or config.get("expectation_type") or "?")
        result = item.get("result") if isinstance(item.get("result"), dict) else {}
        details = {k: result[k] for k in ("observed_value", "unexpected_count", "unexpected_percent",
                                          "partial_unexpected_list") if k in result}
        details.update({k: item[k] for k in ("observed", "message", "details", "examples") if k in item})
        rows.append({"expectation": str(name), "column": str(kwargs.get("column", item.get("column", ""))),
                     "success": bool(item.get("success", False)),
                     "details": json.dumps(details, default=str)[:300] if details else ""})
    return rows


def gate_failures(path: str | Path) -> list[str]:
    """'gate: expectation(column)' for every failed expectation of a gate JSON (the gate itself if none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path.stem}: unreadable gate result ({exc})"]
    failed = [f"{path.stem}: {r['expectation']}" + (f"({r['column']})" if r["column"] else "")
              for r in _gate_rows(data) if not r["success"]]
    ok = data.get("success", not failed) if isinstance(data, dict) else not failed
    return failed or ([] if ok else [f"{path.stem}: gate reported success=false"])


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(not isinstance(v, (dict, list)) for v in value):
            out[prefix] = json.dumps(value)
    elif isinstance(value, float) and not math.isfinite(value):
        out[prefix] = str(value)
    else:
        out[prefix] = value


def metric_rows(workspace: str | Path = ".", limit: int = 2000) -> list[dict[str, Any]]:
    """(file, metric, value) for every scalar in metrics/**/*.json except the gates."""
    root = Path(workspace)
    rows = []
    for path in sorted((root / METRICS_DIR).rglob("*.json")):
        rel = path.relative_to(root)
        if (root / GATES_DIR) in path.parents:
            continue
        try:
            flat: dict[str, Any] = {}
            _flatten("", json.loads(path.read_text()), flat)
        except (OSError, json.JSONDecodeError):
            continue
        rows += [{"file": str(rel), "metric": k, "value": v} for k, v in flat.items()]
    return rows[:limit]


def publish_artifacts(workspace: str | Path = ".") -> dict[str, Any]:
    """Gate tables, the metrics table and the report markdown; returns what was published."""
    root = Path(workspace)
    published: dict[str, Any] = {"gates": {}, "metrics": 0, "report": False}
    for path in sorted((root / GATES_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows = _gate_rows(data) or [{"expectation": "(gate)", "column": "",
                                     "success": bool(isinstance(data, dict) and data.get("success")),
                                     "details": ""}]
        failures = gate_failures(path)
        summary = root / GATES_DIR / f"{path.stem}.md"
        desc = f"Great Expectations gate `{path.stem}`: " + ("**FAILED** " + "; ".join(failures) if failures
                                                             else "passed")
        if summary.exists():
            desc += "\n\n" + summary.read_text()[:4000]
        create_table_artifact(rows, key=artifact_key("gate", path.stem), description=desc)
        published["gates"][path.stem] = failures
    rows = metric_rows(root)
    if rows:
        create_table_artifact(rows, key="run-metrics", description=f"metrics/**/*.json of {root.resolve()}")
        published["metrics"] = len(rows)
    if (root / REPORT).exists():
        create_markdown_artifact((root / REPORT).read_text(), key="report", description=str(REPORT))
        published["report"] = True
    return published


# ----------------------------------------------------------------------------- parameters


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1, 'c': {'d': 2}} -> {'a': {'b': 1}, 'c': {'d': 2}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _nested(value) if isinstance(value, dict) else value
    return out


def _merge_into(doc: Any, override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge_into(doc[key], value)
        else:
            doc[key] = value


def apply_parameters(workspace: str | Path = ".", profile: str | None = None,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply a configuration profile, then ``overrides`` (dotted keys, like ``dvc exp run -S``), to the
    workspace's params.yaml (comments kept); validate; return a record of what was applied."""
    from dvc.utils.serialize import modify_yaml

    root = Path(workspace)
    params = root / "params.yaml"
    if profile:
        try:
            from pipeline.profile import apply_profile
        except ImportError:
            apply_profile = None
        if apply_profile is not None:
            apply_profile(profile, root)
        elif profile not in ("default", "params"):
            from pipeline.config import ConfigError, load_raw
            path = root / "configs" / f"{profile}.yaml"
            if not path.exists():
                known = sorted(p.stem for p in (root / "configs").glob("*.yaml"))
                raise ConfigError(f"profile {profile!r}: {path} not found; known profiles: {['default', *known]}")
            with modify_yaml(params) as doc:       # like `python -m pipeline.profile use`, comments kept
                _merge_into(doc, load_raw(path))
    if overrides:
        with modify_yaml(params) as doc:
            _merge_into(doc, _nested(overrides))
    if params.exists() and (profile or overrides):
        from pipeline.config import load
        load(params)   # a bad value fails here, naming the key, before any stage runs
    diff = subprocess.run([*DVC, "params", "diff", "--md"], cwd=str(root), env=_env(),
                          capture_output=True, text=True)
    return {"workspace": str(root.resolve()), "profile": profile, "overrides": overrides or {},
            "params_diff_vs_head": diff.stdout.strip() if diff.returncode == 0 else diff.stderr.strip()}


def record_parameters(record: dict[str, Any], stages: list[str]) -> None:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=record["workspace"],
                         capture_output=True, text=True)
    md = [
        "# Run parameters", "",
        f"- workspace: `{record['workspace']}`",
        f"- git commit: `{git.stdout.strip() or 'none'}`",
        f"- profile: `{record['profile'] or 'default (params.yaml)'}`",
        f"- overrides: `{json.dumps(record['overrides'], default=str)}`",
        f"- stages ({len(stages)}): " + ", ".join(f"`{s}`" for s in stages), "",
        "## `dvc params diff` (workspace vs HEAD)", "",
        record["params_diff_vs_head"] or "(no change)",
    ]
    create_markdown_artifact("\n".join(md), key="run-parameters", description="profile and params overrides")


# ----------------------------------------------------------------------------- flows


def run_pipeline(workspace: str | Path = ".", targets: list[str] | None = None, *, upstream: bool = True,
                 profile: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False,
                 missing_ok: bool = False) -> list[dict]:
    """The body shared by the flows (call it inside a flow): parameters, the selected stages in DAG order,
    then artifacts (published also when a stage fails) and the gate check."""
    workspace = str(Path(workspace).resolve())
    log = _logger()
    record = apply_parameters(workspace, profile, overrides)
    settings = flow_settings(workspace)
    stages = select_stages(dvc_stages(workspace), targets, upstream=upstream, missing_ok=missing_ok)
    if not stages:
        raise ValueError(f"no DVC stage selected by {targets!r} in {workspace}")
    record_parameters(record, [s.address for s in stages])
    log.info("running %d DVC stages in DAG order: %s", len(stages), ", ".join(s.address for s in stages))
    results = []
    stage_task = dvc_stage_task.with_options(retries=settings.retries,
                                             retry_delay_seconds=settings.retry_delay_seconds)
    try:
        for stage in stages:
            if stage.address in settings.sharded:
                results.append(run_sharded_stage(stage.address, settings.sharded[stage.address], workspace,
                                                 settings))
            elif settings.accelerate_config and any(_matches(stage, g) for g in settings.accelerate_stages):
                cmd = accelerate_command(stage.cmd, settings.accelerate_config)
                results.append(launched_stage_task.with_options(
                    retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds,
                )(stage.address, cmd, workspace))
            else:
                results.append(stage_task(stage.address, workspace, force, settings.no_retry_stages))
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


@flow(name="refine-control-pipeline", log_prints=True)
def pipeline_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                  targets: list[str] | None = None, force: bool = False) -> list[dict]:
    """The full pipeline (every DVC stage), or the sub-DAG up to ``targets``."""
    return run_pipeline(workspace, targets, profile=profile, overrides=overrides, force=force)


@flow(name="refine-control-ablations", log_prints=True)
def ablations_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                   pattern: str = "ablat*", upstream: bool = True, force: bool = False) -> list[dict]:
    """The ablation stages (names matching ``pattern``, e.g. every ``ablate@...`` matrix entry) and,
    with ``upstream``, whatever they depend on (DVC skips what is up to date)."""
    return run_pipeline(workspace, [pattern], upstream=upstream, profile=profile, overrides=overrides,
                        force=force)


@flow(name="refine-control-evaluate", log_prints=True)
def evaluate_flow(workspace: str = ".", profile: str | None = None, overrides: dict[str, Any] | None = None,
                  stages: list[str] | None = None, force: bool = False) -> list[dict]:
    """Evaluate + report only, on the models already in the workspace: ``stages`` (default: those of
    evaluate, benchmark, report that exist), without their upstream."""
    return run_pipeline(workspace, stages or list(EVALUATE_STAGES), upstream=False, profile=profile,
                        overrides=overrides, force=force, missing_ok=stages is None)


FLOWS = {"full": pipeline_flow, "ablations": ablations_flow, "evaluate": evaluate_flow}


# ----------------------------------------------------------------------------- CLI


def serve(workspace: str = ".", limit: int = 1) -> None:
    """Serve one deployment per flow from this machine (``limit=1``: runs never overlap in a workspace)."""
    from prefect import serve as prefect_serve

    params = {"workspace": str(Path(workspace).resolve())}
    prefect_serve(*(f.to_deployment(name=f"{key}-local", parameters=params, tags=["refine-control"])
                    for key, f in FLOWS.items()), limit=limit)


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
    s = sub.add_parser("serve", help="serve the three deployments from this machine")
    s.add_argument("--workspace", default=".")
    s.add_argument("--limit", type=int, default=1)
    d = sub.add_parser("dag", help="print the stage order DVC gives")
    d.add_argument("--workspace", default=".")
    d.add_argument("targets", nargs="*")
    h = sub.add_parser("shard", help="fan a sharded command out through Dask and merge")
    h.add_argument("--command", required=True)
    h.add_argument("--shards", type=int, required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--workspace", default=".")
    h.add_argument("--address")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        kw: dict[str, Any] = {"workspace": args.workspace, "profile": args.profile,
                              "overrides": _parse_sets(args.set) or None, "force": args.force}
        if args.target:
            if args.flow != "full":
                raise SystemExit("--target applies to the full flow")
            kw["targets"] = args.target
        FLOWS[args.flow](**kw)
    elif args.cmd == "serve":
        serve(args.workspace, args.limit)
    elif args.cmd == "dag":
        for st in select_stages(dvc_stages(args.workspace), args.targets or None):
            print(st.address)
    elif args.cmd == "shard":
        fan_out(args.command, args.shards, args.out, args.workspace, address=args.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
