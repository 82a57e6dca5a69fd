"""Independent DVC stages run side by side (pipeline.orchestration.concurrent) on a tiny throw-away DVC
project: two independent stages (a matrix ``w@a``, ``w@b``) sleeping ~1 s each and a third ``c``
depending on both. The scheduler is driven with plain threads (no Prefect server); the Prefect flow around
it is exercised by tests/orchestration/test_flows.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration.concurrent import (
    allot,
    run_concurrently,
    run_stage_command,
    stage_log,
    thread_env,
)
from pipeline.orchestration.dag import dvc_stages
from pipeline.orchestration.stages import StageFailed

PY = sys.executable

# work.py NAME SECONDS [DEPS...]: out/NAME.txt (deterministic: its name + its deps' contents) and, outside
# DVC, rec/NAME.json (pid, start/end on the system-wide monotonic clock, the thread variables it saw).
WORK = """\
import json, os, sys, time
name, secs = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
print(f"{name}: start")
if os.path.exists(f"fail-{name}"):
    print(f"{name}: boom, failing on purpose")
    sys.exit(3)
time.sleep(secs)
os.makedirs("out", exist_ok=True)
os.makedirs("rec", exist_ok=True)
open(f"out/{name}.txt", "w").write(name + "".join(open(d).read() for d in sys.argv[3:]))
json.dump({"pid": os.getpid(), "start": start, "end": time.monotonic(),
           "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS")},
          open(f"rec/{name}.json", "w"))
"""
# listed out of DAG order: c needs both matrix entries
DVC_SPEC = {"stages": {
    "c": {"cmd": "python work.py c 0.2 out/a.txt out/b.txt", "deps": ["work.py", "out/a.txt", "out/b.txt"],
          "outs": ["out/c.txt"]},
    "w": {"matrix": {"name": ["a", "b"]}, "cmd": "python work.py ${item.name} 1", "deps": ["work.py"],
          "outs": ["out/${item.name}.txt"]},
}}


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    _dvc(root, "init", "-q")
    _dvc(root, "config", "core.analytics", "false")
    (root / "work.py").write_text(WORK)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_SPEC, sort_keys=False))
    (root / ".gitignore").write_text("rec/\nfail-*\n")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True, env=env)
    return root


def run(root: Path, jobs: int = 2) -> list[dict]:
    """The scheduler with plain threads as the task runner."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return run_concurrently(
            dvc_stages(root), root, jobs,
            lambda st, threads: pool.submit(run_stage_command, st.address, st.cmd, root, threads, check=False),
        )


def records(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "rec").glob("*.json")}


def lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_allotment():
    assert allot(2, 1) == [2]                  # alone: every free thread
    assert allot(2, 2) == [1, 1]
    assert allot(2, 5) == [1, 1]               # never more stages than threads
    assert allot(5, 2) == [3, 2]               # the remainder to the earlier stage
    assert allot(0, 3) == []
    assert thread_env(3)["OMP_NUM_THREADS"] == "3" and thread_env(3)["MKL_NUM_THREADS"] == "3"


def test_independent_stages_overlap_and_lock_matches_dvc_repro(project, tmp_path):
    sequential = tmp_path / "seq"
    shutil.copytree(project, sequential)

    results = run(project, jobs=2)
    assert [r["stage"] for r in results] == ["w@a", "w@b", "c"]       # DAG order
    assert not any(r["skipped"] for r in results)
    rec = records(project)
    a, b, c = rec["a"], rec["b"], rec["c"]
    assert a["pid"] != b["pid"]                                        # two processes ...
    assert a["start"] < b["end"] and b["start"] < a["end"]             # ... at the same time
    assert c["start"] >= max(a["end"], b["end"])                       # c after both
    assert (a["omp"], b["omp"], c["omp"]) == ("1", "1", "2")           # split 2 threads; c alone gets both
    assert a["mkl"] == "1" and c["mkl"] == "2"
    assert [r["threads"] for r in results] == [1, 1, 2]
    assert "c: start" in stage_log(project, "c").read_text()           # each stage's own log file
    assert (project / "out/c.txt").read_text() == "cab"

    assert json.loads(_dvc(project, "status", "--json").stdout or "{}") == {}
    _dvc(sequential, "repro")                                          # what dvc repro records
    assert lock_stages(project) == lock_stages(sequential)

    again = run(project, jobs=2)                                       # nothing changed: nothing runs
    assert [r["stage"] for r in again] == ["w@a", "w@b", "c"] and all(r["skipped"] for r in again)
    assert records(project) == rec


def test_failing_stage_raises_naming_it_and_others_are_committed(project):
    (project / "fail-b").write_text("")
    with pytest.raises(StageFailed) as err:
        run(project, jobs=2)
    assert err.value.stage == "w@b"
    assert "DVC stage 'w@b' failed (its command exited with 3)" in str(err.value)
    assert "b: boom, failing on purpose" in str(err.value)             # the tail of its output
    locked = lock_stages(project)
    assert "w@a" in locked and "w@b" not in locked and "c" not in locked   # a ran to the end, committed
    assert json.loads(_dvc(project, "status", "--json", "w@a").stdout or "{}") == {}
    assert not (project / "rec/c.json").exists()                       # nothing launched after the failure


def test_wall_time_record(tmp_path):
    from pipeline.flows import timed_run

    class Flow:
        name = "toy-flow"

        def __call__(self, **kw):
            return [{"stage": "a", "skipped": False, "threads": 2, "seconds": 0.1}]

    out = tmp_path / "t" / "wall.json"
    timed_run(Flow(), {"workspace": str(tmp_path), "jobs": 3}, out)
    record = json.loads(out.read_text())
    assert record["flow"] == "toy-flow" and record["jobs"] == 3 and record["ok"]
    assert record["wall_seconds"] >= 0 and record["stages"][0]["threads"] == 2


# --------------------------------------------------------------- critical-path order and elastic threads

def _stage(address: str, *upstream: str):
    from pipeline.orchestration.dag import Stage
    return Stage(address, address, f"run {address}", tuple(upstream))


class _Manual:
    """submit() for the scheduler whose futures the test finishes by hand, in a chosen order."""

    def __init__(self):
        from concurrent.futures import Future
        self.Future, self.futures, self.launched = Future, {}, []

    def __call__(self, stage, threads):
        f = self.Future()
        self.futures[stage.address] = f
        self.launched.append((stage.address, threads))
        return f


def test_critical_path_sums_the_longest_chain_below_each_stage():
    from pipeline.orchestration.concurrent import critical_path, stage_seconds
    stages = [_stage("a"), _stage("b"), _stage("c", "a"), _stage("d", "a", "b")]
    path = critical_path(stages, {"a": 1, "b": 5, "c": 10, "d": 2})
    assert path == {"a": 11, "b": 7, "c": 10, "d": 2}
    assert critical_path(stages, {"a": 1, "c": 3, "d": 5})["b"] == 3 + 5   # unknown: the median (3)
    assert critical_path(stages, {}) == {"a": 2, "b": 2, "c": 1, "d": 1}  # no times: stages on the chain
    record = {"stages": [{"stage": "a", "seconds": 2.5, "threads": 1}, {"stage": "b", "skipped": True}]}
    assert stage_seconds(record) == {"a": 2.5} and stage_seconds("/no/such/file.json") == {}


def _drive(stages, root, jobs, seconds):
    """The scheduler in a thread with hand-finished futures; -> (thread, _Manual, retune calls, result)."""
    import threading

    from pipeline.orchestration.concurrent import run_concurrently
    manual, retuned, result = _Manual(), [], {}
    t = threading.Thread(target=lambda: result.update(r=run_concurrently(
        stages, root, jobs, manual, force=True, seconds=seconds,
        retune=lambda st, n: retuned.append((st.address, n)))))
    t.start()
    return t, manual, retuned, result


def _wait_for(cond):
    import time
    for _ in range(500):
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("scheduler did not get there")


def test_ready_stages_start_longest_path_first_and_idle_threads_are_lent(tmp_path):
    # short (1 s, then next below it) and long (100 s, then tail below it) are ready together: 1 thread
    # each, long first. When short ends, next takes its thread; when next ends and nothing is ready, long
    # is lent the free thread; after long, tail starts alone with both.
    stages = [_stage("short"), _stage("long"), _stage("tail", "long"), _stage("next", "short")]
    t, manual, retuned, result = _drive(stages, tmp_path, 2, {"short": 1, "long": 100, "tail": 100, "next": 1})
    _wait_for(lambda: len(manual.launched) == 2)
    assert manual.launched == [("long", 1), ("short", 1)]       # longest remaining path first
    manual.futures["short"].set_result({"stage": "short"})
    _wait_for(lambda: len(manual.launched) == 3)
    assert manual.launched[2] == ("next", 1) and retuned == []  # a ready stage takes the free thread
    manual.futures["next"].set_result({"stage": "next"})
    _wait_for(lambda: retuned)
    assert retuned == [("long", 2)]                              # nothing ready: lent to the running one
    manual.futures["long"].set_result({"stage": "long"})
    _wait_for(lambda: len(manual.launched) == 4)
    assert manual.launched[3] == ("tail", 2)
    manual.futures["tail"].set_result({"stage": "tail"})
    t.join(5)
    assert [r["stage"] for r in result["r"]] == ["short", "long", "tail", "next"]


def test_lent_threads_are_taken_back_when_more_stages_are_ready_than_threads_free(tmp_path):
    # 3 threads: a (long), x and b start with 1 each. x ends with nothing ready: a is lent its thread.
    # b ends: c1 and c2 become ready with 1 thread free, so a gives its lent thread back and both start.
    stages = [_stage("a"), _stage("x"), _stage("b"), _stage("c1", "b"), _stage("c2", "b")]
    t, manual, retuned, _ = _drive(stages, tmp_path, 3, {"a": 50, "x": 1, "b": 2, "c1": 1, "c2": 1})
    _wait_for(lambda: len(manual.launched) == 3)
    assert manual.launched == [("a", 1), ("b", 1), ("x", 1)]
    manual.futures["x"].set_result({})
    _wait_for(lambda: retuned)
    assert retuned == [("a", 2)]
    manual.futures["b"].set_result({})
    _wait_for(lambda: len(manual.launched) == 5)
    assert retuned == [("a", 2), ("a", 1)]                       # taken back before c1, c2 launched
    assert sorted(manual.launched[3:]) == [("c1", 1), ("c2", 1)]
    for name in ("c1", "c2", "a"):
        manual.futures[name].set_result({})
    t.join(5)
    assert not t.is_alive()


def test_follow_applies_the_executor_thread_count(tmp_path, monkeypatch):
    import torch

    from pipeline import threads
    control = tmp_path / "s.threads"
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.ENV, str(control))
        threads.set_threads(control, 1)
        monkeypatch.setattr(threads, "_last_read", float("-inf"))
        torch.set_num_threads(2)
        assert threads.follow() == 1 and torch.get_num_threads() == 1
        threads.set_threads(control, 2)
        assert threads.follow() is None                          # read at most every 2 s
        monkeypatch.setattr(threads, "_last_read", float("-inf"))
        assert threads.follow() == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv(threads.ENV)
        monkeypatch.setattr(threads, "_last_read", float("-inf"))
        assert threads.follow() is None                          # outside the executor: nothing
    finally:
        torch.set_num_threads(before)


def test_fanout_runs_the_stages_one_after_another_then_side_by_side(project, tmp_path):
    from pipeline.orchestration import fanout
    out = tmp_path / "fanout.json"
    assert fanout.main(["w@a", "w@b", "--workspace", str(project), "--jobs", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["stages"] == ["w@a", "w@b"] and record["jobs"] == 2
    assert [r["threads"] for r in record["sequential"]] == [2, 2]     # each alone with every thread
    assert [r["threads"] for r in record["concurrent"]] == [1, 1]     # split
    assert record["speedup"] == pytest.approx(record["sequential_seconds"] / record["concurrent_seconds"], rel=1e-3)
    a, b = records(project)["a"], records(project)["b"]                 # the side-by-side run's own records
    assert a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
    assert json.loads(_dvc(project, "status", "--json", "w@a", "w@b").stdout or "{}") == {}   # committed
