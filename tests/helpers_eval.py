"""A micro evaluation workspace (the layout the DVC stages read, relative to its root), built on the
micro world: data/triplets and data/captions from the micro scenes, the micro foundation and teacher,
and two quickly distilled students (models/student_stage1, models/student)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import MICRO

EVAL_PARAMS = {
    **MICRO,
    "evaluate": {**MICRO["evaluate"], "num_samples": 2},
    "ablations": {**MICRO["ablations"], "headline": ["full", "from_scratch"], "headline_seeds": [0, 1],
                  "others": ["wo_af"], "seeds": [0]},
    "benchmark": {"batch_size": 2, "warmup": 1, "repeats": 2, "extra_layers": [2]},
}


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


@pytest.fixture(scope="session")
def eval_ws(micro_world, tmp_path_factory) -> Path:
    from pipeline.distill.trainer import distill
    from pipeline.metrics_io import write_json
    from tests.params import config, full

    root = tmp_path_factory.mktemp("evalws")
    (root / "params.yaml").write_text(yaml.safe_dump(full(EVAL_PARAMS)))
    link(micro_world["scenes"], root / "data/triplets")
    link(micro_world["encoded"], root / "data/encoded")
    link(micro_world["foundation"], root / "models/backbone")
    link(micro_world["teacher"], root / "models/teacher")
    scenes = pd.read_parquet(micro_world["scenes"] / "manifest.parquet")
    (root / "data/captions").mkdir(parents=True)
    scenes[["id", "split", "local_prompt", "global_prompt"]].to_parquet(root / "data/captions/captions.parquet")
    cfg = config(EVAL_PARAMS)
    kw = dict(foundation=micro_world["foundation"], teacher=micro_world["teacher"], encoded=micro_world["encoded"])
    for stage, out, init in (("stage1", "student_stage1", None), ("stage2", "student", "student_stage1")):
        m = distill(cfg, stage, out=root / "models" / out, checkpoints=root / "checkpoints" / f"distill_{stage}",
                    live=root / "dvclive" / f"distill_{stage}", init=root / "models" / init if init else None, **kw)
        write_json(root / "metrics/distill" / f"{stage}.json", m)
    return root


@contextlib.contextmanager
def inside(path: Path):
    with contextlib.chdir(path):
        yield


def ensure_outputs(ws: Path) -> Path:
    """Run evaluate, the ablation runs that EVAL_PARAMS asks for at the headline, and the benchmark in
    the workspace, unless an earlier test already did (session-shared outputs)."""
    from stages import ablate, benchmark, evaluate

    with inside(ws):
        if not (ws / "metrics/eval/student.json").exists():
            assert evaluate.main([]) == 0
        for variant, seed in (("full", 0), ("full", 1), ("from_scratch", 0), ("from_scratch", 1)):
            if not (ws / f"metrics/ablations/{variant}-s{seed}.json").exists():
                assert ablate.main([variant, str(seed)]) == 0
        if not (ws / "metrics/benchmark.json").exists():
            assert benchmark.main([]) == 0
    return ws
