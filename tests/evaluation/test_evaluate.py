"""evaluate stage, ablation variants and the benchmark on the micro world (metrics: tests/test_quality.py)."""

import json
import math

import pytest

from pipeline.config import load
from pipeline.distill import ablation
from pipeline.evaluation import evaluate
from tests.helpers_eval import EVAL_PARAMS, eval_ws, inside  # noqa: F401 - fixture

MODELS = ("teacher", "backbone_only", "student_stage1", "student")
QUALITY = ("psnr", "ssim", "psnr_masked", "ssim_masked", "psnr_unmasked", "ssim_unmasked")


@pytest.fixture(scope="module")
def evaluated(eval_ws):
    from stages import evaluate as stage

    with inside(eval_ws):
        stage.main([])
    return eval_ws


def test_evaluate_writes_finite_metrics_for_each_model(evaluated):
    for name in MODELS:
        m = json.loads((evaluated / "metrics/eval" / f"{name}.json").read_text())
        assert m["n_images"] == EVAL_PARAMS["evaluate"]["num_images"]
        for k in QUALITY:
            assert math.isfinite(m[k]), (name, k)
        if name != "teacher":
            assert math.isfinite(m["agree_psnr"]) and math.isfinite(m["agree_ssim"])
        else:
            assert "agree_psnr" not in m
    assert json.loads((evaluated / "metrics/eval/backbone_only.json").read_text())["controlnet_params"] == 0


def test_unavailable_lpips_fid_cmmd_are_reported_not_computed(evaluated):
    m = json.loads((evaluated / "metrics/eval/student.json").read_text())
    for k in ("lpips", "fid", "cmmd"):
        assert m[k] is None
        assert "never estimated" in m["not_computed"][k]


def test_sample_pngs_for_the_report_grid(evaluated):
    names = sorted(p.name for p in (evaluated / "reports/samples").glob("00_*.png"))
    assert names == sorted(f"00_{c}.png" for c in evaluate.sample_columns(list(MODELS)))
    assert not list((evaluated / "reports/samples").glob("02_*.png"))  # num_samples = 2


def test_every_default_variant_builds_a_valid_config():
    cfg = load("params.yaml")
    ab = ablation.ablation_config(cfg)
    for name in ab.variants:
        vcfg, two_stage = ablation.variant_config(cfg, name, 1)
        assert vcfg.seed == 1 and vcfg.distill.stage1.train.batch_size == ab.batch_size
        total = vcfg.distill.stage1.train.steps + (vcfg.distill.stage2.train.steps if two_stage else 0)
        assert total == ab.stage1_steps + ab.stage2_steps, name  # same total steps for every variant
    assert ablation.variant_config(cfg, "wo_af", 0)[0].distill.stage2.loss.af == 0
    assert ablation.variant_config(cfg, "wo_mask", 0)[0].distill.alpha == 0.5
    s = ablation.variant_config(cfg, "from_scratch", 0)[0].distill.stage1.loss
    assert (s.task, s.distill, s.af) == (1.0, 0.0, 0.0)
    assert ablation.variant_config(cfg, "global_prompt", 0)[0].distill.stage2.prompt == "global"
    assert ablation.variant_config(cfg, "layers_15", 0)[0].distill.student_layers == 15
    with pytest.raises(ValueError, match="unknown variant"):
        ablation.variant_config(cfg, "nope", 0)


@pytest.mark.parametrize("variant,seed", [("full", 0), ("from_scratch", 1)])
def test_ablation_stage_trains_and_evaluates(eval_ws, variant, seed):
    from stages import ablate

    with inside(eval_ws):
        ablate.main([variant, str(seed)])
    name = f"{variant}-s{seed}"
    m = json.loads((eval_ws / "metrics/ablations" / f"{name}.json").read_text())
    assert m["seed"] == seed and m["total_steps"] == 3 and math.isfinite(m["psnr"]) and math.isfinite(m["agree_psnr"])
    assert (m["two_stage"] == 1) == (variant == "full")
    assert ("stage1_final_distill" in m) == (variant == "full")
    assert (eval_ws / "models/ablations" / name / "config.json").exists()
    assert not (eval_ws / "checkpoints/ablations" / name).exists()


def test_benchmark_writes_costs_and_speedups(eval_ws):
    from stages import benchmark

    with inside(eval_ws):
        benchmark.main([])
    m = json.loads((eval_ws / "metrics/benchmark.json").read_text())
    assert set(m["models"]) == {"teacher", "student", "layers_2"}
    t, s = m["models"]["teacher"], m["models"]["student"]
    assert t["controlnet_layers"] == 5 and s["controlnet_layers"] == 3
    assert t["controlnet_params"] > s["controlnet_params"] > 0 and t["controlnet_flops"] > s["controlnet_flops"] > 0
    assert s["controlnet_speedup_ideal"] == pytest.approx(t["controlnet_flops"] / s["controlnet_flops"])
    assert t["step_flops"] > m["backbone"]["step_flops"] > 0
    assert all(v["step_ms"] > 0 for v in m["models"].values())
    assert m["training"]["stage1_samples_per_s"] > 0 and m["training"]["stage2_samples_per_s"] > 0
