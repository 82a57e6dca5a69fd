"""The prompt-quality study's statistics and report section (issue 15), from what its run stages
(pipeline.studies.prompt_quality) wrote: per run <level>-s<seed>.json (loss statistics), -loss.csv (stage-2
loss) and the per-image table; per level encode-<level>.json (the share of prompts it changed).

- ``aggregate``: per level, the seed-averaged per-image metrics with BCa 95% CIs, the paired per-image
  difference from noise0 (REFERENCE_LEVEL: the pseudo-labeller's own prompts), and the stage-2 loss
  statistics over seeds (variance over the logged steps, divergence) -> metrics/studies/prompt_quality.json;
- ``plot``, ``markdown`` and ``answer``: its part of reports/studies.md.

Kept apart from pipeline.studies.prompt_quality (the run stages' code): editing the report reruns only the
report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.evaluation.stats import ci_side
from pipeline.metrics_io import read_json
from pipeline.studies.config import prompt_level
from pipeline.studies.prompt_quality import DIVERGENCE_RATIO, METRICS, run_name
from pipeline.studies.report_format import DPI, ci_text, dig
from pipeline.studies.report_stats import mean_ci, paired, read_table, seed_average

REFERENCE_LEVEL = "noise0"
LOSS_STATS = ("loss_mean", "loss_var", "loss_cv", "loss_last_over_min")
# a level's PSNR vs the reference level's, by where the paired CI lies (pipeline.evaluation.stats.ci_side)
VERDICT = {1: "better", -1: "worse", 0: "not significant", None: "not computed"}


def _read(path: Path) -> pd.DataFrame:
    return read_table(path, [k for k in METRICS if k in pd.read_csv(path, nrows=0)])


def _loss_stats(stab: list[dict]) -> dict:
    """Per loss statistic, its mean, min and max over the seeds that have a finite value."""
    out = {}
    for k in LOSS_STATS:
        v = np.array([x[k] for x in stab if x[k] is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = {"mean": float(v.mean()) if len(v) else math.nan,
                  "min": float(v.min()) if len(v) else math.nan, "max": float(v.max()) if len(v) else math.nan}
    return out


def _level(runs: Path, per_image: Path, level: str, seeds) -> tuple[dict | None, pd.DataFrame | None]:
    """(one level's row, its seed-averaged per-image table), or (None, None) when none of its runs finished."""
    row: dict = {"level": level, "noise_share": prompt_level(level)}
    found, stab = [], []
    for s in seeds:
        j = Path(runs) / f"{run_name(level, s)}.json"
        if j.exists():
            m = read_json(j)
            found.append(s)
            stab.append({k: m.get(k) for k in (*LOSS_STATS, "diverged")})
            row.setdefault("changed_share", m.get("changed_share"))
    if not found:
        return None, None
    enc = Path(runs) / f"encode-{level}.json"  # the share of prompts the level changed: its encode stage's record
    if enc.exists():
        row["changed_share"] = read_json(enc)["changed_share"]
    row["seeds"] = found
    row["diverged"] = int(sum(bool(x["diverged"]) for x in stab))
    row.update(_loss_stats(stab))
    avg, _ = seed_average({s: Path(per_image) / f"{run_name(level, s)}.csv" for s in found}, _read)
    if avg is not None:
        row["n_images"] = len(avg)
        row.update({k: mean_ci(avg[k]) for k in avg.columns})
    return row, avg


def aggregate(runs: Path, per_image: Path, levels, seeds) -> dict:
    """metrics/studies/prompt_quality.json from the per-run JSON, the encode records and the per-image tables."""
    tables: dict[str, pd.DataFrame] = {}
    out: dict = {"reference_level": REFERENCE_LEVEL, "seeds": list(seeds), "divergence_ratio": DIVERGENCE_RATIO,
                 "levels": {}}
    for level in levels:
        row, avg = _level(runs, per_image, level, seeds)
        if row is None:
            continue
        if avg is not None:
            tables[level] = avg
        out["levels"][level] = row
    ref = tables.get(REFERENCE_LEVEL)
    if ref is not None:
        for level, t in tables.items():
            if level != REFERENCE_LEVEL:
                out["levels"][level]["minus_reference"] = {k: paired(t, ref, k) for k in ("psnr", "psnr_masked")
                                                           if k in t and k in ref}
    return out


def histories(runs: Path, levels, seeds) -> dict[str, list[pd.DataFrame]]:
    """{level: the stage-2 loss (step, loss) of each of its runs that logged one}: the plot's right panel."""
    out: dict[str, list[pd.DataFrame]] = {}
    for lv in levels:
        for s in seeds:
            f = Path(runs) / f"{run_name(lv, s)}-loss.csv"
            if f.exists():
                out.setdefault(lv, []).append(pd.read_csv(f))
    return out


# ------------------------------------------------------------------------------------------- report

def plot(summary: dict, histories: dict[str, list[pd.DataFrame]], path: Path) -> Path:
    """Left: final PSNR (whole image and hole) per level with BCa 95% CIs. Right: stage-2 loss per level
    (mean over seeds of the logged steps)."""
    from pipeline.reporting.figures import plt, save

    levels = list(summary["levels"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for off, key, label in ((-0.12, "psnr", "whole image"), (0.12, "psnr_masked", "hole")):
        pts = [(i + off, summary["levels"][lv][key]) for i, lv in enumerate(levels) if key in summary["levels"][lv]]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[[p[1]["mean"] - p[1]["ci_low"] for p in pts], [p[1]["ci_high"] - p[1]["mean"] for p in pts]],
                    fmt="o", capsize=3, label=f"PSNR, {label}")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylabel("dB (test split, BCa 95% CI)")
    ax.set_title("Final quality by unlabelled-prompt quality")
    ax.legend(fontsize=8)
    ax = axes[1]
    for lv in levels:
        hs = [h for h in histories.get(lv, []) if len(h)]
        if hs:
            m = pd.concat(hs).groupby("step")["loss"].agg(["mean", "min", "max"])
            line, = ax.plot(m.index, m["mean"], label=lv)
            ax.fill_between(m.index, m["min"], m["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("loss (mean over seeds; band: min-max)")
    ax.set_title("Stage-2 training loss")
    ax.legend(fontsize=8)
    return save(fig, path, dpi=DPI)


def answer(summary: dict) -> str:
    """The one-paragraph answer, built from the figures only."""
    lv = summary["levels"]
    if REFERENCE_LEVEL not in lv:
        return "The reference level (the pseudo-labeller's own prompts) did not run: no answer."
    parts = []
    for name, row in lv.items():
        d = dig(row, "minus_reference", "psnr")
        if d:
            parts.append(f"{name}: {d['mean']:+.2f} dB [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] "
                         f"({VERDICT[ci_side(d)]})")
    worst = [n for n, r in lv.items() if ci_side(dig(r, "minus_reference", "psnr")) == -1]
    div = sum(r.get("diverged", 0) for r in lv.values())
    runs = sum(len(r.get("seeds", [])) for r in lv.values())
    s = ("Whole-image PSNR against the pseudo-labeller's own prompts (paired per image, seed-averaged, BCa 95% CI): "
         + "; ".join(parts) + ". ")
    s += (f"Significantly worse: {', '.join(worst)}. " if worst else
          "No level is significantly worse than the pseudo-labeller's own prompts. ")
    s += f"{div} of {runs} stage-2 runs diverged (non-finite loss or last logged loss > {DIVERGENCE_RATIO}x its lowest)."
    return s


def markdown(summary: dict, figure: str) -> str:
    """The "## Prompt quality in stage 2" section of reports/studies.md, its answer last (ends with a blank line)."""
    out = ["## Prompt quality in stage 2 (issue 15)", "",
           "Stage 2 from full's stage 1 at each seed, with the unlabelled split's local prompts at controlled quality: "
           "noise<P> = P% of the pseudo-labeller's prompts replaced by wrong ones (caption_noise's rule), empty = "
           f"every prompt \"\". Seeds {summary['seeds']}; per-image values averaged over seeds; BCa 95% CIs over "
           "test images. Loss statistics over the logged stage-2 steps after warm-up (mean over seeds).", "",
           f"![prompt quality]({figure})", "",
           "| level | prompts changed | PSNR | PSNR hole | SSIM | agree PSNR | PSNR vs noise0 | loss var | loss CV | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["levels"].items():
        ch = r.get("changed_share")
        out.append(f"| {name} | {'-' if ch is None else f'{ch:.0%}'} | {ci_text(r.get('psnr'))} "
                   f"| {ci_text(r.get('psnr_masked'))} | {ci_text(r.get('ssim'), 3)} | {ci_text(r.get('agree_psnr'))} "
                   f"| {ci_text(dig(r, 'minus_reference', 'psnr'))} "
                   f"| {r['loss_var']['mean']:.2e} | {r['loss_cv']['mean']:.3f} | {r['diverged']}/{len(r['seeds'])} |")
    out += ["", "**Answer.** " + answer(summary), ""]
    return "\n".join(out) + "\n"
