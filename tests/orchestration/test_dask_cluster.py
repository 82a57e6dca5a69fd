"""Independent stages fanned out over a real ``dask.distributed`` cluster by the Prefect flow.

A ``LocalCluster(processes=True, n_workers=2, threads_per_worker=1)`` is a scheduler and two worker
processes (each a child of its own nanny), reached by address exactly as a cluster on other machines is
(``flows.dask_address``); the flow code under test is the real one (:func:`pipeline.flows.ablations_flow`
-> :mod:`pipeline.orchestration.concurrent` on prefect-dask's DaskTaskRunner). The DVC project is a
small synthetic one: an upstream ``base`` and an ``ablate`` matrix of two independent entries depending
on it -- the shape of the real ablations (a shared stage 1, independent runs) -- with commands that sleep
and record which process tree ran them. The real ablation stages would only add minutes of training here;
what the fan-out does with a stage (its ``cmd`` in the workspace, ``dvc commit``) does not depend on what
the command computes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import flows
from tests.orchestration.test_flows import harness  # noqa: F401 -- the module's Prefect test server
from tests.params import full

PY = sys.executable

# work.py NAME SECONDS [DEPS...]: out/NAME.txt (its name + its deps' contents); with rec/meet, runs a and
# b each wait until the other has started (120 s at most: run one after the other, they fail); and, outside DVC,
# rec/NAME.json: its pid, every ancestor pid (the Dask worker process that ran it is one), start/end,
# OMP_NUM_THREADS.
WORK = """\
import json, os, sys, time

def parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])

name, secs = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
os.makedirs("rec", exist_ok=True)
open(f"rec/started-{name}", "w").close()
other = {"a": "b", "b": "a"}.get(name) if os.path.exists("rec/meet") else None
while other and not os.path.exists(f"rec/started-{other}"):   # the two runs meet: side by side, or no end
    if time.monotonic() - start > 120:
        sys.exit(f"{name}: {other} never ran beside it")
    time.sleep(0.1)
time.sleep(secs)
os.makedirs("out", exist_ok=True)
open(f"out/{name}.txt", "w").write(name + "".join(open(d).read() for d in sys.argv[3:]))
chain = [os.getpid()]
while chain[-1] > 1:
    chain.append(parent(chain[-1]))
json.dump({"pid": os.getpid(), "ancestors": chain[1:], "start": start, "end": time.monotonic(),
           "omp": os.environ.get("OMP_NUM_THREADS")}, open(f"rec/{name}.json", "w"))
"""
DVC_SPEC = {"stages": {
    "ablate": {"matrix": {"run": ["a", "b"]}, "cmd": "python work.py ${item.run} 1 out/base.txt",
               "deps": ["work.py", "out/base.txt"], "outs": ["out/${item.run}.txt"]},
    "base": {"cmd": "python work.py base 0.1", "deps": ["work.py"], "outs": ["out/base.txt"]},
}}


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, check=True, env=env)


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([PY, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    _dvc(root, "config", "core.analytics", "false")
    (root / "work.py").write_text(WORK)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_SPEC, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(full({"flows": {"retries": 0}}), sort_keys=False))
    (root / ".gitignore").write_text("rec/\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    return root


@pytest.fixture
def cluster():
    """A scheduler and two single-threaded worker processes; -> (address, {worker address: worker pid})."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.wait_for_workers(2)
        yield lc.scheduler_address, client.run(os.getpid)


def test_a_stage_on_a_worker_gets_its_machines_share_of_cpus(monkeypatch):
    """8 CPUs on host 10.0.0.1, where two workers hold 1 and 3 threads (a third worker is elsewhere): a
    stage there gets 8 // 4 = 2 threads, whatever the flow machine's budget; off a worker, the budget."""
    from types import SimpleNamespace

    from pipeline.orchestration import cluster

    workers = {"tcp://10.0.0.1:1": {"host": "10.0.0.1", "nthreads": 1},
               "tcp://10.0.0.1:2": {"host": "10.0.0.1", "nthreads": 3},
               "tcp://10.0.0.2:1": {"host": "10.0.0.2", "nthreads": 16}}
    worker = SimpleNamespace(address="tcp://10.0.0.1:2", ip="10.0.0.1", state=SimpleNamespace(nthreads=3),
                             loop=None, scheduler=SimpleNamespace(identity=lambda n_workers: {"workers": workers}))
    assert cluster.stage_threads(5) == (5, None)                      # not on a worker: the flow's budget
    monkeypatch.setattr(cluster, "current_worker", lambda: worker)
    monkeypatch.setattr("distributed.utils.sync", lambda loop, fn, **kw: fn(**kw))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cluster.stage_threads(5) == (2, "tcp://10.0.0.1:2")


@pytest.mark.slow   # a Prefect test server and a Dask cluster of its own (35-75 s here)
def test_two_ablation_runs_fan_out_to_two_dask_worker_processes(harness, project, cluster, tmp_path):  # noqa: F811
    address, worker_pids = cluster
    assert len(set(worker_pids.values()) | {os.getpid()}) == 3          # two worker processes besides this one
    by_dvc_repro = tmp_path / "repro"
    shutil.copytree(project, by_dvc_repro)
    (project / "rec").mkdir()
    (project / "rec/meet").touch()

    # jobs=1 would run one stage at a time on this machine: on a cluster, its workers decide
    results = flows.ablations_flow(str(project), pattern="ablate", jobs=1,
                                   overrides={"flows": {"dask_address": address}})

    assert [r["stage"] for r in results] == ["base", "ablate@a", "ablate@b"]
    assert not any(r["skipped"] for r in results)
    ran = {r["stage"]: r for r in results}
    assert {ran["ablate@a"]["worker"], ran["ablate@b"]["worker"]} == set(worker_pids)   # one run per worker
    rec = {n: json.loads((project / "rec" / f"{n}.json").read_text()) for n in ("a", "b")}
    for name in ("a", "b"):    # the command ran in the process tree of the worker the flow says ran it
        assert worker_pids[ran[f"ablate@{name}"]["worker"]] in rec[name]["ancestors"]
    assert rec["a"]["start"] < rec["b"]["end"] and rec["b"]["start"] < rec["a"]["end"]   # side by side (they met)
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))    # this host's CPUs over its 2 worker threads
    assert rec["a"]["omp"] == rec["b"]["omp"] == share         # (not the nanny's 1, on hosts of 4+ CPUs)
    assert ran["ablate@a"]["threads"] == ran["ablate@b"]["threads"] == int(share)

    assert json.loads(_dvc(project, "status", "--json") or "{}") == {}   # committed as dvc repro would
    _dvc(by_dvc_repro, "repro")
    locked, repro = (yaml.safe_load((p / "dvc.lock").read_text())["stages"] for p in (project, by_dvc_repro))
    assert set(locked) == {"base", "ablate@a", "ablate@b"} and locked == repro
    assert (project / "out/a.txt").read_text() == "abase" and (project / "out/b.txt").read_text() == "bbase"
