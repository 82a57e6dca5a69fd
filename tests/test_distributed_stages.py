"""The inference stages on 2 gloo processes write what 1 process writes (pipeline/distributed.py).

Each stage runs from its DVC command (``python -m stages.NAME``) under ``torch.distributed.run --standalone
--nproc_per_node 2`` (what a launch with params ``launch.processes: 2`` starts), every rank audited by
tests/audit_writes.py, and once in one process. Asserted for each: both ranks ran in a 2-process job; rank 1
wrote only inside its own part folder (and wrote something there: it did its share); rank 0 wrote in no
other rank's part (it removes a merged job's folder whole); no path was written by both ranks; and the
outputs are the same files, byte for byte, as one process's (the rows keep the batches they have with one
process). On today's code every rank runs the whole stage and writes the outputs itself: the audit fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import deep_merge
from pipeline.distributed import World
from tests.conftest import MICRO
from tests.helpers_eval import EVAL_PARAMS, eval_ws, link  # noqa: F401 - fixture
from tests.params import full

REPO = Path(__file__).resolve().parents[1]
# micro-batches small enough that each split has several, so that both ranks get rows
SMALL_BATCHES = {"runtime": {"encode_batch_size": 4, "sample_batch_size": 2}}


def launch_two(ws: Path, module: str, *args: str) -> list[dict]:
    """``module`` on 2 gloo processes in workspace ``ws``; each rank's audit log (tests.audit_writes)."""
    logs = ws / f".audit-{module}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tests.audit_writes", str(logs), str(ws), module, *args],
                         cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    ranks = [json.loads((logs / f"rank-{r}.json").read_text()) for r in (0, 1)]
    shutil.rmtree(logs)
    assert [(r["rank"], r["world_size"], r["exit"]) for r in ranks] == [(0, 2, 0), (1, 2, 0)]
    return ranks


def assert_own_shares(ranks: list[dict], training: str | None = None) -> None:
    """Rank 1 writes only in .parts/<job>/rank-00001 (and does write a file there); rank 0 writes in no other
    rank's part, removing only a whole job folder; no file is written by both ranks. ``training``: a DDP
    run's checkpoint folder, where accelerate's save_state makes the checkpoint's folders on every process
    (each writes its own RNG state file in it with torch's native writer, which the audit does not see)."""
    def part_of(path: str) -> str | None:
        p = Path(path).parts
        return p[2] if len(p) > 2 and p[0] == ".parts" else None

    for what, path in ranks[1]["writes"]:
        if training and what == "mkdir" and Path(path).is_relative_to(training):
            continue
        assert part_of(path) == "rank-00001", f"rank 1 {what} {path}: outside its part"
    assert any(what == "write" for what, _ in ranks[1]["writes"]), "rank 1 wrote no part: it did no share"
    for what, path in ranks[0]["writes"]:
        assert part_of(path) in (None, "rank-00000"), f"rank 0 {what} {path}: in another rank's part"
    written = [{p for what, p in r["writes"] if what == "write"} for r in ranks]
    assert not written[0] & written[1], f"written by both ranks: {sorted(written[0] & written[1])}"


def assert_same_files(one: Path, two: Path) -> list[str]:
    """The same relative file names under both folders, byte for byte."""
    names = [sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()) for d in (one, two)]
    assert names[0] == names[1]
    for name in names[0]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert names[0]
    return names[0]


def run_one(ws: Path, module, *args: str) -> None:
    with contextlib.chdir(ws):
        assert module.main(list(args)) == 0


def no_parts_left(ws: Path) -> None:
    assert not (ws / ".parts").exists(), "the parts were not removed after the merge"


@pytest.fixture(scope="module")
def stage_ws(micro_world, tmp_path_factory):
    """A workspace in the layout the DVC stages read (pipeline.paths) on the micro world, small micro-batches."""

    def make(name: str, overrides: dict | None = None) -> Path:
        root = tmp_path_factory.mktemp(name)
        (root / "params.yaml").write_text(yaml.safe_dump(full(deep_merge(deep_merge(MICRO, SMALL_BATCHES),
                                                                          overrides or {}))))
        for src, dst in ((micro_world["scenes"], "data/triplets"), (micro_world["foundation"], "models/backbone"),
                         (micro_world["teacher"], "models/teacher")):
            link(src, root / dst)
        scenes = pd.read_parquet(micro_world["scenes"] / "manifest.parquet")
        (root / "data/captions").mkdir(parents=True)
        scenes[["id", "split", "local_prompt", "global_prompt"]].to_parquet(root / "data/captions/captions.parquet")
        return root

    return make


def test_share_is_whole_micro_batches_in_rank_order():
    """accelerate's split_between_processes rule over micro-batches: contiguous, every row once, in order."""
    for n, batch, size in ((13, 4, 2), (4, 4, 2), (0, 3, 2), (30, 2, 3), (7, 1, 8)):
        shares = [World(r, size).rows(n, batch) for r in range(size)]
        assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
        assert all(s.start % batch == 0 for s in shares if s.stop > s.start)
        counts = [-(-(s.stop - s.start) // batch) for s in shares]
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    assert World().rows(13, 4) == slice(0, 13)


def test_encode_on_two_processes_writes_the_one_process_shards(stage_ws):
    """Every split's shard file (safetensors + ids) byte-equal; one metrics file, from rank 0."""
    from stages import encode

    ws = stage_ws("dist_encode")
    run_one(ws, encode, "--out", "data/encoded_one")
    one_metrics = (ws / "metrics/encode.json").read_bytes()
    (ws / "metrics/encode.json").unlink()
    ranks = launch_two(ws, "stages.encode", "--out", "data/encoded_two")
    assert_own_shares(ranks)
    names = assert_same_files(ws / "data/encoded_one", ws / "data/encoded_two")
    assert "labelled/shard-00000-of-00001.safetensors" in names
    assert (ws / "metrics/encode.json").read_bytes() == one_metrics
    no_parts_left(ws)


def test_encode_shards_compose_with_processes(stage_ws):
    """--shard i/N (the flow's sharded runs) on 2 processes: the same shard file one process writes."""
    from stages import encode

    ws = stage_ws("dist_encode_shard")
    run_one(ws, encode, "--out", "data/one", "--shard", "1/2")
    ranks = launch_two(ws, "stages.encode", "--out", "data/two", "--shard", "1/2")
    assert_own_shares(ranks)
    assert "labelled/shard-00001-of-00002.parquet" in assert_same_files(ws / "data/one", ws / "data/two")


def test_trajectories_on_two_processes_write_the_one_process_points(stage_ws):
    """Each row keeps its seed and steps (seed + its global index): the shard byte-equal."""
    from stages import trajectories

    ws = stage_ws("dist_traj", {"trajectories": {"num_inference_steps": 2, "points_per_image": 2}})
    run_one(ws, trajectories)
    (ws / "data/trajectories").rename(ws / "data/trajectories_one")
    one = json.loads((ws / "metrics/trajectories.json").read_text())
    ranks = launch_two(ws, "stages.trajectories")
    assert_own_shares(ranks)
    assert_same_files(ws / "data/trajectories_one", ws / "data/trajectories")
    two = json.loads((ws / "metrics/trajectories.json").read_text())
    assert {k: v for k, v in two.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    no_parts_left(ws)


@pytest.fixture(scope="module")
def tiny_captions_ws(tmp_path_factory) -> Path:
    """Triplets and a pseudo-labeller (tests.helpers_data), with the params that built them."""
    from tests.helpers_data import TINY, TINY_LABELLER, build_tiny

    root = tmp_path_factory.mktemp("dist_caption")
    build_tiny(root)
    params = {**TINY, "caption": {"qwen": {"cache_dir": str(root / "caption_cache")}, "pseudo_labeller": TINY_LABELLER}}
    (root / "params.yaml").write_text(yaml.safe_dump(full(params)))
    return root


def test_caption_on_two_processes_writes_the_one_process_captions(tiny_captions_ws):
    """captions.parquet byte-equal (annotations row by row, the pseudo-labeller in its batches)."""
    from stages import caption

    ws = tiny_captions_ws
    args = ["--manifest", "triplets/manifest.parquet", "--pseudo-labeller", "pseudo_labeller"]
    run_one(ws, caption, *args, "--out", "one/captions.parquet")
    ranks = launch_two(ws, "stages.caption", *args, "--out", "two/captions.parquet")
    assert_own_shares(ranks)
    assert_same_files(ws / "one", ws / "two")
    no_parts_left(ws)


@pytest.fixture(scope="module")
def eval_pair(eval_ws, tmp_path_factory):
    """Two workspaces on eval_ws's models and data (students trained), one image per micro-batch."""

    def make(name: str, overrides: dict) -> Path:
        root = tmp_path_factory.mktemp(name)
        params = deep_merge(deep_merge(EVAL_PARAMS, {"runtime": {"sample_batch_size": 1},
                                                     "evaluate": {"num_samples": 3}}), overrides)
        (root / "params.yaml").write_text(yaml.safe_dump(full(params)))
        for sub in ("data/triplets", "data/encoded", "data/captions", "models/backbone", "models/teacher",
                    "models/student_stage1", "models/student"):
            link((eval_ws / sub).resolve(), root / sub)
        return root

    return make


def write_reference(ws: Path) -> None:
    """The teacher's outputs on the test rows (data/eval/teacher), as the evaluate stage writes them."""
    from pipeline import paths
    from pipeline.config import load
    from pipeline.evaluation.evaluate import TEACHER, evaluate_model
    from pipeline.runtime import runtime
    from pipeline.stage_io import evaluation_rows

    with contextlib.chdir(ws):
        cfg = load("params.yaml")
        evaluate_model(cfg, runtime(cfg).load_foundation(paths.BACKBONE), TEACHER, paths.TEACHER,
                       evaluation_rows(cfg), reference=paths.EVAL_REFERENCE, write_reference=True)


def test_evaluate_on_two_processes_writes_the_one_process_tables(eval_pair):
    """Per-image tables, the teacher's reference PNGs and the report's samples byte-equal; each model's
    summary equal but for its sampling_seconds (a clock reading)."""
    from stages import evaluate

    one, two = eval_pair("dist_eval_one", {}), eval_pair("dist_eval_two", {})
    run_one(one, evaluate)
    ranks = launch_two(two, "stages.evaluate")
    assert_own_shares(ranks)
    tables = assert_same_files(one / "metrics/per_image", two / "metrics/per_image")
    assert len(tables) == 4 and len(pd.read_csv(two / "metrics/per_image/student.csv")) == 4
    assert len(assert_same_files(one / "data/eval/teacher", two / "data/eval/teacher")) == 1 + 4  # + marker
    assert len(assert_same_files(one / "reports/samples", two / "reports/samples")) == 3 * 7
    for f in sorted((one / "metrics/eval").glob("*.json")):
        a, b = (json.loads((d / "metrics/eval" / f.name).read_text()) for d in (one, two))
        assert a.pop("sampling_seconds") > 0 and b.pop("sampling_seconds") > 0
        assert a == b, f.name
    no_parts_left(two)


def test_ablation_run_on_two_processes_trains_ddp_and_splits_its_evaluation(eval_pair):
    """from_scratch-s0: DDP training (2 x 2 samples a step) then the evaluation split across the ranks, against
    one process with 2 accumulation rounds of 2 (the same micro-batches and noise: equal weights on the CPU,
    tests/distill/test_distill.py). The per-image table byte-equal, the model's weights equal, rank 0 alone
    writes the run's metrics and model."""
    from safetensors.torch import load_file
    from stages import ablate

    accum = {"distill": {"gradient_accumulation_steps": 2, "stage1": {"train": {"batch_size": 2}}}}
    one, two = eval_pair("dist_ablate_one", accum), eval_pair("dist_ablate_two", {})
    write_reference(one)   # the teacher's outputs the run agrees against
    shutil.copytree(one / "data/eval/teacher", two / "data/eval/teacher")
    run_one(one, ablate, "from_scratch", "0")
    name = "from_scratch-s0"
    ranks = launch_two(two, "stages.ablate", "from_scratch", "0")
    assert_own_shares(ranks, training=f"checkpoints/ablations/{name}")
    assert ((one / f"metrics/per_image/ablations/{name}.csv").read_bytes()
            == (two / f"metrics/per_image/ablations/{name}.csv").read_bytes())
    w1, w2 = (load_file(str(d / f"models/ablations/{name}/diffusion_pytorch_model.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    a, b = (json.loads((d / f"metrics/ablations/{name}.json").read_text()) for d in (one, two))
    for k in ("psnr", "ssim", "psnr_masked", "agree_psnr", "stage1_steps"):
        assert a[k] == b[k], k
    no_parts_left(two)


def test_evaluation_keeps_every_output_when_a_distribution_metric_is_asked_for(eval_pair):
    """With FID weights named (here missing: not computed, with the reason), every output and target is kept
    for the distribution metrics beside the grid's samples (a name clash once made this path fail)."""
    from pipeline import paths
    from pipeline.config import load
    from pipeline.evaluation.evaluate import BACKBONE_ONLY, evaluate_model
    from pipeline.runtime import runtime
    from pipeline.stage_io import evaluation_rows

    ws = eval_pair("dist_keep_all", {"evaluate": {"fid_weights": "missing/inception.pt"}})
    with contextlib.chdir(ws):
        cfg = load("params.yaml")
        ev = evaluate_model(cfg, runtime(cfg).load_foundation(paths.BACKBONE), BACKBONE_ONLY, None,
                            evaluation_rows(cfg))
    assert ev.summary["fid"] is None and "not found" in ev.summary["not_computed"]["fid"]
    assert len(ev.samples) == 3 and len(ev.per_image) == 4
