"""pipeline.distill.trainer's wiring, where a silent mistake would still train: which pixels L_task weights
by alpha, that teacher and student see the same inputs, that a step trains only the student, which mapping
conventions the loss uses, and which split and prompt embeddings each stage reads."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

from pipeline.data.shards import load_split
from pipeline.distill import trainer as trainer_mod
from pipeline.distill.trainer import DistillLoss, batch_from, shard_keys, stage_data, student_and_loss
from pipeline.models import flow
from pipeline.models.mapping import STUDENT_CONVENTION, TEACHER_CONVENTION
from pipeline.models.student import controlnet_from_backbone
from pipeline.models.world import load_controlnet, load_foundation
from pipeline.training import make_optimizer, train_step
from tests.conftest import micro_config

TASK_ONLY = {"distill": {"stage1": {"loss": {"task": 1.0, "distill": 0.0, "af": 0.0}}}}


@pytest.fixture(scope="module")
def models(micro_world):
    pipe = load_foundation(micro_world["foundation"], with_t5=False)
    return pipe.transformer, load_controlnet(micro_world["teacher"])


@pytest.fixture(scope="module")
def labelled(micro_world):
    """Four labelled rows, as the trainer builds its batches from the encoded shards."""
    _, t = load_split(micro_world["encoded"], "labelled", shard_keys("local"))
    return batch_from({k: v[:4] for k, v in t.items()}, "local")


def test_task_loss_weighs_the_hole_by_alpha_and_the_rest_by_one_minus_alpha(models, labelled, monkeypatch):
    """With the student's prediction wrong by 1 only in the hole (mask == 1, where the control's last channel
    is 0), L_task = alpha x (hole share); wrong only outside, (1 - alpha) x (outside share)."""
    hole = labelled["mask"]
    assert set(hole.unique().tolist()) == {0.0, 1.0} and 0 < float(hole.mean()) < 1
    assert torch.equal(labelled["control"][:, -1:], 1 - hole)  # the stock pipeline's control: 1 = keep
    cfg = micro_config(**TASK_ONLY)
    backbone, teacher = models
    loss = DistillLoss(cfg, "stage1", cfg.distill.stage1, backbone, teacher, controlnet_from_backbone(backbone, 3))
    assert loss.teacher is None  # no teacher term, no teacher forward
    drawn = {}
    real_add_noise = flow.add_noise

    def recording_add_noise(*a, **k):
        drawn["s"] = real_add_noise(*a, **k)
        return drawn["s"]

    monkeypatch.setattr(flow, "add_noise", recording_add_noise)

    def task(error_where):
        def predict(noisy, *a, **k):  # the flow target (noise - x0) plus 1 where asked
            return drawn["s"].noise - labelled["latents"] + error_where.expand_as(noisy)
        monkeypatch.setattr(loss.student, "denoise", predict)
        terms = loss(loss.student.controlnet, labelled, torch.Generator().manual_seed(0))
        return terms["task"].item(), drawn["s"].weighting.flatten()

    alpha = cfg.distill.alpha
    in_hole, w = task(hole)
    outside, w2 = task(1 - hole)
    assert torch.equal(w, w2)  # same generator: same timesteps, same SD3 weighting
    share = hole.flatten(1).mean(1)
    assert in_hole == pytest.approx(alpha * float((w * share).mean()), rel=1e-5)
    assert outside == pytest.approx((1 - alpha) * float((w * (1 - share)).mean()), rel=1e-5)
    assert task(torch.zeros_like(hole))[0] == pytest.approx(0.0, abs=1e-10)


def test_teacher_and_student_see_the_same_noisy_latent_timestep_prompt_and_control(models, labelled):
    cfg = micro_config()
    backbone, teacher = models
    student = controlnet_from_backbone(backbone, 3)
    loss = DistillLoss(cfg, "stage1", cfg.distill.stage1, backbone, teacher, student)
    seen: dict[str, list[dict]] = {"teacher": [], "student": [], "backbone": []}
    hooks = [m.register_forward_pre_hook(lambda _, args, kw, name=name: seen[name].append(kw), with_kwargs=True)
             for name, m in (("teacher", teacher), ("student", student), ("backbone", backbone))]
    try:
        terms = loss(student, labelled, torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert {"task", "distill", "af"} <= set(terms)
    (t,), (s,) = seen["teacher"], seen["student"]
    for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "controlnet_cond"):
        assert torch.equal(t[k], s[k]), k
    assert t["conditioning_scale"] == s["conditioning_scale"] == 1.0
    assert torch.equal(s["controlnet_cond"], labelled["control"])
    assert torch.equal(s["encoder_hidden_states"], labelled["prompt_embeds"])
    assert not s["pooled_projections"].any()  # ControlNets get zero pooled projections, as in the pipeline
    b_student, b_teacher = seen["backbone"]  # student-controlled, then teacher-controlled prediction
    for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"):
        assert torch.equal(b_student[k], b_teacher[k]), k
    assert torch.equal(b_student["hidden_states"], s["hidden_states"])
    assert torch.equal(b_student["pooled_projections"], labelled["pooled_prompt_embeds"])


def test_one_training_step_changes_the_student_only(models, labelled):
    cfg = micro_config()
    backbone, teacher = models
    student, loss = student_and_loss(cfg, "stage1", backbone, teacher)
    # The student's blocks are copies of the backbone's, all trainable: shared tensors would train the backbone
    # (or, frozen with it, never train at all).
    shared = {p.data_ptr() for p in student.parameters()} & {p.data_ptr() for p in backbone.parameters()}
    assert not shared and all(p.requires_grad for p in student.parameters())
    frozen = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    frozen.update({f"teacher.{k}": v.clone() for k, v in teacher.state_dict().items()})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train = cfg.distill.stage1.train
    acc = Accelerator(cpu=True)
    params = [p for p in student.parameters() if p.requires_grad]
    model, opt = acc.prepare(student.train(), make_optimizer("adamw", params, train.lr, train.weight_decay))
    train_step(acc, model, opt, params, loss, labelled, torch.Generator().manual_seed(0), train.max_grad_norm)
    after = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), [k for k in frozen if not torch.equal(frozen[k],
                                                                                                     after[k])]
    assert all(p.grad is None for p in (*backbone.parameters(), *teacher.parameters()))
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("controlnet_blocks") for k in changed)  # the zero-initialised projections learn


def test_distill_loss_uses_the_teacher_and_student_conventions():
    """23 -> 12 on SD3's 24 blocks (the last context_pre_only): student j <- teacher (2j, 2j+1), student 11
    <- teacher 22 alone, through the conventions DistillLoss itself applies."""
    assert (TEACHER_CONVENTION, STUDENT_CONVENTION) == ("one_to_one", "interval")
    kw = dict(sample_size=4, patch_size=2, in_channels=16, attention_head_dim=4, num_attention_heads=1,
              joint_attention_dim=8, caption_projection_dim=4, pooled_projection_dim=8, out_channels=16,
              pos_embed_max_size=4)
    backbone = SD3Transformer2DModel(num_layers=24, **kw)
    teacher = SD3ControlNetModel(num_layers=23, extra_conditioning_channels=1, **kw)
    student = SD3ControlNetModel(num_layers=12, extra_conditioning_channels=1, **kw)
    cfg = micro_config()
    loss = DistillLoss(cfg, "stage1", cfg.distill.stage1, backbone, teacher, student)
    assert loss.teacher.convention == "one_to_one" and loss.student.convention == "interval"
    assert loss.teacher.mapping == [*range(23), None]
    assert loss.student.mapping == [*(i // 2 for i in range(23)), None]
    assert loss.pairs == [[2 * j, 2 * j + 1] for j in range(11)] + [[22]]


@pytest.mark.parametrize("stage,prompt,split", [("stage1", "local", "labelled"), ("stage1", "global", "labelled"),
                                                ("stage2", "local", "unlabelled"), ("stage2", "global", "unlabelled")])
def test_each_stage_reads_its_split_and_prompt_embeddings(micro_world, monkeypatch, stage, prompt, split):
    calls = []

    def spy(loader):
        def wrapped(encoded_dir, which, keys=None, *a, **k):
            calls.append((which, tuple(keys)))
            return loader(encoded_dir, which, keys, *a, **k)
        return wrapped

    for name in ("load_split", "EncodedSplit"):  # whichever reader the trainer uses
        if hasattr(trainer_mod, name):
            monkeypatch.setattr(trainer_mod, name, spy(getattr(trainer_mod, name)))
    data = stage_data(micro_world["encoded"], stage, prompt)
    rows = data if isinstance(data, dict) else data.batch(torch.arange(len(data)))
    p = "global_" if prompt == "global" else ""
    assert calls == [(split, ("latents", "masked_latents", "mask", f"{p}prompt_embeds", f"{p}pooled_prompt_embeds"))]
    _, want = load_split(micro_world["encoded"], split)
    assert torch.equal(rows["latents"], want["latents"])
    assert torch.equal(rows["prompt_embeds"], want[f"{p}prompt_embeds"])
    assert torch.equal(rows["pooled_prompt_embeds"], want[f"{p}pooled_prompt_embeds"])
    other = "prompt_embeds" if prompt == "global" else "global_prompt_embeds"
    assert not torch.equal(rows["prompt_embeds"], want[other])  # local and global prompts differ
