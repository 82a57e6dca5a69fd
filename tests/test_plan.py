"""pipeline.plan: the fake-tensor shims, the live-bytes counter, calibration of traced against measured peaks
(tiny world, real CPU run), and the sd3 profile's real-size models built and traced on fake tensors."""

from __future__ import annotations

import pytest
import torch

from pipeline.plan import models, steps
from pipeline.plan.cli import parse_bytes
from pipeline.plan.fit import Linear
from pipeline.plan.trace import LiveBytes, Trace, fake_world, measure
from tests.params import config

GIB = 2**30


# --------------------------------------------------------------------------------------------- units


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("24") == 24 * GIB
    with pytest.raises(Exception):
        parse_bytes("lots")


def test_fake_world_keeps_host_values_and_converts_modules():
    with fake_world():
        ids = torch.tensor([0, 3, 0, 5])           # host metadata: stays real, its values usable
        assert ids.nonzero().flatten().tolist() == [1, 3]
        assert torch.arange(4).tolist() == [0, 1, 2, 3]  # small integer factories are real too
        x = torch.zeros(2, 3)                       # floating factories are device data: fake
        assert type(x).__name__ == "FakeTensor"
        assert bool(torch.isfinite(x.sum()).all())  # .item() of a fake: the stated stand-in
        layer = torch.nn.Linear(3, 4)
        layer.to(torch.bfloat16)                    # Module.to swaps fake parameters (memo cleared)
        assert layer.weight.dtype == torch.bfloat16 and layer(x.bfloat16()).shape == (2, 4)


def test_live_bytes_counts_storages_once_and_frees():
    counter = LiveBytes()
    with counter:
        a = torch.ones(1000)              # 4000 bytes
        view = a[:10]                     # same storage: not counted again
        b = a * 2                         # 4000 more: the peak
        del a, view, b
        c = torch.ones(10)
    assert counter.peak_total == 8000
    assert counter.now["activations"] == c.untyped_storage().nbytes()


def _call(batch: int, peak: int) -> steps.Call:
    return steps.Call("s", "code", batch, Trace(peak, {"weights": 10, "activations": peak - 10}, 2 * peak, 0.0))


def test_linear_fit_extrapolates_and_finds_the_largest_micro_batch():
    fit = Linear(_call(2, 30), _call(4, 50))      # 10 fixed + 10 a sample
    assert fit.peak(3) == 40 and fit.peak(4) == 50 and fit.traced(2) and not fit.traced(3)
    assert fit.largest(105) == 9 and fit.largest(5) == 0
    assert fit.split(6) == {"weights": 10, "gradients": 0, "optimizer": 0, "ema": 0, "activations": 60}


# ---------------------------------------------------------------------------------------- calibration

# The tiny world (params.yaml) with the sd3 profile's training features: frozen models in bf16, bf16 autocast,
# gradient checkpointing, EMA, accumulation and prompt dropout. Sizes: (image px, micro-batch).
SIZES = [(32, 4), (64, 8)]
TOLERANCE = 0.10


def _tiny(size: int, batch: int):
    """The tiny world at half depth (12 backbone blocks, 11-layer teacher, 6-layer student: seconds a step)."""
    cfg = config({"data": {"image_size": size}, "world": {"dtype": "bfloat16"},
                  "backbone": {"num_layers": 12}, "teacher": {"num_layers": 11},
                  "runtime": {"sample_batch_size": batch},
                  "distill": {"stage1": {"train": {"batch_size": batch}}, "student_layers": 6,
                              "mixed_precision": "bf16", "gradient_checkpointing": True, "ema_decay": 0.999,
                              "gradient_accumulation_steps": 2, "prompt_dropout": 0.1},
                  # validated with every ablation variant merged in: layers_15 must fit 12 blocks
                  "ablations": {"variants": {"layers_15": {"overrides": {"distill": {"student_layers": 3}}}}}})
    cfg = steps.plan_config(cfg)
    return cfg, {n: models.find_source(cfg, n) for n in ("foundation", "teacher")}


@pytest.mark.parametrize("size,batch", SIZES)
def test_traced_distill_step_peak_matches_the_measured_one(size, batch):
    """Traced (fake tensors, live storages) vs measured (the same step on real tensors: resident bytes + the
    CPU allocator's peak during the step, from torch.profiler's memory events)."""
    cfg, sources = _tiny(size, batch)
    with fake_world():
        rows = steps.encode_call(cfg, sources, 1).rows
        traced = steps.distill_call(cfg, sources, "stage1", batch, rows).trace.peak_bytes
    torch.manual_seed(0)
    measured = steps.distill_call(cfg, sources, "stage1", batch, rows, count=measure).trace.peak_bytes
    assert abs(traced / measured - 1) <= TOLERANCE, (traced, measured)


@pytest.mark.parametrize("size,batch", SIZES)
def test_traced_sampler_peak_matches_the_measured_one(size, batch):
    """One CFG sampling call (2 steps) of pipeline.evaluation.sampler with the teacher, traced vs measured."""
    cfg, sources = _tiny(size, batch)
    with fake_world():
        traced = steps.sample_call(cfg, sources, "teacher", batch, 2, 3.0, 1.0).trace.peak_bytes
    measured = steps.sample_call(cfg, sources, "teacher", batch, 2, 3.0, 1.0, count=measure).trace.peak_bytes
    assert abs(traced / measured - 1) <= TOLERANCE, (traced, measured)


# ----------------------------------------------------------------------------------- the sd3 profile


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


def test_sd3_profile_real_size_models_and_traced_distillation_step():
    """Every model of configs/sd3.yaml at its real config, on fake tensors; the traced stage-1 micro-batch."""
    from pipeline.config import from_dict
    from pipeline.distill.trainer import student_and_loss
    from pipeline.models.controlled import Controlled
    from pipeline.models.mapping import STUDENT_CONVENTION, TEACHER_CONVENTION, af_pairs
    from pipeline.profile import merged

    cfg = steps.plan_config(from_dict(merged("sd3")))
    sources = {n: models.find_source(cfg, n) for n in ("foundation", "teacher", "captioner")}
    with fake_world():
        pipe = models.foundation(cfg, sources["foundation"], torch.bfloat16)
        backbone, vae = pipe.transformer, pipe.vae
        teacher = models.teacher(cfg, sources["teacher"], torch.bfloat16)
        frozen = (backbone, teacher, vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        assert all(_dtypes(m) == {torch.bfloat16} for m in frozen)
        assert abs(_params(backbone) / 2.028e9 - 1) < 0.01 and len(backbone.transformer_blocks) == 24
        assert backbone.transformer_blocks[-1].context_pre_only
        assert abs(_params(pipe.text_encoder_3) / 4.762e9 - 1) < 0.01          # T5-XXL encoder
        assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder_2.config.hidden_size == 1280
        assert vae.config.latent_channels == 16 and list(vae.config.block_out_channels) == [128, 256, 512, 512]
        assert teacher.config.num_layers == 23
        assert tuple(teacher.pos_embed_input.proj.weight.shape) == (1536, 17, 2, 2)  # 16 latent + 1 mask channel
        vlm, _ = models.captioner(cfg, sources["captioner"])
        assert _params(vlm) > 8e9 and _dtypes(vlm) == {torch.bfloat16}

        enc = steps.encode_call(cfg, sources, 1)
        assert enc.rows["latents"] == (torch.bfloat16, (16, 128, 128))
        assert enc.rows["prompt_embeds"] == (torch.bfloat16, (154, 4096))     # 77 CLIP + 77 T5 rows
        empty = steps.empty_prompt_like(enc.rows)                              # sd3: prompt dropout 0.1
        student, loss = student_and_loss(cfg, "stage1", backbone, teacher, empty=empty, compile=())
        assert student.config.num_layers == 12 and _dtypes(student) == {torch.float32}
        expected = [[2 * j, 2 * j + 1] for j in range(11)] + [[22]]        # student 11 <- teacher 22 alone
        assert loss.pairs == expected == af_pairs(24, 23, 12, skip_blocks=[23])
        x = torch.zeros(1, 16, 128, 128, dtype=torch.bfloat16)
        args = (x, torch.full((1,), 500.0), torch.zeros(1, 154, 4096, dtype=torch.bfloat16),
                torch.zeros(1, 2048, dtype=torch.bfloat16))
        control = torch.zeros(1, 17, 128, 128, dtype=torch.bfloat16)
        with torch.no_grad():
            s_res = Controlled(backbone, student, STUDENT_CONVENTION).control(*args, control)
            t_res = Controlled(backbone, teacher, TEACHER_CONVENTION).control(*args, control)
        assert [tuple(r.shape) for r in s_res] == [(1, 4096, 1536)] * 12
        assert [tuple(r.shape) for r in t_res] == [(1, 4096, 1536)] * 23

        call = steps.distill_call(cfg, sources, "stage1", 1, enc.rows)
    split, student_bytes = call.trace.by_category, 4 * _params(student)
    assert split["weights"] == sum(call.weights.values())
    # fp32 gradients held by accumulation, EMA shadow and AdamW's two moments, of the trainable parameters:
    # all the student's but the last layer's text stream, which feeds nothing (the Loop freezes it)
    assert 0.97 * student_bytes < split["gradients"] < student_bytes
    assert split["ema"] == split["gradients"]
    assert split["optimizer"] == pytest.approx(2 * split["gradients"], rel=1e-3)
    assert call.trace.flops > 0 and split["activations"] > 0


@pytest.mark.slow
def test_cli_plans_the_default_profile(tmp_path, capsys):
    """``python -m pipeline.plan`` end to end on params.yaml (the tiny world): tables printed, JSON written."""
    import json

    from pipeline.plan.cli import main

    out = tmp_path / "plan.json"
    assert main(["--out", str(out), "--ignore-measured"]) == 0
    plan = json.loads(out.read_text())
    assert {s["stage"] for s in plan["stages"]} == {"encode", "distill_stage1", "distill_stage2", "evaluate",
                                                    "trajectories"}
    assert all(s["fits"] and s["peak_bytes"] > 0 for s in plan["stages"])
    assert plan["gpu_hours"]["all"] >= plan["gpu_hours"]["main"] > 0
    assert "Memory plan (traced)" in capsys.readouterr().out
