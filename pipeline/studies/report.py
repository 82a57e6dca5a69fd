"""reports/studies.md: the three studies' statistics, figures and answers (stage studies_report).

Report side only: this module and the ones it reads the studies with (pipeline.studies.*_report,
report_stats, report_format) are in no run stage's import closure, so editing their wording or statistics
reruns only this stage (tests/test_studies.py checks it). Every figure comes from a file a studies stage
wrote; a study whose runs are missing says so instead of failing (its section then has no answer)."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import paths
from pipeline import studies as S
from pipeline.config import Config
from pipeline.metrics_io import read_json, write_json
from pipeline.studies import edges_report
from pipeline.studies import frontier_report as F
from pipeline.studies import prompt_quality_report as Q
from pipeline.studies.config import StudiesConfig
from pipeline.studies.report_format import dig

# The studies' DVC metrics file: the figures each answer rests on, flat, so `dvc metrics diff` in a pull
# request shows what a change of the method does to them (the summaries beside it hold the CIs).
HEADLINE = S.STUDY_METRICS / "headline.json"


def headline(front: dict, pq: dict, ed: dict) -> dict:
    """Flat {name: number} of the three studies' key figures (mean and CI bounds of each difference)."""
    out: dict = {}

    def put(name: str, ci: dict | None) -> None:
        if ci and ci.get("mean") is not None:
            out.update({name: ci["mean"], f"{name}_ci_low": ci["ci_low"], f"{name}_ci_high": ci["ci_high"]})

    for arm, k in front.get("knee", {}).items():
        out[f"frontier_knee_{arm}"] = k["depth"]
    for d, r in front.get("depths", {}).items():
        for arm in ("af", "no_af"):
            if arm in r:
                put(f"frontier_d{d}_{arm}_psnr", r[arm]["psnr"])
        put(f"frontier_d{d}_af_minus_no_af_psnr", dig(r, "af_minus_no_af", "psnr"))
    for lv, r in pq.get("levels", {}).items():
        put(f"prompt_{lv}_psnr", r.get("psnr"))
        put(f"prompt_{lv}_minus_noise0_psnr", dig(r, "minus_reference", "psnr"))
        out[f"prompt_{lv}_diverged"] = r.get("diverged")
        out[f"prompt_{lv}_loss_var"] = dig(r, "loss_var", "mean")
    for cond in ed.get("conditions", {}):
        put(f"{cond}_gap_psnr", dig(ed, "conditions", cond, "gap_student_minus_teacher", "psnr"))
    put("edges_minus_inpaint_gap_psnr", dig(ed, "gap_edges_minus_inpaint", "psnr"))
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def build(cfg: Config, studies: StudiesConfig) -> str:
    """Write the three summaries and figures; return reports/studies.md's text."""
    rel = lambda p: str(Path(p).relative_to(S.STUDIES_REPORT.parent))  # noqa: E731
    f = studies.frontier
    ref = cfg.distill.student_layers if cfg.distill.student_layers in f.depths else max(f.depths)
    lat = read_json(S.FRONTIER_LATENCY) if S.FRONTIER_LATENCY.exists() else None
    front = F.aggregate(S.FRONTIER_PER_IMAGE, f.depths, f.seeds, f.feature_alignment, ref, lat)
    write_json(S.FRONTIER_SUMMARY, front)
    fig = F.plot(front, S.STUDIES_FIGURES / "frontier_depth.png")
    md = "# Studies\n\n" + F.markdown(front, rel(fig))

    p = studies.prompt_quality
    pq = Q.aggregate(S.PROMPT_RUNS, S.PROMPT_PER_IMAGE, p.levels, p.seeds)
    write_json(S.PROMPT_SUMMARY, pq)
    if pq["levels"]:
        fig = Q.plot(pq, Q.histories(S.PROMPT_RUNS, p.levels, p.seeds), S.STUDIES_FIGURES / "prompt_quality.png")
        md += Q.markdown(pq, rel(fig)) + "\n"
    else:
        md += "## Prompt quality in stage 2 (issue 15)\n\nNo run of this study has finished: nothing to report.\n\n"

    ed = edges_report.summarise(cfg, studies.edges.seeds, edges_per_image=S.EDGES_PER_IMAGE,
                                inpaint_per_image=paths.PER_IMAGE)
    write_json(S.EDGES_SUMMARY, ed)
    fig = edges_report.plot(ed, S.STUDIES_FIGURES / "edges.png")
    write_json(HEADLINE, headline(front, pq, ed))
    md += edges_report.markdown(ed).replace("## Edges condition (issue 15)",
                                            f"## Edges condition (issue 15)\n\n![edges]({rel(fig)})", 1)
    return md
