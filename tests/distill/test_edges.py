"""Condition edges, end to end on the micro world: the teacher trained on edge maps, the encode stage's
edge latents, one distillation step of each stage and one sampling call, each through the one code path the
default (inpaint) runs; ControlNets with 16 input channels (no mask channel) and uniform L_task weighting."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.shards import load_split, tensor_keys
from tests.conftest import micro_config

ONE_STEP = {"condition": "edges",
            "distill": {"checkpoint_every": 1,
                        "stage1": {"train": {"steps": 1, "batch_size": 2}},
                        "stage2": {"train": {"steps": 1, "batch_size": 2}}}}


@pytest.fixture(scope="module")
def edges_world(micro_world, tmp_path_factory):
    """The micro world's scenes and foundation (neither reads the condition), an edges teacher and shards."""
    from pipeline.data.encode import encode_dataset
    from pipeline.data.images import load_manifest
    from pipeline.foundation.teacher import train_teacher
    from pipeline.models.world import load_foundation

    root = tmp_path_factory.mktemp("edges")
    cfg = micro_config(**ONE_STEP)
    train_teacher(cfg, micro_world["scenes"], micro_world["foundation"], root / "teacher", root / "ck/teacher", None)
    encode_dataset(load_foundation(micro_world["foundation"]), load_manifest(micro_world["scenes"] / "manifest.parquet"),
                   root / "encoded", cfg.data.image_size, cfg.text.max_sequence_length, condition="edges")
    return {"root": root, "cfg": cfg, "scenes": micro_world["scenes"], "foundation": micro_world["foundation"],
            "teacher": root / "teacher", "encoded": root / "encoded"}


def _in_channels(cn) -> int:
    return cn.pos_embed_input.proj.weight.shape[1]


def test_edges_shards_hold_the_encoded_edge_map_and_no_mask(edges_world):
    _, t = load_split(edges_world["encoded"], "labelled", tensor_keys("edges"))
    assert "control_latents" in t and "masked_latents" not in t and "mask" not in t
    assert t["control_latents"].shape == t["latents"].shape


def test_edges_teacher_distills_in_both_stages_and_samples(edges_world):
    from pipeline.distill.trainer import DistillLoss, labelled_batch, stage_data
    from pipeline.distill.trainer import distill
    from pipeline.distill.losses import task_loss
    from pipeline.evaluation.sampler import inpaint_images
    from pipeline.models import flow
    from pipeline.models.mapping import TEACHER_CONVENTION
    from pipeline.models.world import load_controlnet, load_foundation
    from pipeline.data.images import read_images
    from pipeline.foundation.data import scenes

    w, cfg = edges_world, edges_world["cfg"]
    teacher = load_controlnet(w["teacher"], condition="edges")
    assert _in_channels(teacher) == 16 and teacher.config.extra_conditioning_channels == 0
    with pytest.raises(Exception):  # an edges teacher is not an inpaint ControlNet
        load_controlnet(w["teacher"], condition="inpaint")

    # the batch: the encoded edge map as control, no loss mask -> L_task is the plain flow-matching MSE
    data = stage_data(w["encoded"], "stage1", "local", condition="edges")
    batch = data.batch(torch.arange(2))
    assert "mask" not in batch and batch["control"].shape[1] == 16
    x, tgt, hole = labelled_batch(batch, flow.training_scheduler(cfg.scheduler), cfg, torch.Generator().manual_seed(0))
    assert hole is None
    pred = torch.randn_like(tgt)
    assert torch.equal(task_loss(pred, tgt, hole, cfg.distill.alpha, x.weighting),
                       flow.flow_loss(pred, tgt, x.weighting))
    for alpha in (0.1, 0.9):  # uniform weighting: alpha plays no part
        assert torch.equal(task_loss(pred, tgt, None, alpha, x.weighting), task_loss(pred, tgt, None, 0.5, x.weighting))

    kw = dict(foundation=w["foundation"], teacher=w["teacher"], encoded=w["encoded"])
    root = w["root"]
    m1 = distill(cfg, "stage1", out=root / "student_stage1", checkpoints=root / "ck/s1", live=None, **kw)
    assert m1["stage1_steps"] == 1 and torch.isfinite(torch.tensor(m1["stage1_final_loss"]))
    m2 = distill(cfg, "stage2", out=root / "student", checkpoints=root / "ck/s2", live=None,
                 init=root / "student_stage1", **kw)
    assert m2["stage2_steps"] == 1 and torch.isfinite(torch.tensor(m2["stage2_final_loss"]))
    student = load_controlnet(root / "student", condition="edges")
    assert _in_channels(student) == 16 and student.config.num_layers == cfg.distill.student_layers

    df = scenes(w["scenes"], ("val",)).iloc[:2]
    images = read_images(df["image"], cfg.data.image_size)
    pipe = load_foundation(w["foundation"])
    out = inpaint_images(pipe, teacher, TEACHER_CONVENTION, images, None, list(df["local_prompt"]), seeds=[0, 1],
                         num_inference_steps=2, guidance_scale=cfg.evaluate.guidance_scale,
                         conditioning_scale=cfg.evaluate.conditioning_scale,
                         max_sequence_length=cfg.text.max_sequence_length, condition="edges")
    assert out.shape == images.shape and torch.isfinite(out).all()
