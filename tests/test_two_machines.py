"""Two "machines" x one process each, on localhost: the same training and evaluation as one process.

Each machine is its own launcher invocation -- ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank R
--master_addr 127.0.0.1 --master_port P`` (a static rendezvous, gloo), R = 0 and 1, started side by side
-- exactly the command each of two real machines runs (README, "Scaling out"), with the workspace on a
disk both see (here: the same one). Every rank records its node rank and the launcher that started it
(tests/ddp_stage1.py, tests/ddp_evaluate.py), so the tests see that both invocations ran and which did
what. NCCL between real machines is not tested here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import micro_config
from tests.distill.test_distill import run, weights
from tests.helpers_eval import eval_ws  # noqa: F401 - fixture
from tests.params import REPO

TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(module_args: list[str], cwd: Path) -> list[int]:
    """``python -m <module_args>`` under two torchrun invocations, node ranks 0 and 1, one process each;
    -> their pids (both must exit 0)."""
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", *module_args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for node, (p, log) in enumerate(zip(launchers, logs)):
        assert p.returncode == 0, f"machine {node}:\n{log[-3000:]}"
    return [p.pid for p in launchers]


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_one_rank_per_machine(recs: list[dict], launchers: list[int]) -> None:
    """Rank r ran on machine r (node rank r, local rank 0), started by that machine's launcher."""
    assert [(r["node_rank"], r["local_rank"], r["launcher_pid"]) for r in recs] == [
        (0, 0, launchers[0]), (1, 0, launchers[1])]


def test_two_machines_train_stage1_as_one_process(micro_world, tmp_path):
    """Stage 1 on 2 machines: the replicas end equal, and equal to 1 process with 2 accumulation rounds
    over the same global batch (tests/distill/test_distill.py::test_two_processes_train_as_one)."""
    out = tmp_path / "ddp"
    launchers = two_machines(["tests.ddp_stage1", str(micro_world["root"]), str(out)], REPO)
    recs = ranks(out)
    assert_one_rank_per_machine(recs, launchers)
    assert [r["num_processes"] for r in recs] == [2, 2] and recs[0]["distributed_type"] == "MULTI_CPU"
    assert recs[0]["metrics"]["stage1_steps"] == 4
    w0, w1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k

    cfg = micro_config(distill={"gradient_accumulation_steps": 2, "stage1": {"train": {"batch_size": 2}}})
    run(micro_world, "stage1", tmp_path / "one", tmp_path / "ck_one", cfg=cfg)
    one = weights(tmp_path / "one")
    assert weights(out / "student").keys() == one.keys() == w0.keys()
    worst = max(float((one[k] - w0[k]).abs().max()) for k in w0)
    assert worst <= 1e-6, worst   # 0.0 on CPU/gloo, as on one machine


def evaluate_workspace(src: Path, root: Path) -> Path:
    """A workspace whose evaluate inputs are ``src``'s (linked), with micro-batches of 2 images, so that
    the 4 test images make 2 batches: one per rank."""
    root.mkdir()
    params = yaml.safe_load((src / "params.yaml").read_text())
    params["runtime"]["sample_batch_size"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for rel in ("data/triplets", "data/captions", "models/backbone", "models/teacher", "models/student_stage1",
                "models/student"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to((src / rel).resolve())
    return root


def outputs(ws: Path) -> dict[str, bytes]:
    """evaluate's files, by path: the per-image tables, the teacher's reference PNGs, the sample grid."""
    return {str(p.relative_to(ws)): p.read_bytes() for d in ("metrics/per_image", "data/eval/teacher",
                                                            "reports/samples")
            for p in sorted((ws / d).rglob("*")) if p.is_file()}


def summaries(ws: Path) -> dict[str, dict]:
    """metrics/eval/<model>.json without the sampling time (a wall-clock figure)."""
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k != "sampling_seconds"}
            for p in sorted((ws / "metrics/eval").glob("*.json"))}


def test_two_machines_evaluate_as_one_process(eval_ws, tmp_path):  # noqa: F811
    """evaluate (its stage command) on 2 machines: each rank samples its own rows -- disjoint, together
    the split -- and the files written are the bytes one process writes."""
    one = evaluate_workspace(eval_ws, tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=one, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = evaluate_workspace(eval_ws, tmp_path / "two")
    (tmp_path / "ranks").mkdir()
    launchers = two_machines(["tests.ddp_evaluate", str(tmp_path / "ranks")], two)
    recs = ranks(tmp_path / "ranks")
    assert_one_rank_per_machine(recs, launchers)
    assert [(r["rank"], r["world_size"], r["exit"]) for r in recs] == [(0, 2, 0), (1, 2, 0)]
    seed = yaml.safe_load((one / "params.yaml").read_text())["evaluate"]["seed"]
    models = set(recs[0]["seeds"]) | set(recs[1]["seeds"])
    assert models == {"teacher", "backbone_only", "student_stage1", "student"}
    for model in models:       # rows 0-1 on machine 0, rows 2-3 on machine 1
        assert [sorted(r["seeds"].get(model, [])) for r in recs] == [[seed, seed + 1], [seed + 2, seed + 3]], model

    assert outputs(two) == outputs(one) and len(outputs(one)) > 8
    assert summaries(two) == summaries(one)
    assert not (two / ".parts").exists()                 # the ranks' scratch folders are gone
