"""Stage 2 on the teacher's trajectory (distill.stage2.noisy: teacher) on the micro world."""

import pandas as pd
import pytest
import torch

from pipeline.data.images import load_manifest
from pipeline.data.shards import EncodedSplit
from pipeline.distill import trajectories as traj
from pipeline.distill.trainer import distill, stage_data
from pipeline.models.world import load_controlnet, load_foundation
from tests.conftest import micro_config

CFG = dict(trajectories={"num_inference_steps": 3, "points_per_image": 2})


@pytest.fixture(scope="module")
def written(micro_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "trajectories"
    cfg = micro_config(**CFG)
    df = load_manifest(micro_world["scenes"] / "manifest.parquet")
    rows = df[df["split"] == "unlabelled"]
    m = traj.write_trajectories(cfg, load_foundation(micro_world["foundation"]),
                                load_controlnet(micro_world["teacher"]), rows, out, progress=False)
    return cfg, rows, out, m


def test_points_per_row_at_the_samplers_timesteps(micro_world, written):
    cfg, rows, out, m = written
    assert m["points"] == 2 * len(rows)
    split = EncodedSplit(out, traj.SPLIT)
    assert sorted({traj.row_of(p) for p in split.ids}) == sorted(rows["id"])
    got = split.gather(torch.arange(len(split)))
    latent = EncodedSplit(micro_world["encoded"], "unlabelled", ("latents",)).gather([0])["latents"]
    assert got["noisy"].shape[1:] == latent.shape[1:] and torch.isfinite(got["noisy"]).all()
    # two distinct steps of the 3-step schedule per row, each at one of the sampler's timesteps
    pipe = load_foundation(micro_world["foundation"])
    pipe.scheduler.set_timesteps(3)
    allowed = set(pipe.scheduler.timesteps.tolist())
    assert all(min(abs(t - a) for a in allowed) < 1e-3 for t in got["timestep"].tolist())
    per_row = got["timestep"].view(len(rows), 2)
    assert (per_row[:, 0] != per_row[:, 1]).all()


def test_chosen_steps_are_seeded_by_row_and_refuse_more_points_than_steps():
    cfg = micro_config(**CFG)
    assert traj.chosen_steps(cfg, 3) == traj.chosen_steps(cfg, 3)
    assert len(set(traj.chosen_steps(cfg, 3))) == 2
    with pytest.raises(ValueError, match="points_per_image"):
        traj.chosen_steps(micro_config(trajectories={"num_inference_steps": 1, "points_per_image": 2}), 0)


def test_stage2_from_the_teacher_reads_no_image_latent(micro_world, written, tmp_path):
    cfg, rows, out, _ = written
    data = stage_data(micro_world["encoded"], "stage2", "local", out)
    assert "latents" not in data.split.encoded.keys  # nothing of the hole's content is read
    b = data.batch(torch.tensor([0, 1, 2]))
    assert {"noisy", "timestep", "control"} <= set(b) and "latents" not in b
    tcfg = micro_config(**CFG, distill={"stage2": {"noisy": "teacher"}})
    kw = dict(foundation=micro_world["foundation"], teacher=micro_world["teacher"], encoded=micro_world["encoded"],
              live=None)
    distill(tcfg, "stage1", out=tmp_path / "s1", checkpoints=tmp_path / "ck1", **kw)
    m = distill(tcfg, "stage2", out=tmp_path / "s2", checkpoints=tmp_path / "ck2", init=tmp_path / "s1",
                trajectories=out, **kw)
    assert m["stage2_steps"] == 2 and m["stage2_final_distill"] > 0
    with pytest.raises(ValueError, match="trajectories"):
        distill(tcfg, "stage2", out=tmp_path / "x", checkpoints=tmp_path / "ckx", init=tmp_path / "s1", **kw)


def test_stale_trajectories_are_refused(micro_world, written, tmp_path):
    _, rows, out, _ = written
    encoded = EncodedSplit(micro_world["encoded"], "unlabelled", ("mask",))
    encoded.ids = encoded.ids[1:]  # a row the points came from is no longer in the encoded split
    with pytest.raises(ValueError, match="rerun the trajectories stage"):
        traj.TrajectoryData(out, encoded)
    assert isinstance(rows, pd.DataFrame)
