"""The report: every number traces to a metrics file; figures exist; `dvc metrics diff` shows a change."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.params import config
from pipeline.reporting.report import PAPER, build_report
from tests.helpers_eval import EVAL_PARAMS, ensure_outputs, eval_ws, inside  # noqa: F401 - fixture

NUMBER = re.compile(r"(?<![\w.\-+])[+-]?\d+(?:\.\d+)?(?:e[+-]\d+)?(?![\w.])")


def leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from leaves(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def renderings(v) -> set[str]:
    """How the report may print ``v``: an int as itself, a float at 1-4 decimals (signed for gaps) or in
    scientific notation. Floats are never printed at 0 decimals, so no integer in the report can match one
    by rounding."""
    if isinstance(v, int):
        return {str(v), f"{v:.3e}"}
    return {f"{v:.{d}f}" for d in range(1, 5)} | {f"{v:.3e}", f"{v:+.2f}", f"{v:+.4f}"}


def known_numbers(metrics_dir: Path) -> set[str]:
    known = set()
    for p in metrics_dir.rglob("*.json"):
        for v in leaves(json.loads(p.read_text())):
            known |= renderings(v)
    return known


def report_numbers(md: str) -> list[str]:
    md = re.sub(r"`[^`]*`", " ", md)              # code spans: file names, reasons
    md = re.sub(r"\]\([^)]*\)", "] ", md)          # link / image targets
    return NUMBER.findall(md)


@pytest.fixture(scope="module")
def report(eval_ws):
    from stages import report as stage

    ensure_outputs(eval_ws)
    with inside(eval_ws):
        assert stage.main([]) == 0
    return eval_ws


def test_every_number_in_the_report_comes_from_a_metrics_file(report):
    md = (report / "reports/report.md").read_text()
    numbers = report_numbers(md)
    assert len(numbers) > 50
    known = known_numbers(report / "metrics")
    untraced = [n for n in numbers if n not in known]
    assert not untraced, f"numbers in report.md not found in metrics/**/*.json: {untraced[:20]}"


def test_report_holds_the_papers_figures_and_ours(report):
    md = (report / "reports/report.md").read_text()
    for v in PAPER.values():
        assert (f"{v:.2f}" if v > 1 else f"{v:.4f}") in md
    summary = json.loads((report / "metrics/report.json").read_text())
    assert summary["paper_sd3_1024px"]["student_minus_teacher_psnr"] == pytest.approx(-0.46)
    student = json.loads((report / "metrics/eval/student.json").read_text())
    assert f"{student['psnr']:.2f}" in md and "SD3-medium" in md and "tiny world" in md
    assert "not computed" in md
    # headline ablation: mean ± std over the two seeds
    full = [json.loads((report / f"metrics/ablations/full-s{s}.json").read_text())["psnr"] for s in (0, 1)]
    a = summary["ablations"]["full"]
    assert a["n_seeds"] == 2 and a["psnr_mean"] == pytest.approx(sum(full) / 2)
    assert f"{a['psnr_mean']:.2f} ± {a['psnr_std']:.2f}" in md
    assert "Not run yet" in md and "`wo_af-s0`" in md  # asked for by params, not run in this test


def test_study_pairs_images_and_gives_a_verdict_per_ordering(report):
    import pandas as pd

    from pipeline.evaluation.stats import paired_difference

    study = json.loads((report / "metrics/study.json").read_text())
    full, scratch = study["variants"]["full"], study["variants"]["from_scratch"]
    assert full["seeds"] == [0, 1] and full["n_images"] == scratch["n_images"] > 0
    per = {v: sum(pd.read_csv(report / f"metrics/per_image/ablations/{v}-s{s}.csv")["psnr"] for s in (0, 1)) / 2
           for v in ("full", "from_scratch")}
    want = paired_difference(per["from_scratch"], per["full"])
    assert scratch["vs_full"]["psnr"]["mean"] == pytest.approx(want["mean"], abs=1e-4)
    assert scratch["vs_full"]["psnr"]["ci_low"] <= want["mean"] <= scratch["vs_full"]["psnr"]["ci_high"]
    (order,) = study["orderings"]  # only full > from_scratch has both sides in this test
    assert (order["better"], order["worse"]) == ("full", "from_scratch")
    assert order["verdict"] in ("reproduced", "not significant", "reversed")
    md = (report / "reports/report.md").read_text()
    assert f"**{order['verdict']}**" in md and "gap_full_minus_teacher" in study


def test_report_figures_exist(report):
    for name in ("samples.png", "frontier.png", "loss_curves.png"):
        p = report / "reports/figures" / name
        assert p.exists() and p.stat().st_size > 1000, name
        assert f"](figures/{name})" in (report / "reports/report.md").read_text()


def test_report_without_ablations_or_benchmark(tmp_path):
    cfg = config(EVAL_PARAMS)
    ev = {"n_images": 2, "psnr": 12.0, "ssim": 0.5, "psnr_masked": 9.0, "ssim_masked": 0.4, "psnr_unmasked": 14.0,
          "ssim_unmasked": 0.6, "controlnet_params": 10, "controlnet_layers": 3, "lpips": None,
          "not_computed": {"lpips": "no local weights"}}
    (tmp_path / "metrics/eval").mkdir(parents=True)
    (tmp_path / "metrics/eval/student.json").write_text(json.dumps(ev))
    build_report(cfg, tmp_path / "metrics", tmp_path / "reports/report.md", tmp_path / "reports/figures",
                 tmp_path / "reports/samples", tmp_path / "dvclive")
    md = (tmp_path / "reports/report.md").read_text()
    assert "benchmark has not run" in md and "Not run yet" in md
    assert not [n for n in report_numbers(md) if n not in known_numbers(tmp_path / "metrics")]


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


def test_dvc_metrics_diff_between_two_commits_shows_the_change(tmp_path):
    dvc = [sys.executable, "-m", "dvc"]
    _git(tmp_path, "init", "-q")
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/eval/student.json\n  - metrics/benchmark.json\n")
    m = {"psnr": 18.1234, "ssim": 0.61, "lpips": None, "not_computed": {"lpips": "no local weights"}}
    bench = {"device": "cpu", "models": {"student": {"step_ms": 3.5}}}
    (tmp_path / "metrics/eval").mkdir(parents=True)
    (tmp_path / "metrics/eval/student.json").write_text(json.dumps(m))
    (tmp_path / "metrics/benchmark.json").write_text(json.dumps(bench))
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "one")
    (tmp_path / "metrics/eval/student.json").write_text(json.dumps({**m, "psnr": 19.5678}))
    _git(tmp_path, "commit", "-qam", "two")
    out = subprocess.run([*dvc, "metrics", "diff", "HEAD~1", "HEAD", "--md"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "DVC_IGNORE_ISATTY": "1", "DVC_NO_ANALYTICS": "1"})
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "psnr" in line)
    assert "18.1234" in row and "19.5678" in row and "1.4444" in row
    assert "step_ms" not in out.stdout  # unchanged figures are not listed
