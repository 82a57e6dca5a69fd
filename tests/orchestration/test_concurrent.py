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
