"""pipeline/studies: the compression frontier's params, run configs, statistics, knee and report; the
studies' run stages never import report code."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import studies as S
from pipeline.closure import import_closure
from pipeline.config import ConfigError
from pipeline.distill.ablation import is_headline, variant_config
from pipeline.studies import config as sc
from pipeline.studies import frontier as F
from pipeline.studies import frontier_report as FR
from tests.params import REPO, config


def _raw():
    return yaml.safe_load((REPO / S.STUDY_PARAMS).read_text())


def test_studies_params_are_valid_and_hold_the_issue_s_frontier():
    f = sc.load(config(), REPO / S.STUDY_PARAMS).frontier
    assert f.depths == [15, 12, 10, 8, 6, 4] and len(f.seeds) >= 3 and set(f.feature_alignment) == {True, False}
    smoke = sc.load(config(), REPO / S.STUDY_PARAMS, yaml.safe_load((REPO / "configs/studies/smoke.yaml").read_text()))
    assert smoke.frontier.depths == [12, 6]


@pytest.mark.parametrize("override, match", [
    ({"frontier": {"depths": [24]}}, "deeper than the teacher"),
    ({"frontier": {"depths": [0]}}, "depths"),
    ({"frontier": {"depths": [6, 6]}}, "duplicates"),
    ({"frontier": {"seeds": [7]}}, "headline_seeds"),
    ({"frontier": {"feature_alignment": []}}, "empty"),
    ({"frontier": {"depth": [6]}}, "depth"),
    ({"frontiers": {}}, "frontiers"),
])
def test_studies_params_are_validated(override, match):
    from pipeline.config import deep_merge

    with pytest.raises(ConfigError, match=match):
        sc.from_dict(deep_merge(_raw(), override), config())


def test_arms_must_differ():
    cfg = config({"distill": {"stage1": {"loss": {"af": 0.0}}, "stage2": {"loss": {"af": 0.0}}}})
    with pytest.raises(ConfigError, match="both arms"):
        sc.from_dict(_raw(), cfg)


def test_runs_are_variants_of_the_config_and_the_headline_is_reused():
    cfg = config()
    d = cfg.distill.student_layers
    vcfg, name = F.with_variant(cfg, d, True)
    assert is_headline(vcfg, name, cfg.seed)               # models/student, not retrained
    assert not is_headline(vcfg, name, cfg.seed + 1)
    v6, n6 = F.with_variant(cfg, 6, False)
    run6, two_stage = variant_config(v6, n6, 1)
    assert two_stage and run6.distill.student_layers == 6 and run6.seed == 1
    assert run6.distill.stage1.loss.af == 0 and run6.distill.stage2.loss.af == 0
    assert run6.distill.stage1.train == cfg.distill.stage1.train                 # the headline budget
    # depth 12 with L_af at another seed: the Config (so the stage-1 key) of the main study's full
    run12, _ = variant_config(vcfg, name, 1)
    full1, _ = variant_config(cfg, "full", 1)
    assert run12.distill == full1.distill and run12.seed == full1.seed
    assert F.run_name(12, False, 2) == "d12-af_false-s2" and F.parse_bool("true") and not F.parse_bool("False")


def test_knee_is_the_smallest_depth_without_a_significant_loss_down_from_the_reference():
    ok, bad = {"ci_high": 0.1}, {"ci_high": -0.1}
    assert FR.knee({15: bad, 10: ok, 8: ok, 6: bad, 4: ok}, 12) == 8      # 4 is below a significant loss
    assert FR.knee({10: bad, 8: ok}, 12) == 12
    assert FR.knee({}, 12) == 12


def _write_tables(tmp_path, depths, seeds, drop):
    """Synthetic per-image tables: PSNR falls by drop[depth] dB; without L_af 0.3 dB lower."""
    rng = np.random.default_rng(0)
    ids = [f"test-{i:06d}" for i in range(40)]
    base = rng.normal(20, 2, len(ids))
    for d in depths:
        for af in (True, False):
            for s in seeds:
                noise = rng.normal(0, 0.05, len(ids))
                psnr = base - drop[d] - (0 if af else 0.3) + noise
                pd.DataFrame({"id": ids, "psnr": psnr, "ssim": psnr / 40, "psnr_masked": psnr - 5,
                              "ssim_masked": psnr / 50, "psnr_unmasked": psnr + 1, "ssim_unmasked": psnr / 30,
                              "agree_psnr": 35 - drop[d] + noise, "agree_ssim": 0.98 + noise / 100}
                             ).to_csv(tmp_path / f"{F.run_name(d, af, s)}.csv", index=False)


def _latency(depths):
    return {"device": "cpu", "dtype": "float32", "threads": 1, "batch_size": 2, "warmup": 1, "repeats": 3,
            "teacher": {"controlnet_ms": 10.0, "step_ms": 20.0},
            "depths": {str(d): {"controlnet_ms": d / 2.3, "step_ms": 10 + d / 2.3, "step_speedup": 20 / (10 + d / 2.3)}
                       for d in depths}}


def test_aggregate_knee_report_and_plot(tmp_path):
    depths, seeds = [15, 12, 10, 8, 6, 4], [0, 1, 2]
    drop = {15: -0.1, 12: 0.0, 10: 0.0, 8: 0.01, 6: 1.0, 4: 2.5}
    _write_tables(tmp_path, depths, seeds, drop)
    summary = FR.aggregate(tmp_path, depths, seeds, [True, False], 12, _latency(depths))
    row = summary["depths"]["6"]
    assert row["af"]["n_seeds"] == 3 and row["af"]["n_images"] == 40
    assert row["af"]["psnr"]["ci_low"] < row["af"]["psnr"]["mean"] < row["af"]["psnr"]["ci_high"]
    assert row["af_minus_no_af"]["psnr"]["mean"] == pytest.approx(0.3, abs=0.05)
    assert row["af_minus_no_af"]["psnr"]["ci_low"] > 0
    assert row["af"]["vs_reference_psnr"]["ci_high"] < 0                 # 1 dB lost at 6 layers
    assert summary["knee"]["af"]["depth"] in (8, 10)
    assert summary["knee"]["af"]["step_ms"] == pytest.approx(10 + summary["knee"]["af"]["depth"] / 2.3)
    assert set(summary["depths"]["12"]) >= {"af", "no_af", "latency", "af_minus_no_af"}
    png = FR.plot(summary, tmp_path / "fig" / "frontier_depth.png")
    assert png.stat().st_size > 0
    md = FR.markdown(summary, "studies/frontier_depth.png")
    assert "Knee" in md and "| 6 | af |" in md and "frontier_depth.png" in md


def test_aggregate_with_missing_runs_and_mismatched_images(tmp_path):
    _write_tables(tmp_path, [12, 6], [0], {12: 0.0, 6: 1.0})
    s = FR.aggregate(tmp_path, [12, 6], [0, 1], [True, False], 12, None)
    assert s["depths"]["6"]["af"]["seeds"] == [0]
    df = pd.read_csv(tmp_path / f"{F.run_name(6, True, 0)}.csv")
    df.iloc[:-1].to_csv(tmp_path / f"{F.run_name(6, True, 1)}.csv", index=False)
    with pytest.raises(ValueError, match="other test images"):
        FR.aggregate(tmp_path, [12, 6], [0, 1], [True], 12, None)


def test_smoke_workspace_gets_the_studies_pipeline_with_smoke_values(tmp_path):
    from pipeline.profile import make_workspace

    ws = make_workspace("smoke", tmp_path / "ws")
    assert (ws / "studies" / "dvc.yaml").read_text() == (REPO / "studies" / "dvc.yaml").read_text()
    f = sc.load(config(), ws / "studies" / "params.yaml").frontier
    assert f.depths == [12, 6] and f.seeds == [0] and f.feature_alignment == [True, False]


def test_frontier_answer_states_the_knee_and_where_l_af_pays(tmp_path):
    depths, seeds = [15, 12, 10, 8, 6, 4], [0, 1, 2]
    _write_tables(tmp_path, depths, seeds, {15: -0.1, 12: 0.0, 10: 0.0, 8: 0.01, 6: 1.0, 4: 2.5})
    s = FR.aggregate(tmp_path, depths, seeds, [True, False], 12, _latency(depths))
    text = FR.answer(s)
    k = s["knee"]["af"]["depth"]
    assert f"the knee is **{k} layers**" in text and "6 layers -1.0" in text
    assert "L_af (paired, same seeds) helps significantly at depths" in text and "teacher's" in text


def test_studies_report_builds_every_section_from_what_exists(tmp_path, monkeypatch):
    """Only the frontier's tables exist: its section and answer are written, the prompt-quality section says
    nothing finished, the edges section shows '-' without failing; the three summaries are written."""
    from pipeline import paths as P
    from pipeline.studies.report import HEADLINE, build

    monkeypatch.chdir(tmp_path)
    (tmp_path / S.FRONTIER_PER_IMAGE).mkdir(parents=True)
    _write_tables(tmp_path / S.FRONTIER_PER_IMAGE, [12, 6], [0], {12: 0.0, 6: 1.0})
    cfg = config()
    studies = sc.from_dict({"frontier": {"depths": [12, 6], "seeds": [0], "feature_alignment": [True, False]},
                            "prompt_quality": {"levels": ["noise0", "empty"], "seeds": [0]},
                            "edges": {"seeds": [0]}}, cfg)
    md = build(cfg, studies)
    assert "## Compression frontier" in md and "**Answer.**" in md
    assert "No run of this study has finished" in md and "## Edges condition" in md
    for f in (S.FRONTIER_SUMMARY, S.PROMPT_SUMMARY, S.EDGES_SUMMARY, HEADLINE):
        assert (tmp_path / f).exists(), f
    flat = json.loads((tmp_path / HEADLINE).read_text())
    assert flat["frontier_knee_af"] == 12 and flat["frontier_d6_af_psnr"] < flat["frontier_d12_af_psnr"]
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert (tmp_path / S.STUDIES_FIGURES / "frontier_depth.png").exists() and not (tmp_path / P.PER_IMAGE).exists()


# ------------------------------------------------------------------------------- run code vs report code

RUN_STAGES = sorted(p.stem for p in (REPO / "stages").glob("study_*.py"))


def _report_side(f: str) -> bool:
    """Report code: pipeline/reporting/* and every pipeline/studies module named *report* (the studies'
    statistics, wording, figures)."""
    return f.startswith("pipeline/reporting/") or (f.startswith("pipeline/studies/") and "report" in Path(f).stem)


@pytest.mark.parametrize("stage", RUN_STAGES)
def test_run_stages_never_import_report_code(stage):
    """A stage's code deps are its import closure: report code in it would rerun training on a wording edit."""
    closure = import_closure(f"stages.{stage}")
    assert f"stages/{stage}.py" in closure
    assert [f for f in closure if _report_side(f)] == []


def test_the_report_stage_reads_the_studies_through_the_report_modules():
    assert {"study_frontier", "study_frontier_latency", "study_prompt", "study_edges_student"} <= set(RUN_STAGES)
    closure = set(import_closure("stages.studies_report"))
    assert {f"pipeline/studies/{m}.py" for m in ("report", "frontier_report", "prompt_quality_report",
                                                 "edges_report", "report_stats", "report_format")} <= closure
    assert "pipeline/reporting/figures.py" in closure            # the one figure tail


def test_one_rule_says_where_a_ci_lies_for_every_report():
    from pipeline.evaluation.stats import ci_side, verdict

    ci = lambda lo, hi, mean=0.0: {"mean": mean, "ci_low": lo, "ci_high": hi}  # noqa: E731
    assert [ci_side(ci(0.1, 0.3)), ci_side(ci(-0.3, -0.1)), ci_side(ci(-0.1, 0.1))] == [1, -1, 0]
    nan = float("nan")
    assert {ci_side(None), ci_side({}), ci_side(ci(nan, nan)), ci_side(ci(0.1, 0.3, nan))} == {None}
    assert verdict(ci(-0.3, -0.1), "negative") == "reproduced" and verdict(ci(nan, nan)) == "not significant"
