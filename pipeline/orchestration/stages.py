"""Running one DVC stage: ``dvc repro --single-item <stage>`` with its output streamed into the Prefect
task's log, failures raised as :class:`StageFailed` (naming the stage, ending with the output's tail),
transient failures retried and validation failures (:class:`GateFailed`, :class:`NotRetried`) not; and
stages run by their own command (:mod:`.concurrent`) recorded afterwards
with ``dvc commit``: before such a command, the stage's outputs are removed as ``dvc repro`` removes them
(persistent ones kept), and every DVC call about it is made under :func:`dvc_lock`.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from pipeline.orchestration.artifacts import GATES_DIR, gate_failures

TAIL_LINES = 40
DVC = [sys.executable, "-m", "dvc"]   # the dvc of this interpreter, activated venv or not


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


# ----------------------------------------------------------------------------- running commands


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task, else the ``pipeline.flows`` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pipeline.flows")


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of stage commands and ``dvc`` subprocesses (``extra`` set on top)."""
    env = dict(os.environ)
    # DVC_IGNORE_ISATTY=1 *forces* DVC's progress bars onto non-TTY output (dvc/progress.py); leaving it
    # unset keeps the logs of a piped `dvc repro` free of bar redraws.
    env.pop("DVC_IGNORE_ISATTY", None)
    # stage commands say `python ...`: make it this interpreter's environment even when not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def stream_command(cmd: list[str] | str, cwd: str | Path, log=None,
                   env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` in ``cwd`` (``env``: variables set on top of :func:`command_env`), streaming each output
    line (stdout+stderr) into ``log``; (returncode, tail)."""
    log = log or run_logger()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd, cwd=str(cwd), env=command_env(env), shell=isinstance(cmd, str), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.rstrip("\n").split("\r"):   # progress bars redraw with \r
            if line.strip():
                tail.append(line)
                log.info(line)
    return proc.wait(), "\n".join(tail)


# ----------------------------------------------------------------------------- dvc repro


def _gate_mtimes(workspace: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in sorted((Path(workspace) / GATES_DIR).glob("*.json"))}


def stage_failure(stage: str, message: str, tail: str, returncode: int, workspace: str | Path,
                  gates_before: dict[Path, float], no_retry: Iterable[str] = ()) -> StageFailed:
    """The error for a failed stage: GateFailed when a gate file written since ``gates_before`` records
    failures, NotRetried when the stage matches a ``no_retry`` glob, else StageFailed."""
    changed = [p for p, m in _gate_mtimes(Path(workspace)).items() if gates_before.get(p) != m]
    failures = [f for p in changed for f in gate_failures(p)]
    if failures:
        return GateFailed(stage, f"{message}: gate failed: " + "; ".join(failures), tail, returncode)
    if any(fnmatch.fnmatchcase(stage.split("@", 1)[0], g) or fnmatch.fnmatchcase(stage, g) for g in no_retry):
        return NotRetried(stage, message, tail, returncode)
    return StageFailed(stage, message, tail, returncode)


def dvc_stage_is_current(stage: str, workspace: str | Path) -> bool:
    proc = subprocess.run([*DVC, "status", "--json", stage], cwd=str(workspace), env=command_env(),
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
    log = run_logger()
    before = _gate_mtimes(workspace)
    cmd = [*DVC, "repro", "--single-item", stage] + (["--force"] if force else [])
    log.info("$ dvc %s  (in %s)", shlex.join(cmd[3:]), workspace)
    rc, tail = stream_command(cmd, workspace, log)
    if rc == 0:
        return {"stage": stage, "skipped": "didn't change, skipping" in tail}
    code = re.findall(r"exited with (-?\d+)", tail)
    message = f"DVC stage '{stage}' failed (" + (f"its command exited with {code[-1]}" if code else f"dvc exit {rc}") + ")"
    raise stage_failure(stage, message, tail, rc, workspace, before, no_retry)


def _retry_transient(task_, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        return "GateFailed" not in (state.message or "") and "NotRetried" not in (state.message or "")
    return getattr(exc, "retryable", True)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def dvc_stage_task(stage: str, workspace: str, force: bool = False, no_retry: list[str] | None = None) -> dict:
    """One DVC stage as a Prefect task (its own log, retries, failed state naming the stage)."""
    return run_dvc_stage(stage, workspace, force=force, no_retry=no_retry or ())


# ----------------------------------------------------------------------------- stages run outside dvc repro

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def dvc_lock(workspace: str | Path) -> Iterator[None]:
    """One DVC call at a time per workspace (DVC's own repo lock fails instead of waiting): a lock shared by
    this process's threads, and a file lock (``.dvc/tmp/concurrent/dvc-calls.lock``) across processes
    (Dask workers)."""
    from filelock import FileLock

    root = Path(workspace).resolve()
    with _THREAD_LOCKS_GUARD:
        local = _THREAD_LOCKS.setdefault(str(root), threading.Lock())
    path = root / ".dvc" / "tmp" / "concurrent" / "dvc-calls.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with local, FileLock(str(path)):
        yield


def remove_outs(stage: str, workspace: str | Path) -> None:
    """Remove ``stage``'s outputs as ``dvc repro`` does before running its command (``Stage.run``): every
    output but the ``persist: true`` ones, which are only unprotected."""
    from dvc.repo import Repo

    dvcfile, _, name = stage.rpartition(":")      # "name@key" or "sub/dvc.yaml:name" (dag.Stage.address)
    with Repo(str(workspace)) as repo:              # paths given to DVC's API resolve against the cwd
        path = os.path.join(repo.root_dir, dvcfile or "dvc.yaml")
        with repo.lock:
            repo.stage.load_one(path=path, name=name).remove_outs(ignore_remove=False, force=False)


def commit_stage(stage: str, workspace: str | Path) -> None:
    """Record outputs produced outside ``dvc repro`` (concurrent runs) in dvc.lock and the cache."""
    rc, tail = stream_command([*DVC, "commit", "--force", stage], workspace)
    if rc:
        raise StageFailed(stage, f"'dvc commit {stage}' failed (exit {rc})", tail, rc)


def run_outside_repro(stage: str, workspace: str | Path, run: Callable[[], Any], *, check: bool = True) -> dict:
    """A stage run by ``run()`` instead of ``dvc repro``: skipped when DVC says it is up to date (unless
    ``check`` is False: the caller knows it is not, or forces it), else its outputs removed as
    ``dvc repro`` would, ``run()``, and recorded with :func:`commit_stage`; the DVC calls under
    :func:`dvc_lock`, ``run()`` outside it."""
    if check:
        with dvc_lock(workspace):
            current = dvc_stage_is_current(stage, workspace)
        if current:
            run_logger().info("Stage '%s' didn't change, skipping", stage)
            return {"stage": stage, "skipped": True}
    with dvc_lock(workspace):
        remove_outs(stage, workspace)
    run()
    with dvc_lock(workspace):
        commit_stage(stage, workspace)
    return {"stage": stage, "skipped": False}
