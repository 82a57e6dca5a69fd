"""Independent DVC stages run at the same time, within a budget of CPU threads, then recorded with
``dvc commit`` -- what ``dvc repro`` (one stage after another) leaves, in less wall time.

* The DAG comes from :func:`.dag.dvc_stages`. A stage is *ready* once every selected stage it depends on
  has finished. Newly ready stages are asked about together (one ``dvc status --json <stages>``, under
  :func:`.stages.dvc_lock`); the up-to-date ones finish at once ("didn't change, skipping").
* The others are launched as soon as threads are free: ``jobs`` threads in all (``--jobs N``,
  ``flows.jobs``, default ``os.cpu_count()``). Ready stages go in order of their *critical path*: the
  longest chain of stage times from them to the end of the DAG, taken from an earlier run's ``--wall-time``
  record (:func:`critical_path`; without one, the longest chain of stages), so the stages the run waits on
  start first. A
  stage launched alone gets every free thread; stages ready together split the free threads (at least one
  each, the first taking the remainder); when no thread is free they wait. A stage's threads are set in its
  command's environment (:data:`THREAD_VARS`: OpenMP/MKL/BLAS pools, which torch's intra-op pool follows).
* Threads are elastic (:mod:`pipeline.threads`): when threads are free and no stage is ready, the running
  stage with the longest critical path is given them (its ``.threads`` file, which its training and
  sampling loops follow); when more stages are ready than threads are free, those extra threads are
  taken back first. A stage never goes below the threads it was launched with, so a command that does not follow the
  file is never oversubscribed (at most for the ~2 s a follower takes to notice).
* Each stage runs as :func:`concurrent_stage_task`: through :func:`.stages.run_outside_repro`, i.e. its
  outputs removed as ``dvc repro`` removes them, its ``cmd`` (as dvc.yaml says, matrix items resolved) in
  the workspace, then ``dvc commit --force <stage>``; the DVC calls one at a time under the lock, the
  commands side by side. Output goes to the task's log and to ``.dvc/tmp/concurrent/<stage>.log``.
* Model stages whose command starts several ranks (params ``launch``: :func:`.settings.launches_ranks`)
  use every core / device of their own: they run *exclusively* (when nothing else runs; nothing is
  launched beside them), exactly as the sequential flow runs them (:func:`run_stage`).
* A failure raises the stage's :class:`.stages.StageFailed` (naming it, with its output's tail) after the
  stages still running have finished (and been committed); no stage is launched after a failure.
* On a Dask cluster (``flows.dask_address``: prefect-dask's DaskTaskRunner, workers on other machines;
  :mod:`.cluster` says what they must share) the cluster, not ``jobs``, bounds what runs at once: every
  ready stage is submitted, each worker thread runs one with its share of its machine's CPUs
  (:func:`.cluster.stage_threads`; no threads lent across machines), and each result names its worker.

:func:`run_concurrently` is the scheduler (any ``submit``: Prefect tasks, or plain futures in tests);
:func:`concurrent_flow` runs it as a Prefect flow whose tasks go to a ThreadPoolTaskRunner(max_workers=jobs),
or to the Dask cluster.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.orchestration.cluster import stage_threads
from pipeline.orchestration.dag import Stage, dvc_stages
from pipeline.paths import RUN_TIME
from pipeline.orchestration.settings import FlowSettings
from pipeline.orchestration.shards import dask_task_runner
from pipeline.orchestration.stages import (
    DVC,
    _gate_mtimes,
    _retry_transient,
    command_env,
    dvc_lock,
    dvc_stage_is_current,
    dvc_stage_task,
    run_logger,
    run_outside_repro,
    stage_failure,
    stream_command,
)
from pipeline.threads import ENV, THREAD_VARS, set_threads

LOG_DIR = Path(".dvc") / "tmp" / "concurrent"


def default_jobs(jobs: int | None = None, settings: FlowSettings | None = None) -> int:
    """``jobs``, else ``flows.jobs``, else the number of CPUs."""
    value = jobs or getattr(settings, "jobs", None) or os.cpu_count() or 1
    if value < 1:
        raise ValueError(f"jobs must be >= 1, got {value}")
    return int(value)


def thread_env(threads: int, control: str | Path | None = None) -> dict[str, str]:
    """The environment variables that size a command's thread pools to ``threads`` (and, with ``control``,
    name the file through which the executor changes the count while it runs: pipeline.threads)."""
    return {**{var: str(threads) for var in THREAD_VARS}, **({ENV: str(control)} if control else {})}


def allot(free: int, ready: int) -> list[int]:
    """Threads for each of ``min(ready, free)`` stages launched now out of ``free``: all of them to a lone
    stage, else an even split (at least one each; the earlier stages take the remainder)."""
    n = min(ready, free)
    if n <= 0:
        return []
    base, extra = divmod(free, n)
    return [base + (i < extra) for i in range(n)]


def stage_log(workspace: str | Path, stage: str) -> Path:
    """Where a stage's output is written: ``.dvc/tmp/concurrent/<stage>.log`` (``/``, ``:`` -> ``_``)."""
    return Path(workspace) / LOG_DIR / (re.sub(r"[^\w@.+-]", "_", stage) + ".log")


def thread_file(workspace: str | Path, stage: str) -> Path:
    """The file holding a running stage's thread count (``<stage>.threads`` beside its log)."""
    return stage_log(workspace, stage).with_suffix(".threads")


def stage_seconds(record: str | Path | dict | None) -> dict[str, float]:
    """Each stage's seconds in an earlier run's ``--wall-time`` record (stages that ran; a missing or
    unreadable file: none)."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        try:
            record = json.loads(Path(record).read_text())
        except (OSError, ValueError):
            return {}
    return {r["stage"]: float(r["seconds"]) for r in record.get("stages") or []
            if isinstance(r, dict) and not r.get("skipped") and "seconds" in r and "stage" in r}


def critical_path(stages: list[Stage], seconds: dict[str, float]) -> dict[str, float]:
    """For each of ``stages`` (DAG order), the longest sum of stage seconds on a path from it to the end
    of the DAG, itself included. A stage without a time counts the median of the known ones (1 when none
    is known: the path is then the number of stages on the longest chain below)."""
    known = sorted(seconds.values())
    default = known[len(known) // 2] if known else 1.0
    below: dict[str, list[str]] = {s.address: [] for s in stages}
    for s in stages:
        for u in s.upstream:
            if u in below:
                below[u].append(s.address)
    path: dict[str, float] = {}
    for s in reversed(stages):
        path[s.address] = seconds.get(s.address, default) + max((path[d] for d in below[s.address]), default=0.0)
    return path


def changed_stages(stages: Iterable[str], workspace: str | Path) -> set[str]:
    """The stages among ``stages`` that DVC does not report up to date (one ``dvc status --json``); when
    that call fails, each stage is asked on its own (:func:`.stages.dvc_stage_is_current`)."""
    stages = list(stages)
    if not stages:
        return set()
    proc = subprocess.run([*DVC, "status", "--json", *stages], cwd=str(workspace), env=command_env(),
                          capture_output=True, text=True)
    try:
        if proc.returncode:
            raise ValueError(proc.stderr)
        status = json.loads(proc.stdout or "{}")
        return {s for s in stages if s in status}
    except ValueError:
        return {s for s in stages if not dvc_stage_is_current(s, workspace)}


class _Tee:
    """A logger-like sink: each line to the run's logger and to a file."""

    def __init__(self, log, fh):
        self.log, self.fh = log, fh

    def info(self, msg, *args):
        self.log.info(msg, *args)
        self.fh.write((msg % args if args else msg) + "\n")
        self.fh.flush()


def run_stage_command(stage: str, cmd: str, workspace: str | Path, threads: int, *, check: bool = True,
                      no_retry: Iterable[str] = ()) -> dict:
    """Run one stage outside ``dvc repro`` with ``threads`` threads (see the module's doc); raises
    StageFailed / GateFailed / NotRetried like ``dvc repro --single-item``."""
    workspace = Path(workspace).resolve()
    log = run_logger()
    path = stage_log(workspace, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    def run() -> None:
        before = _gate_mtimes(workspace)
        log.info("$ %s  (in %s, %d thread%s; log %s)", cmd, workspace, threads, "s"[:threads > 1], path)
        control = thread_file(workspace, stage)
        set_threads(control, threads)
        start = time.monotonic()
        with path.open("w") as fh:
            fh.write(f"$ {cmd}\n# {threads} threads\n")
            rc, tail = stream_command(cmd, workspace, _Tee(log, fh), env=thread_env(threads, control))
        timing["seconds"] = round(time.monotonic() - start, 3)
        if rc:
            raise stage_failure(stage, f"DVC stage '{stage}' failed (its command exited with {rc})", tail, rc,
                                workspace, before, no_retry)

    result = run_outside_repro(stage, workspace, run, check=check)
    return {**result, "threads": threads, **timing, **({} if result["skipped"] else {"log": str(path)})}


@task(name="dvc-stage-concurrent", task_run_name="{stage}", cache_policy=NO_CACHE,
      retry_condition_fn=_retry_transient)
def concurrent_stage_task(stage: str, cmd: str, workspace: str, threads: int, check: bool = True,
                          no_retry: list[str] | None = None) -> dict:
    """One stage run beside others (:func:`run_stage_command`) as a Prefect task; on a Dask worker with
    that machine's share of threads instead of ``threads``, and the worker's address in the result."""
    threads, worker = stage_threads(threads)
    result = run_stage_command(stage, cmd, workspace, threads, check=check, no_retry=no_retry or ())
    return {**result, **({"worker": worker} if worker else {})}


# ----------------------------------------------------------------------------- sequential dispatch


def is_exclusive(stage: Stage, launches: Callable[[str], bool] = lambda cmd: False) -> bool:
    """Stages whose command starts several ranks (``launches``: :func:`.settings.launches_ranks`): every
    core / device of their own."""
    return launches(stage.cmd)


def run_stage(stage: Stage, workspace: str, settings: FlowSettings, force: bool = False) -> dict:
    """One stage, run inside a flow the way the sequential flow runs it: ``dvc repro --single-item`` as a
    task (a model stage's command starts its own ranks: pipeline/launch.py)."""
    retry = {"retries": settings.retries, "retry_delay_seconds": settings.retry_delay_seconds}
    return dvc_stage_task.with_options(**retry)(stage.address, workspace, force, settings.no_retry_stages)


# ----------------------------------------------------------------------------- the scheduler


def run_concurrently(
    stages: list[Stage],
    workspace: str | Path,
    jobs: int,
    submit: Callable[[Stage, int], Any],
    *,
    force: bool = False,
    exclusive: Callable[[Stage], bool] = lambda s: False,
    run_exclusive: Callable[[Stage], dict] | None = None,
    seconds: dict[str, float] | None = None,
    retune: Callable[[Stage, int], None] | None = None,
    lend: bool = True,
) -> list[dict]:
    """Run ``stages`` (DAG order) as their upstream stages finish, within ``jobs`` threads.

    ``submit(stage, threads)`` starts one stage known to be out of date (or forced) and returns a future
    (``add_done_callback``, ``result``). Stages for which ``exclusive`` is true are run
    by ``run_exclusive(stage)`` in this thread, alone. ``seconds`` (an earlier run's stage times) orders
    ready stages by critical path; ``retune(stage, threads)`` changes a running stage's threads (default:
    its :func:`thread_file`); ``lend=False``: idle threads are never lent (a cluster's threads belong to
    its machines). Returns the stages' results in DAG order; raises the first failure once the running
    stages have finished."""
    workspace = Path(workspace)
    retune = None if not lend else retune or (lambda st, n: set_threads(thread_file(workspace, st.address), n))
    return _Scheduler(stages, workspace, jobs, submit, force, exclusive, run_exclusive,
                      critical_path(stages, seconds or {}), retune).run()


@dataclass
class _Running:
    """A launched stage: its future, and the threads it was launched with (``base``) and lent since (``extra``)."""

    future: Any
    stage: Stage
    base: int
    extra: int = 0


class _Scheduler:
    """:func:`run_concurrently`'s state: the stages not finished yet (``pending``), those known to need a run
    (``to_run``: asked, or forced), the running ones, the threads free, the first failure. ``retune`` None:
    no thread is lent."""

    def __init__(self, stages: list[Stage], workspace: Path, jobs: int, submit: Callable[[Stage, int], Any],
                 force: bool, exclusive: Callable[[Stage], bool], run_exclusive: Callable[[Stage], dict] | None,
                 path: dict[str, float], retune: Callable[[Stage, int], None] | None):
        self.log = run_logger()
        self.stages, self.workspace, self.jobs, self.submit, self.force = stages, workspace, jobs, submit, force
        self.exclusive, self.run_exclusive, self.path, self.retune = exclusive, run_exclusive, path, retune
        self.selected = {s.address for s in stages}
        self.pending = list(stages)
        self.finished: dict[str, dict] = {}
        self.to_run: set[str] = set()
        self.running: dict[str, _Running] = {}
        self.done: queue.Queue[str] = queue.Queue()  # addresses of the running stages that ended
        self.free = jobs
        self.failure: BaseException | None = None

    def run(self) -> list[dict]:
        """Schedule until every stage has finished, or, after a failure, the running ones have; -> the
        results in DAG order. Raises the first failure, or RuntimeError when no stage can start."""
        while self.running or (self.pending and self.failure is None):
            if self.failure is None and self._schedule():
                continue
            if not self.running:
                if self.pending and self.failure is None:
                    raise RuntimeError("no DVC stage can start: " + ", ".join(s.address for s in self.pending))
                break
            self._collect()
        if self.failure is not None:
            raise self.failure
        return [self.finished[s.address] for s in self.stages if s.address in self.finished]

    def _ready(self) -> list[Stage]:
        """The pending stages whose selected upstream stages have all finished."""
        return [s for s in self.pending if all(u in self.finished or u not in self.selected for u in s.upstream)]

    def _finish(self, address: str, result: dict) -> None:
        """``address`` is done with ``result``: no longer pending."""
        self.finished[address] = result
        self.pending[:] = [s for s in self.pending if s.address != address]

    def _schedule(self) -> bool:
        """One scheduling round: ask about the newly ready stages, then run a lone exclusive stage when
        nothing runs (-> True: it has finished, schedule again), else launch ready stages within the free
        threads (taking lent threads back first when more are ready than free) and lend idle threads to the
        running stage with the longest critical path. -> False: wait for a running stage."""
        self._ask()
        runnable = sorted((s for s in self._ready() if s.address in self.to_run and s.address not in self.running),
                          key=lambda s: -self.path[s.address])   # stable: DAG order among equals
        lone = [s for s in runnable if self.exclusive(s)]
        if lone and not self.running:
            self._run_alone(lone[0])
            return True
        if not lone and len(runnable) > self.free:
            self._take_back(len(runnable))
        if not lone and runnable and self.free:
            self._launch(runnable)
        # idle threads: to the running stage with the longest path (unless nothing is lent)
        if self.retune and self.free and self.running and (lone or not runnable):
            self._lend(self.free, max(self.running, key=lambda a: self.path[a]))
            self.free = 0
        return False

    def _ask(self) -> None:
        """Which of the ready stages need to run: all when forced, else those DVC does not report up to date
        (one status call for the newly ready ones, under the DVC lock). Up-to-date ones finish now, which may
        ready others, asked in turn."""
        while True:
            new = [s.address for s in self._ready() if s.address not in self.to_run]
            if not new:
                return
            if self.force:
                self.to_run.update(new)
                return
            with dvc_lock(self.workspace):
                changed = changed_stages(new, self.workspace)
            self.to_run.update(changed)
            for address in new:
                if address not in changed:
                    self.log.info("Stage '%s' didn't change, skipping", address)
                    self._finish(address, {"stage": address, "skipped": True})

    def _run_alone(self, stage: Stage) -> None:
        """Run an exclusive stage in this thread; its failure is kept (raised once nothing runs)."""
        self.log.info("running '%s' alone (several ranks)", stage.address)
        try:
            self._finish(stage.address, self.run_exclusive(stage))
        except BaseException as exc:       # noqa: BLE001 -- reported below, after the others
            self.failure = exc

    def _take_back(self, wanted: int) -> None:
        """Take lent threads back, shortest critical path first, until ``wanted`` threads are free or none
        is lent; a stage keeps the threads it was launched with."""
        for address in sorted(self.running, key=lambda a: self.path[a]):
            if self.free >= wanted:
                break
            r = self.running[address]
            if r.extra:
                self.free += r.extra
                r.extra = 0
                self.log.info("'%s' back to %d threads", address, r.base)
                self.retune(r.stage, r.base)

    def _launch(self, runnable: list[Stage]) -> None:
        """Launch the first of ``runnable`` (critical-path order) on the free threads, split by :func:`allot`."""
        for stage, threads in zip(runnable, allot(self.free, len(runnable))):
            self.log.info("launching '%s' with %d of %d threads (%d running)", stage.address, threads, self.jobs,
                          len(self.running))
            future = self.submit(stage, threads)
            self.running[stage.address] = _Running(future, stage, threads)
            future.add_done_callback(lambda _f, a=stage.address: self.done.put(a))
            self.free -= threads

    def _lend(self, threads: int, address: str) -> None:
        """Lend running stage ``address`` ``threads`` more threads (``retune``)."""
        r = self.running[address]
        r.extra += threads
        self.log.info("'%s' now has %d threads", address, r.base + r.extra)
        self.retune(r.stage, r.base + r.extra)

    def _collect(self) -> None:
        """Wait for a running stage to end: its threads are free again, and its result kept or its failure:
        the first is kept (raised once the stages still running have finished; nothing more is launched),
        later ones are logged."""
        address = self.done.get()
        r = self.running.pop(address)
        self.free += r.base + r.extra
        try:
            self._finish(address, r.future.result())
        except BaseException as exc:               # noqa: BLE001
            if self.failure is None:
                self.failure = exc
                if self.running:
                    self.log.error("stage '%s' failed; waiting for %s to finish, launching nothing more",
                                   address, ", ".join(self.running))
            else:
                self.log.error("stage '%s' failed too: %s", address, exc)


@flow(name="refine-control-concurrent", log_prints=True)
def concurrent_flow(workspace: str, stages: list[str], jobs: int, force: bool = False) -> list[dict]:
    """The stages ``stages`` (addresses; the DAG between them from DVC) run side by side within ``jobs``
    threads, in critical-path order by the stage times of the last recorded run (``reports/run_time.json``,
    what ``make run`` writes); the flow's task runner runs :func:`concurrent_stage_task`. On a Dask cluster
    a stage's threads are its worker's (:func:`.cluster.stage_threads`): none are lent."""
    from pipeline.orchestration.settings import flow_settings, launches_ranks

    settings = flow_settings(workspace)
    # one machine: a stage on every device runs alone; on a Dask cluster each worker's machine bounds its own
    launches = (lambda cmd: False) if settings.dask_address else launches_ranks(workspace)
    wanted = set(stages)
    chosen = [s for s in dvc_stages(workspace) if s.address in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"not DVC stages of {workspace}: {sorted(wanted - {s.address for s in chosen})}")
    stage_task = concurrent_stage_task.with_options(retries=settings.retries,
                                                    retry_delay_seconds=settings.retry_delay_seconds)

    def submit(stage: Stage, threads: int):   # the scheduler asked DVC already: no second status call
        return stage_task.submit(stage.address, stage.cmd, workspace, threads, False, settings.no_retry_stages)

    return run_concurrently(chosen, workspace, jobs, submit, force=force,
                            exclusive=lambda s: is_exclusive(s, launches),
                            run_exclusive=lambda s: run_stage(s, workspace, settings, force),
                            seconds=stage_seconds(Path(workspace) / RUN_TIME),
                            lend=not settings.dask_address)


def task_runner(jobs: int, settings: FlowSettings):
    """ThreadPoolTaskRunner(max_workers=jobs), or DaskTaskRunner on ``flows.dask_address`` when set."""
    if settings.dask_address:
        return dask_task_runner(settings.dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=jobs)


def run_stages(stages: list[Stage], workspace: str, settings: FlowSettings, jobs: int,
               force: bool = False) -> list[dict]:
    """Run ``stages`` (call inside a flow): on the Dask cluster at ``flows.dask_address`` when set (every
    ready stage submitted: the workers' threads bound what runs at once), else concurrently through
    :func:`concurrent_flow` when ``jobs`` > 1, else one after another as before (``dvc repro
    --single-item``)."""
    if settings.dask_address:
        jobs = len(stages)
    elif jobs <= 1:
        return [run_stage(stage, workspace, settings, force) for stage in stages]
    flow_ = concurrent_flow.with_options(task_runner=task_runner(jobs, settings))
    return flow_(workspace, [s.address for s in stages], jobs, force)
