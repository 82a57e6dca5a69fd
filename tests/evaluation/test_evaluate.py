"""evaluate stage, ablation variants and the benchmark on the micro world (metrics: tests/test_quality.py)."""

import json
import math

import pandas as pd
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
        assert stage.main([]) == 0
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
        table = pd.read_csv(evaluated / "metrics/per_image" / f"{name}.csv")
        assert len(table) == m["n_images"] and table["psnr"].mean() == pytest.approx(m["psnr"], abs=1e-4)
    reference = sorted(p.stem for p in (evaluated / "data/eval/teacher").glob("*.png"))
    assert reference == sorted(pd.read_csv(evaluated / "metrics/per_image/teacher.csv")["id"])
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


def test_every_default_variant_trains_at_the_headline_budget():
    cfg = load("params.yaml")
    d = cfg.distill
    for name in cfg.ablations.variants:
        vcfg, two_stage = ablation.variant_config(cfg, name, 1)
        assert vcfg.seed == 1 and vcfg.distill.stage1.train.batch_size == d.stage1.train.batch_size
        total = vcfg.distill.stage1.train.steps + (vcfg.distill.stage2.train.steps if two_stage else 0)
        assert total == d.stage1.train.steps + d.stage2.train.steps, name  # same total steps for every variant
    assert ablation.variant_config(cfg, "wo_af", 0)[0].distill.stage2.loss.af == 0
    wo_mask = ablation.variant_config(cfg, "wo_mask", 0)[0].distill
    assert wo_mask.alpha == 0.5 and wo_mask.stage1.loss.task == 2.0  # weight 1 on every pixel: plain MSE
    assert ablation.variant_config(cfg, "stage2_teacher", 0)[0].distill.stage2.noisy == "teacher"
    assert ablation.is_headline(cfg, "full", cfg.seed) and not ablation.is_headline(cfg, "full", cfg.seed + 1)
    assert not ablation.is_headline(cfg, "single_stage", cfg.seed)
    s = ablation.variant_config(cfg, "from_scratch", 0)[0].distill.stage1.loss
    assert (s.task, s.distill, s.af) == (1.0, 0.0, 0.0)
    assert ablation.variant_config(cfg, "global_prompt", 0)[0].distill.stage2.prompt == "global"
    assert ablation.variant_config(cfg, "layers_15", 0)[0].distill.student_layers == 15
    with pytest.raises(ValueError, match="unknown variant"):
        ablation.variant_config(cfg, "nope", 0)


@pytest.mark.parametrize("variant,seed", [("full", 1), ("from_scratch", 1)])
def test_ablation_stage_trains_and_evaluates(evaluated, variant, seed):
    from stages import ablate

    ws = evaluated  # the teacher's reference outputs exist
    with inside(ws):
        assert ablate.main([variant, str(seed)]) == 0
    name = f"{variant}-s{seed}"
    m = json.loads((ws / "metrics/ablations" / f"{name}.json").read_text())
    assert m["seed"] == seed and m["total_steps"] == 6 and math.isfinite(m["psnr"]) and math.isfinite(m["agree_psnr"])
    assert (m["two_stage"] == 1) == (variant == "full")
    assert ("stage1_final_distill" in m) == (variant == "full")
    assert (ws / "models/ablations" / name / "config.json").exists()
    assert not (ws / "checkpoints/ablations" / name).exists()
    assert len(pd.read_csv(ws / "metrics/per_image/ablations" / f"{name}.csv")) == m["n_images"]


def test_the_headline_run_is_evaluated_not_retrained(evaluated):
    from stages import ablate

    with inside(evaluated):
        assert ablate.main(["full", "0"]) == 0
    m = json.loads((evaluated / "metrics/ablations/full-s0.json").read_text())
    assert m["model"] == "models/student" and "stage1_final_distill" not in m
    assert "headline student" in (evaluated / "models/ablations/full-s0/README.md").read_text()  # its DVC output
    student = json.loads((evaluated / "metrics/eval/student.json").read_text())
    assert m["psnr"] == pytest.approx(student["psnr"], abs=1e-6)  # same model, images and noise


def test_benchmark_writes_costs_and_speedups(eval_ws):
    from stages import benchmark

    with inside(eval_ws):
        assert benchmark.main([]) == 0
    m = json.loads((eval_ws / "metrics/benchmark.json").read_text())
    assert set(m["models"]) == {"teacher", "student", "layers_2"}
    t, s = m["models"]["teacher"], m["models"]["student"]
    assert t["controlnet_layers"] == 5 and s["controlnet_layers"] == 3
    assert t["controlnet_params"] > s["controlnet_params"] > 0 and t["controlnet_flops"] > s["controlnet_flops"] > 0
    assert s["controlnet_speedup_ideal"] == pytest.approx(t["controlnet_flops"] / s["controlnet_flops"])
    assert t["step_flops"] > m["backbone"]["step_flops"] > 0
    assert all(v["step_ms"] > 0 for v in m["models"].values())
    assert m["training"]["stage1_samples_per_s"] > 0 and m["training"]["stage2_samples_per_s"] > 0
