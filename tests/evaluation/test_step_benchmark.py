"""pipeline/evaluation/step_benchmark.py and distill.compile: the distillation step costs the plain
ControlNet step plus exactly one teacher forward (FLOPs), the metrics file has its keys, and the compile
switch round-trips through the config and compiles the blocks without touching what Loop saves."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ConfigError, from_dict
from pipeline.distill.trainer import COMPILABLE, stage_data, student_and_loss
from pipeline.evaluation.step_benchmark import run_step_benchmark
from pipeline.metrics_io import write_json
from pipeline.models.controlled import Controlled
from pipeline.models.mapping import TEACHER_CONVENTION
from pipeline.models.world import load_controlnet, load_foundation
from tests.conftest import micro_config
from tests.params import config, full

KEYS = ("distill_step_ms", "plain_step_ms", "time_ratio", "time_ratio_paired", "flop_ratio", "time_over_flop_ratio",
        "distill_flops", "plain_flops", "teacher_forward_flops", "distill_gflops_per_s", "plain_gflops_per_s",
        "ceiling_gflops_per_s", "ceiling_shape", "distill_fraction_of_ceiling", "plain_fraction_of_ceiling",
        "compile", "threads", "batch_size", "warmup", "repeats", "device", "step_ms_rounds")


def teacher_forward_flops(micro_world, batch_size: int) -> int:
    """FLOPs of one teacher forward (teacher ControlNet + backbone, no grad) on a stage-1 batch, counted
    on its own."""
    cfg = micro_world["cfg"]
    backbone = load_foundation(micro_world["foundation"], with_t5=False).transformer
    teacher = load_controlnet(micro_world["teacher"])
    b = stage_data(micro_world["encoded"], "stage1", cfg.distill.stage1.prompt).batch(torch.arange(batch_size))
    ctrl = Controlled(backbone, teacher, TEACHER_CONVENTION)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ctrl(b["latents"], torch.full((batch_size,), 500.0), b["prompt_embeds"], b["pooled_prompt_embeds"],
             b["control"])
    return int(fc.get_total_flops())


def test_step_benchmark_micro(micro_world, tmp_path):
    cfg = micro_world["cfg"]
    bcfg = config({"step_benchmark": dict(batch_size=2, warmup=1, repeats=2, threads=1, compile=[])}).step_benchmark
    threads = torch.get_num_threads()
    m = run_step_benchmark(cfg, bcfg, foundation=micro_world["foundation"], teacher=micro_world["teacher"],
                           encoded=micro_world["encoded"])
    assert torch.get_num_threads() == threads  # restored
    write_json(tmp_path / "step_benchmark.json", m)
    out = json.loads((tmp_path / "step_benchmark.json").read_text())
    for k in KEYS:
        assert k in out, k
    # the distillation step = the plain step (same student forward and backward) + one teacher forward
    assert out["flop_ratio"] > 1 and out["distill_flops"] > out["plain_flops"] > 0
    assert out["distill_flops"] - out["plain_flops"] == out["teacher_forward_flops"] == \
        teacher_forward_flops(micro_world, bcfg.batch_size)
    assert out["distill_step_ms"] > 0 and out["plain_step_ms"] > 0 and out["ceiling_gflops_per_s"] > 0
    assert out["time_ratio"] == pytest.approx(out["distill_step_ms"] / out["plain_step_ms"])
    assert out["threads"] == 1 and out["batch_size"] == 2
    assert [len(v) for v in out["step_ms_rounds"].values()] == [2, 2]
    assert out["compile"]["available"] is None  # nothing asked: not measured, no figure


def test_compile_param_round_trips_through_config():
    assert config().distill.compile is False  # params.yaml's default
    cfg = micro_config(distill={"compile": True})
    assert cfg.distill.compile is True
    assert from_dict(cfg.model_dump(mode="json"), "dump").distill.compile is True
    with pytest.raises(ConfigError, match="compile"):
        raw = full()
        del raw["distill"]["compile"]
        from_dict(raw, "no compile")
    with pytest.raises(ConfigError, match="compile"):
        config({"step_benchmark": {"compile": ["vae"]}})


def test_distill_compile_compiles_blocks_not_the_saved_student(micro_world):
    """distill.compile: every transformer block of student, backbone and teacher is torch.compiled in place;
    the student Loop trains, keys and saves is the plain module, with the same state_dict keys. Building
    compiles nothing yet (compilation is lazy)."""

    def frozen():
        return (load_foundation(micro_world["foundation"], with_t5=False).transformer,
                load_controlnet(micro_world["teacher"]))

    def compiled_blocks(m):
        return [b._compiled_call_impl is not None for b in m.transformer_blocks]

    backbone, teacher = frozen()
    eager_student, eager = student_and_loss(micro_config(), "stage1", backbone, teacher)
    assert eager.compiled == set()
    assert not any(compiled_blocks(eager_student) + compiled_blocks(backbone) + compiled_blocks(teacher))
    backbone, teacher = frozen()
    student, loss = student_and_loss(micro_config(distill={"compile": True}), "stage1", backbone, teacher)
    assert loss.compiled == set(COMPILABLE)
    assert all(compiled_blocks(student) + compiled_blocks(backbone) + compiled_blocks(teacher))
    assert type(student) is type(eager_student) and loss.student.controlnet is student
    assert list(student.state_dict()) == list(eager_student.state_dict())  # no _orig_mod. prefix
    with pytest.raises(ValueError, match="unknown"):
        student_and_loss(micro_config(), "stage1", backbone, teacher, compile=["vae"])


@pytest.mark.slow
def test_compiled_distill_step_matches_eager(micro_world):
    """One compiled loss evaluation (inductor on the CPU) gives the eager terms, up to float reordering."""
    from pipeline.training import step_generator

    cfg = micro_world["cfg"]
    batch = stage_data(micro_world["encoded"], "stage1", cfg.distill.stage1.prompt).batch(torch.arange(2))
    s_e, eager = student_and_loss(cfg, "stage1", load_foundation(micro_world["foundation"], with_t5=False).transformer,
                                  load_controlnet(micro_world["teacher"]), compile=[])
    s_c, comp = student_and_loss(cfg, "stage1", load_foundation(micro_world["foundation"], with_t5=False).transformer,
                                 load_controlnet(micro_world["teacher"]), compile=list(COMPILABLE))
    te = eager(s_e, batch, step_generator(0, 0))
    tc = comp(s_c, batch, step_generator(0, 0))
    for k in te:
        torch.testing.assert_close(tc[k], te[k], rtol=1e-4, atol=1e-5, msg=k)
    tc["loss"].backward()
    assert all(p.grad is not None for p in s_c.controlnet_blocks.parameters())
