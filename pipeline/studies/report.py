"""reports/studies.md: the three studies' statistics, figures and answers (stage studies_report).

A module of its own: the training stages' code deps are their import closures, so editing the report's
wording here reruns only the report. Every figure comes from a file a studies stage wrote; a study whose
runs are missing says so instead of failing (its section then has no answer)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline import studies as S
from pipeline.config import Config
from pipeline.metrics_io import read_json, write_json
from pipeline.studies import edges_report, prompt_quality
from pipeline.studies import frontier as F
from pipeline.studies.config import StudiesConfig

# The studies' DVC metrics file: the figures each answer rests on, flat, so `dvc metrics diff` in a pull
# request shows what a change of the method does to them (the summaries beside it hold the CIs).
HEADLINE = S.STUDY_METRICS / "headline.json"


def _verdict(ci: dict | None) -> str:
    if not ci or ci.get("mean") is None or math.isnan(ci["mean"]):
        return "not computed"
    if ci["ci_low"] > 0:
        return "significantly positive"
    if ci["ci_high"] < 0:
        return "significantly negative"
    return "not significant"


def frontier_answer(summary: dict) -> str:
    """The compression frontier's one-paragraph answer, from the summary's figures only."""
    ref = summary["reference_depth"]
    rows = summary["depths"]
    said = []
    for arm, label in (("af", "with L_af"), ("no_af", "without L_af")):
        k = summary["knee"].get(arm)
        if not k:
            continue
        losses = [(int(d), r[arm]["vs_reference_psnr"]) for d, r in rows.items()
                  if arm in r and "vs_reference_psnr" in r[arm]]
        lost = ", ".join(f"{d} layers {v['mean']:+.2f} dB [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]"
                         for d, v in sorted(losses, reverse=True))
        ms = f" ({k['step_ms']:.2f} ms per full step)" if k.get("step_ms") else ""
        knee = f"the knee is **{k['depth']} layers**{ms}" if k["depth"] else "no depth below the reference qualifies"
        said.append(f"{label[0].upper()}{label[1:]}, whole-image PSNR against {ref} layers: {lost}; by the stated rule {knee}.")
    pos, neg, ns = [], [], []
    for d, r in rows.items():
        v = _verdict(r.get("af_minus_no_af", {}).get("psnr"))
        (pos if v == "significantly positive" else neg if v == "significantly negative" else ns).append(d)
    said.append("L_af (paired, same seeds) helps significantly at depths " + (", ".join(pos) or "none")
                + "; hurts significantly at " + (", ".join(neg) or "none")
                + "; not significant at " + (", ".join(ns) or "none") + ".")
    t = summary.get("latency", {}).get("teacher", {})
    lat = [(int(d), r["latency"]) for d, r in rows.items() if "latency" in r]
    if t.get("step_ms") and lat:
        lo, hi = min(lat), max(lat)
        said.append(f"Measured full-step latency goes from {hi[1]['step_ms']:.2f} ms ({hi[0]} layers) to "
                    f"{lo[1]['step_ms']:.2f} ms ({lo[0]} layers) against the teacher's {t['step_ms']:.2f} ms.")
    return " ".join(said)


def _prompt_histories(levels, seeds) -> dict[str, list[pd.DataFrame]]:
    out: dict[str, list[pd.DataFrame]] = {}
    for lv in levels:
        for s in seeds:
            f = S.PROMPT_RUNS / f"{prompt_quality.run_name(lv, s)}-loss.csv"
            if f.exists():
                out.setdefault(lv, []).append(pd.read_csv(f))
    return out


def headline(front: dict, pq: dict, ed: dict) -> dict:
    """Flat {name: number} of the three studies' key figures (mean and CI bounds of each difference)."""
    out: dict = {}

    def put(name: str, ci: dict | None) -> None:
        if ci and ci.get("mean") is not None:
            out.update({name: ci["mean"], f"{name}_ci_low": ci["ci_low"], f"{name}_ci_high": ci["ci_high"]})

    def dig(d, *keys):  # None where any level is missing or None
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

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
    md = F.markdown(front, rel(fig)) + "\n**Answer.** " + frontier_answer(front) + "\n\n"

    p = studies.prompt_quality
    pq = prompt_quality.aggregate(S.PROMPT_RUNS, S.PROMPT_PER_IMAGE, p.levels, p.seeds)
    for lv, row in pq["levels"].items():  # the share of prompts each level changed: its encode stage's record
        enc = S.PROMPT_RUNS / f"encode-{lv}.json"
        if enc.exists():
            row["changed_share"] = read_json(enc)["changed_share"]
    write_json(S.PROMPT_SUMMARY, pq)
    if pq["levels"]:
        fig = prompt_quality.plot(pq, _prompt_histories(p.levels, p.seeds), S.STUDIES_FIGURES / "prompt_quality.png")
        md += prompt_quality.markdown(pq, rel(fig)) + "\n"
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
