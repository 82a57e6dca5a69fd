"""Student construction, stage 1/2 distillation, checkpoints and resume on the micro world."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline
from safetensors.torch import load_file

from pipeline.distill import trainer as trainer_mod
from pipeline.distill.trainer import DistillLoss, distill, stage_data
from pipeline.models import flow
from pipeline.models.student import controlnet_from_backbone
from pipeline.models.world import load_foundation
from pipeline.training import NonFiniteLoss
from tests.conftest import micro_config


def run(world, stage, out, ck, cfg=None, init=None, **kw):
    return distill(cfg or world["cfg"], stage, foundation=world["foundation"], teacher=world["teacher"],
                   encoded=world["encoded"], out=out, checkpoints=ck, live=None, init=init, **kw)


def weights(path):
    return load_file(str(Path(path) / "diffusion_pytorch_model.safetensors"))


def test_student_init_copies_backbone_blocks_and_leaves_config(micro_world):
    backbone = load_foundation(micro_world["foundation"]).transformer
    before = dict(backbone.config)
    student = controlnet_from_backbone(backbone, 3)
    assert dict(backbone.config) == before and backbone.config.num_layers == 6
    assert student.config.num_layers == 3 and student.config.extra_conditioning_channels == 1
    for i in range(3):
        for (k, a), (_, b) in zip(student.transformer_blocks[i].state_dict().items(),
                                  backbone.transformer_blocks[i].state_dict().items()):
            assert torch.equal(a, b), k
    for name in ("pos_embed", "time_text_embed", "context_embedder"):
        for k, v in getattr(student, name).state_dict().items():
            assert torch.equal(v, getattr(backbone, name).state_dict()[k])
    assert all(torch.count_nonzero(p) == 0 for m in (*student.controlnet_blocks, student.pos_embed_input)
               for p in m.parameters())


def test_student_deeper_than_backbone_is_refused(micro_world):
    backbone = load_foundation(micro_world["foundation"]).transformer
    with pytest.raises(ValueError, match="student_layers: 7 is out of range"):
        controlnet_from_backbone(backbone, 7)


def test_stage1_writes_a_student_the_stock_pipeline_loads(micro_world, tmp_path):
    m = run(micro_world, "stage1", tmp_path / "s1", tmp_path / "ck")
    assert m["stage1_steps"] == 4 and all(k in m for k in ("stage1_final_task", "stage1_final_distill",
                                                            "stage1_final_af"))
    assert (tmp_path / "s1" / "README.md").read_text().startswith("---")
    pipe = StableDiffusion3ControlNetInpaintingPipeline.from_pretrained(
        micro_world["foundation"], controlnet=SD3ControlNetModel.from_pretrained(tmp_path / "s1"),
        text_encoder_3=None, tokenizer_3=None)
    from PIL import Image
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    out = pipe("a red circle", control_image=img, control_mask=mask, num_inference_steps=2, height=16, width=16,
               max_sequence_length=2, guidance_scale=1.0, output_type="np").images
    assert out.shape == (1, 16, 16, 3)


def test_stage2_batches_carry_no_target(micro_world, monkeypatch):
    cfg = micro_world["cfg"]
    pipe = load_foundation(micro_world["foundation"])
    teacher = SD3ControlNetModel.from_pretrained(micro_world["teacher"])
    student = controlnet_from_backbone(pipe.transformer, 3)
    loss = DistillLoss(cfg, "stage2", cfg.distill.stage2, pipe.transformer, teacher, student)
    monkeypatch.setattr(flow, "target", lambda *a, **k: pytest.fail("stage 2 computed a target"))
    monkeypatch.setattr(trainer_mod, "labelled_batch", lambda *a, **k: pytest.fail("stage 2 built a labelled batch"))
    data = stage_data(micro_world["encoded"], "stage2", "local")
    batch = {k: v[:2] for k, v in data.items()}
    terms = loss(student, batch, torch.Generator().manual_seed(0))
    assert set(terms) == {"distill", "af", "loss"}
    assert float(terms["af"]) > 0  # the teacher's residuals are non-zero, the fresh student's are zero


def test_stage2_refuses_a_task_weight():
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="distill.stage2.loss.task"):
        micro_config(distill={"stage2": {"loss": {"task": 1.0}}})


def test_kill_and_resume_equals_uninterrupted(micro_world, tmp_path):
    run(micro_world, "stage1", tmp_path / "full", tmp_path / "ck_full")
    m = run(micro_world, "stage1", tmp_path / "resumed", tmp_path / "ck_res", max_steps_this_run=2)  # "killed"
    assert m["stage1_steps"] == 2 and not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in (tmp_path / "ck_res").glob("step-*")) == ["step-00000002"]
    run(micro_world, "stage1", tmp_path / "resumed", tmp_path / "ck_res")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list((tmp_path / "ck_res").glob("step-*"))) <= micro_world["cfg"].distill.keep_checkpoints


def test_changed_params_do_not_resume_stale_checkpoints(micro_world, tmp_path):
    run(micro_world, "stage1", tmp_path / "a", tmp_path / "ck", max_steps_this_run=2)
    cfg = micro_config(distill={"alpha": 0.5})
    m = run(micro_world, "stage1", tmp_path / "a", tmp_path / "ck", cfg=cfg, max_steps_this_run=1)
    assert m["stage1_steps"] == 1  # started afresh, not from step 2


def test_nan_loss_stops_with_last_good_checkpoint(micro_world, tmp_path, monkeypatch):
    run(micro_world, "stage1", tmp_path / "x", tmp_path / "ck", max_steps_this_run=2)
    orig = trainer_mod.task_loss
    monkeypatch.setattr(trainer_mod, "task_loss", lambda *a, **k: orig(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 2"):
        run(micro_world, "stage1", tmp_path / "x", tmp_path / "ck")
    assert [p.name for p in (tmp_path / "ck").glob("step-*")] == ["step-00000002"]


@pytest.mark.slow
def test_two_process_run_with_accelerate_launch(micro_world, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo) runs stage 1 through the DVC stage module."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("models", "data"):
        os.symlink(micro_world["root"] / name, ws / name)
    shutil.copy(micro_world["root"] / "params.yaml", ws / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.distill", "stage1"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((ws / "metrics/distill/stage1.json").read_text())
    assert m["stage1_steps"] == 4
    assert (ws / "models/student_stage1/diffusion_pytorch_model.safetensors").exists()
