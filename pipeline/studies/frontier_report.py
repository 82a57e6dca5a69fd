"""The compression frontier's statistics, knee and report section (issue 15), from the per-run per-image
tables its run stages wrote (pipeline.studies.frontier) and their measured latency.

Statistics (pipeline.studies.report_stats, BCa 95%): per depth x arm, each metric's per-image values averaged
over seeds, then their mean with a CI over images; per depth, the paired per-image difference af - no_af;
per arm, the paired difference from the reference depth (distill.student_layers).

Knee (KNEE_RULE): per arm, the smallest depth whose paired per-image PSNR difference from the reference depth
has a CI reaching 0 (no significant loss of PSNR against the headline depth), and every depth between it and
the reference too (so a lucky shallow depth below a significant loss is not the knee).

Kept apart from pipeline.studies.frontier (the run stages' code): editing the report reruns only the report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.evaluation.stats import ci_side
from pipeline.studies.frontier import arm, run_name
from pipeline.studies.report_format import DPI, ci_text, dig
from pipeline.studies.report_stats import mean_ci, paired, read_table, seed_average

METRICS = ("psnr", "ssim", "psnr_masked", "ssim_masked", "agree_psnr", "agree_ssim")
DIFF_METRICS = ("psnr", "psnr_masked", "ssim", "ssim_masked")
KNEE_RULE = ("the smallest depth d such that, for d and every depth between d and the reference depth, the "
             "paired per-image PSNR difference (depth - reference, seed-averaged per image, BCa 95% CI) has "
             "its upper bound >= 0, i.e. no significant PSNR loss against the headline depth")


def knee(vs_reference: dict[int, dict], reference: int) -> int | None:
    """KNEE_RULE over {depth: paired PSNR difference from the reference}; the reference counts as no loss."""
    ok = {d: (d == reference or diff["ci_high"] >= 0) for d, diff in vs_reference.items()}
    ok[reference] = True
    best = None
    for d in sorted((d for d in ok if d <= reference), reverse=True):
        if not ok[d]:
            break
        best = d
    return best


def _knee(depth: int | None, reference: int, lat: dict | None) -> dict:
    at = (lat or {}).get("depths", {}).get(str(depth), {})
    return {"depth": depth, "reference": reference, "step_ms": at.get("step_ms") if depth else None,
            "controlnet_ms": at.get("controlnet_ms") if depth else None}


def aggregate(per_image: Path, depths, seeds, feature_alignment, reference: int, lat: dict | None = None) -> dict:
    """The frontier's summary (metrics/studies/frontier.json) from the per-run per-image tables."""
    read = lambda p: read_table(p, METRICS)  # noqa: E731
    avg: dict[tuple[int, bool], pd.DataFrame] = {}
    rows: dict[str, dict] = {}
    for d in depths:
        row: dict = {"depth": int(d)}
        if lat and str(d) in lat.get("depths", {}):
            row["latency"] = lat["depths"][str(d)]
        for af in feature_alignment:
            table, found = seed_average({s: Path(per_image) / f"{run_name(d, af, s)}.csv" for s in seeds}, read)
            if table is None:
                continue
            avg[(d, af)] = table
            row[arm(af)] = {"seeds": found, "n_seeds": len(found), "n_images": len(table),
                            **{k: mean_ci(table[k]) for k in METRICS}}
        if (d, True) in avg and (d, False) in avg:
            row["af_minus_no_af"] = {k: paired(avg[(d, True)], avg[(d, False)], k) for k in DIFF_METRICS}
        rows[str(d)] = row
    knees = {}
    for af in feature_alignment:
        ref = avg.get((reference, af))
        if ref is None:
            continue
        vs = {d: paired(avg[(d, af)], ref, "psnr") for d in depths if (d, af) in avg and d != reference}
        for d, diff in vs.items():
            rows[str(d)][arm(af)]["vs_reference_psnr"] = diff
        knees[arm(af)] = _knee(knee(vs, reference), reference, lat)
    return {"reference_depth": reference, "seeds": list(seeds), "knee_rule": KNEE_RULE, "knee": knees,
            "depths": rows, "latency": {k: v for k, v in (lat or {}).items() if k != "depths"}}


# ------------------------------------------------------------------------------------------- report

def plot(summary: dict, path: Path) -> Path:
    """PSNR (whole image) vs measured full-step latency, BCa 95% CI error bars, one series per arm."""
    from pipeline.reporting.figures import plt, save

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "psnr", "PSNR, whole image (dB)"), (axes[1], "psnr_masked", "PSNR, hole (dB)")):
        for name, marker in (("af", "o"), ("no_af", "s")):
            pts = [(r["latency"]["step_ms"], r[name][key], r["depth"]) for r in summary["depths"].values()
                   if name in r and "latency" in r]
            if not pts:
                continue
            pts.sort()
            x = [p[0] for p in pts]
            y = [p[1]["mean"] for p in pts]
            err = [[p[1]["mean"] - p[1]["ci_low"] for p in pts], [p[1]["ci_high"] - p[1]["mean"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label="with L_af" if name == "af" else "without L_af")
            for xi, yi, (_, _, d) in zip(x, y, pts):
                ax.annotate(str(d), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        t = summary.get("latency", {}).get("teacher", {})
        if t.get("step_ms"):
            ax.axvline(t["step_ms"], color="grey", ls="--", lw=1, label="teacher step")
        k = summary["knee"].get("af", {})
        if k.get("step_ms"):
            ax.axvline(k["step_ms"], color="tab:red", ls=":", lw=1, label=f"knee ({k['depth']} layers)")
        ax.set_xlabel("measured full denoising step (ms)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return save(fig, path, dpi=DPI)


def _tables(summary: dict) -> list[str]:
    """The per depth x arm table and the paired af - no_af table."""
    nan = float("nan")
    out = ["| depth | arm | PSNR | SSIM | PSNR hole | SSIM hole | agree PSNR | ControlNet ms | step ms | step speedup |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["depths"].values():
        L = r.get("latency", {})
        for name in ("af", "no_af"):
            if name not in r:
                continue
            a = r[name]
            out.append(f"| {r['depth']} | {name} | {ci_text(a['psnr'])} | {ci_text(a['ssim'], 3)} "
                       f"| {ci_text(a['psnr_masked'])} | {ci_text(a['ssim_masked'], 3)} | {ci_text(a['agree_psnr'])} "
                       f"| {L.get('controlnet_ms', nan):.2f} | {L.get('step_ms', nan):.2f} "
                       f"| {L.get('step_speedup', nan):.2f}x |")
    out += ["", "Paired difference with L_af minus without, per depth (dB; BCa 95% CI over images):", "",
            "| depth | PSNR | PSNR hole |", "|---|---|---|"]
    for r in summary["depths"].values():
        if "af_minus_no_af" in r:
            dd = r["af_minus_no_af"]
            out.append(f"| {r['depth']} | {ci_text(dd['psnr'])} | {ci_text(dd['psnr_masked'])} |")
    return out


def markdown(summary: dict, figure: str) -> str:
    """The "## Compression frontier" section of reports/studies.md, its answer last (ends with a blank line)."""
    lat = summary.get("latency", {})
    t = lat.get("teacher", {})
    out = ["## Compression frontier (issue 15)", "",
           f"Students of each depth, with and without L_af, at the headline budget; seeds {summary['seeds']} "
           "(per-image values averaged over seeds; mean and BCa 95% CI over test images). Latency: "
           f"median ms, batch {lat.get('batch_size')}, {lat.get('device')} ({lat.get('dtype')}, "
           f"{lat.get('threads')} threads), untrained students (cost depends on shape only); teacher "
           f"{t.get('controlnet_ms', float('nan')):.2f} ms ControlNet, {t.get('step_ms', float('nan')):.2f} ms step.", "",
           f"![frontier]({figure})", "", *_tables(summary), "",
           f"**Knee** (rule: {summary['knee_rule']}; reference depth {summary['reference_depth']}):", ""]
    for name, k in summary["knee"].items():
        if k["depth"] is None:
            out.append(f"- {name}: none")
        else:
            ms = f", {k['step_ms']:.2f} ms per step" if k.get("step_ms") else ""
            out.append(f"- {name}: **{k['depth']} layers**{ms}")
    out += ["", "**Answer.** " + answer(summary), ""]
    return "\n".join(out) + "\n"


def answer(summary: dict) -> str:
    """The one-paragraph answer, from the summary's figures only."""
    ref = summary["reference_depth"]
    rows = summary["depths"]
    said = []
    for a, label in (("af", "with L_af"), ("no_af", "without L_af")):
        k = summary["knee"].get(a)
        if not k:
            continue
        losses = [(int(d), r[a]["vs_reference_psnr"]) for d, r in rows.items()
                  if a in r and "vs_reference_psnr" in r[a]]
        lost = ", ".join(f"{d} layers {v['mean']:+.2f} dB [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]"
                         for d, v in sorted(losses, reverse=True))
        ms = f" ({k['step_ms']:.2f} ms per full step)" if k.get("step_ms") else ""
        at = f"the knee is **{k['depth']} layers**{ms}" if k["depth"] else "no depth below the reference qualifies"
        said.append(f"{label[0].upper()}{label[1:]}, whole-image PSNR against {ref} layers: {lost}; by the stated rule {at}.")
    side: dict[int, list[str]] = {1: [], -1: [], 0: []}  # where each depth's af - no_af CI lies (None: as 0)
    for d, r in rows.items():
        side[ci_side(dig(r, "af_minus_no_af", "psnr")) or 0].append(d)
    said.append("L_af (paired, same seeds) helps significantly at depths " + (", ".join(side[1]) or "none")
                + "; hurts significantly at " + (", ".join(side[-1]) or "none")
                + "; not significant at " + (", ".join(side[0]) or "none") + ".")
    t = summary.get("latency", {}).get("teacher", {})
    lat = [(int(d), r["latency"]) for d, r in rows.items() if "latency" in r]
    if t.get("step_ms") and lat:
        lo, hi = min(lat), max(lat)
        said.append(f"Measured full-step latency goes from {hi[1]['step_ms']:.2f} ms ({hi[0]} layers) to "
                    f"{lo[1]['step_ms']:.2f} ms ({lo[0]} layers) against the teacher's {t['step_ms']:.2f} ms.")
    return " ".join(said)
