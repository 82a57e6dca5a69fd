"""Student construction, stage 1/2 distillation, checkpoints and resume on the micro world."""

import json
import os
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
from tests.params import REPO


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
    batch = data.batch(torch.arange(2))
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


def test_retrained_teacher_does_not_resume_a_finished_stage(micro_world, tmp_path):
    """Bug: after the teacher changed, stage 1 'resumed' its finished checkpoint and saved the same student."""
    run(micro_world, "stage1", tmp_path / "a", tmp_path / "ck")
    teacher = SD3ControlNetModel.from_pretrained(micro_world["teacher"])
    with torch.no_grad():
        teacher.controlnet_blocks[0].weight.mul_(2)
    teacher.save_pretrained(tmp_path / "teacher2")
    other = {**micro_world, "teacher": tmp_path / "teacher2"}
    run(other, "stage1", tmp_path / "b", tmp_path / "ck")
    run(other, "stage1", tmp_path / "fresh", tmp_path / "ck_fresh")
    a, b, fresh = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "fresh")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(b[k], fresh[k]) for k in b)


def test_rerun_of_a_finished_stage_reports_its_training_figures(micro_world, tmp_path):
    first = run(micro_world, "stage1", tmp_path / "s", tmp_path / "ck")
    again = run(micro_world, "stage1", tmp_path / "s", tmp_path / "ck")
    assert again == first and first["stage1_train_seconds"] > 0 and first["stage1_samples_per_s"] > 0


def test_nan_loss_stops_with_last_good_checkpoint(micro_world, tmp_path, monkeypatch):
    run(micro_world, "stage1", tmp_path / "x", tmp_path / "ck", max_steps_this_run=2)
    orig = trainer_mod.task_loss
    monkeypatch.setattr(trainer_mod, "task_loss", lambda *a, **k: orig(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 2"):
        run(micro_world, "stage1", tmp_path / "x", tmp_path / "ck")
    assert [p.name for p in (tmp_path / "ck").glob("step-*")] == ["step-00000002"]


@pytest.mark.slow
def test_two_processes_train_as_one(micro_world, tmp_path):
    """Stage 1 on 2 gloo processes (torch.distributed.run; `accelerate launch --cpu` starts one here). DDP
    fails at step 2 if a trainable parameter gets no gradient (the last ControlNet block's text stream):
    Loop freezes those. The replicas end equal, and equal to 1 process with 2 accumulation rounds over the
    same global batch (same samples, same noise per micro-batch) up to float summation order."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.ddp_stage1", str(micro_world["root"]), str(tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2] and ranks[0]["distributed_type"] == "MULTI_CPU"
    assert ranks[0]["metrics"]["stage1_steps"] == 4
    assert {k.split(".", 2)[2] for k in ranks[0]["frozen"]} == {
        "attn.to_add_out.weight", "attn.to_add_out.bias", "ff_context.net.0.proj.weight",
        "ff_context.net.0.proj.bias", "ff_context.net.2.weight", "ff_context.net.2.bias"}
    assert {k.split(".")[1] for k in ranks[0]["frozen"]} == {"2"}  # the last of the student's 3 blocks
    w0, w1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert weights(tmp_path / "ddp" / "student").keys() == w0.keys()

    cfg = micro_config(distill={"gradient_accumulation_steps": 2, "stage1": {"train": {"batch_size": 2}}})
    run(micro_world, "stage1", tmp_path / "one", tmp_path / "ck_one", cfg=cfg)
    one = weights(tmp_path / "one")
    worst = max(float((one[k] - w0[k]).abs().max()) for k in w0)
    assert worst <= 1e-6, worst  # 0.0 on CPU/gloo: (g0 + g1) / 2 == g0 / 2 + g1 / 2 exactly; NCCL may sum otherwise


def test_prompt_dropout_gives_teacher_and_student_the_stock_empty_prompt(micro_world, tmp_path, monkeypatch):
    """distill.prompt_dropout: after the noise is drawn (same noise as without dropout), a share of the
    samples get the empty prompt's embeddings (world.empty_prompt: "" as the stock pipeline embeds its
    negative prompt), the same ones for teacher and student; 0 (params.yaml) changes nothing; a stage
    trains with it end to end."""
    from pipeline.models.world import drop_prompts, empty_prompt, load_controlnet

    pipe = load_foundation(micro_world["foundation"])
    cfg0 = micro_config()
    cfg = micro_config(distill={"prompt_dropout": 0.5})
    msl = cfg.text.max_sequence_length
    empty = empty_prompt(pipe, msl)
    _, neg, _, neg_pooled = pipe.encode_prompt(prompt=["a red circle"], prompt_2=None, prompt_3=None,
                                               do_classifier_free_guidance=True, max_sequence_length=msl)
    assert torch.equal(empty["prompt_embeds"], neg[0]) and torch.equal(empty["pooled_prompt_embeds"], neg_pooled[0])
    assert cfg0.distill.prompt_dropout == 0

    teacher = load_controlnet(micro_world["teacher"])
    data = stage_data(micro_world["encoded"], "stage1", "local")
    batch = data.batch(torch.arange(8))
    with pytest.raises(ValueError, match="prompt_dropout"):
        trainer_mod.student_and_loss(cfg, "stage1", pipe.transformer, teacher)

    def seen(c, empty_=None):
        """(noisy latents, prompts the student saw, prompts the teacher saw) for one call on ``batch``."""
        student, loss = trainer_mod.student_and_loss(c, "stage1", pipe.transformer, teacher, empty=empty_)
        got = {}
        for who, ctrl in (("student", loss.student), ("teacher", loss.teacher)):
            real = ctrl.control
            monkeypatch.setattr(ctrl, "control", lambda *a, who=who, real=real, **k: got.setdefault(
                who, (a[0], a[2], a[3])) and real(*a, **k))
        loss(student, batch, torch.Generator().manual_seed(3))
        return got

    plain, dropped = seen(cfg0), seen(cfg, empty)
    torch.testing.assert_close(plain["student"][0], dropped["student"][0])  # dropout draws after the noise
    assert torch.equal(plain["student"][1], batch["prompt_embeds"])
    s_pe, s_pp = dropped["student"][1:]
    assert torch.equal(s_pe, dropped["teacher"][1]) and torch.equal(s_pp, dropped["teacher"][2])
    is_empty = torch.tensor([torch.equal(e, empty["prompt_embeds"]) for e in s_pe])
    kept = torch.tensor([torch.equal(e, b) for e, b in zip(s_pe, batch["prompt_embeds"])])
    assert bool((is_empty | kept).all()) and 0 < int(is_empty.sum()) < len(batch["prompt_embeds"])
    assert drop_prompts(batch, 0.0, None, empty)[0] is batch["prompt_embeds"]  # p = 0 draws nothing

    m = run(micro_world, "stage1", tmp_path / "s1", tmp_path / "ck", cfg=cfg)
    assert m["stage1_steps"] == 4 and (tmp_path / "s1" / "config.json").exists()


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_ablation_runs_share_full_stage1(micro_world, tmp_path):
    """ablate_stage1 copies the headline's stage 1 at params' seed; single_stage continues it for stage 2's
    steps only and ends where an uninterrupted single_stage run ends; a variant with another stage-1 key
    (from_scratch) or another seed ignores it. The prefix folders are only read."""
    from pipeline.distill import ablation

    cfg, w = micro_world["cfg"], micro_world
    kw = dict(foundation=w["foundation"], teacher=w["teacher"], encoded=w["encoded"])
    s1, s2 = cfg.distill.stage1.train.steps, cfg.distill.stage2.train.steps
    run(w, "stage1", tmp_path / "student_stage1", tmp_path / "ck_headline")  # distill_stage1
    headline = _tree(tmp_path / "ck_headline")
    prefix = tmp_path / f"stage1-s{cfg.seed}"
    m = ablation.train_stage1_prefix(cfg, cfg.seed, out=prefix, prefixes=[tmp_path / "ck_headline"], **kw)
    assert m["stage1_steps"] == s1 and m["stage1_steps_trained_here"] == 0 and m["stage1_train_seconds"] > 0
    assert sorted(p.name for p in prefix.iterdir()) == ["FINGERPRINT", f"step-{s1:08d}"]
    assert _tree(tmp_path / "ck_headline") == headline
    other = ablation.train_stage1_prefix(cfg, cfg.seed + 1, out=tmp_path / "other", prefixes=[tmp_path / "ck_headline"],
                                         **kw)
    assert other["stage1_steps_trained_here"] == s1  # another seed: another key
    single, _ = ablation.variant_config(cfg, "single_stage", cfg.seed)
    m = run(w, "stage1", tmp_path / "single", tmp_path / "ck_single", cfg=single, prefixes=[prefix])
    assert m["stage1_steps"] == s1 + s2 and m["stage1_steps_trained_here"] == s2
    run(w, "stage1", tmp_path / "single_fresh", tmp_path / "ck_single_fresh", cfg=single)
    a, b = weights(tmp_path / "single"), weights(tmp_path / "single_fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scratch, _ = ablation.variant_config(cfg, "from_scratch", cfg.seed)
    m = run(w, "stage1", tmp_path / "scratch", tmp_path / "ck_scratch", cfg=scratch, prefixes=[prefix])
    assert m["stage1_steps_trained_here"] == s1 + s2
    assert sorted(p.name for p in prefix.iterdir()) == ["FINGERPRINT", f"step-{s1:08d}"]
