"""The compression frontier (issue 15): students of each depth (studies/params.yaml ``frontier.depths``),
each with the many-to-one L_af pairing pipeline.models.mapping.af_pairs derives for its depth and without
L_af (``distill.stage{1,2}.loss.af = 0``), at the headline budget and several seeds; measured ControlNet
and full-step latency per depth; quality vs latency with CIs and the knee.

Training and evaluation are the ablation study's (pipeline.distill.ablation.run_ablation): each run is a
variant added to a copy of the Config (``distill.student_layers = depth`` [+ no L_af]), so
- depth = distill.student_layers with L_af at params' seed IS the headline student (models/student):
  evaluated, not retrained (run_ablation's headline check);
- its stage 1 at other seeds starts from full's stage-1 prefix (checkpoints/ablations/stage1-s<seed>) when
  the key matches (depth 12 with L_af); every other run trains its stage 1;
- depth 12 without L_af is the main study's wo_af: retrained here (a DVC dep on metrics/per_image/ablations
  would rerun every frontier run when any ablation changes).

Statistics (pipeline.evaluation.stats, BCa 95%): per depth x arm, each metric's per-image values averaged
over seeds, then their mean with a CI over images; per depth, the paired per-image difference af - no_af;
per arm, the paired difference from the reference depth (distill.student_layers).

Knee (KNEE_RULE): per arm, the smallest depth whose paired per-image PSNR difference from the reference depth
has a CI reaching 0 (no significant loss of PSNR against the headline depth), and every depth between it and
the reference too (so a lucky shallow depth below a significant loss is not the knee).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, from_dict

METRICS = ("psnr", "ssim", "psnr_masked", "ssim_masked", "agree_psnr", "agree_ssim")
DIFF_METRICS = ("psnr", "psnr_masked", "ssim", "ssim_masked")
ARMS = {True: "af", False: "no_af"}
KNEE_RULE = ("the smallest depth d such that, for d and every depth between d and the reference depth, the "
             "paired per-image PSNR difference (depth - reference, seed-averaged per image, BCa 95% CI) has "
             "its upper bound >= 0, i.e. no significant PSNR loss against the headline depth")


def arm(af: bool) -> str:
    return ARMS[bool(af)]


def variant_name(depth: int, af: bool) -> str:
    return f"d{depth}-af_{str(bool(af)).lower()}"


def run_name(depth: int, af: bool, seed: int) -> str:
    """d<depth>-af_<true|false>-s<seed>: as studies/dvc.yaml's matrix spells it (DVC writes booleans lower case)."""
    return f"{variant_name(depth, af)}-s{seed}"


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t not in ("true", "false", "1", "0"):
        raise ValueError(f"not a boolean: {text!r}")
    return t in ("true", "1")


def overrides(depth: int, af: bool) -> dict:
    o: dict = {"distill": {"student_layers": int(depth)}}
    if not af:
        o["distill"].update(stage1={"loss": {"af": 0.0}}, stage2={"loss": {"af": 0.0}})
    return o


def with_variant(cfg: Config, depth: int, af: bool) -> tuple[Config, str]:
    """(cfg with the run's variant added to ablations.variants, its name): run_ablation trains it. Nothing a
    run trains or a checkpoint key reads changes: only the variant table grows."""
    raw = cfg.model_dump(mode="json")
    name = variant_name(depth, af)
    raw["ablations"]["variants"][name] = {"two_stage": True, "overrides": overrides(depth, af)}
    return from_dict(raw, f"studies.frontier.{name}"), name


def run_frontier(cfg: Config, depth: int, af: bool, seed: int, *, foundation: Path, teacher: Path, encoded: Path,
                 trajectories: Path, headline: Path, reference: Path, df, out_dir: Path, work_dir: Path,
                 stage1_prefixes=()):
    """Train (or take the headline student) and evaluate one frontier run: run_ablation's (metrics, Evaluation)."""
    from pipeline.distill.ablation import run_ablation

    vcfg, name = with_variant(cfg, depth, af)
    m, ev = run_ablation(vcfg, name, seed, foundation=foundation, teacher=teacher, encoded=encoded,
                         trajectories=trajectories, headline=headline, reference=reference, df=df, out_dir=out_dir,
                         work_dir=work_dir, stage1_prefixes=stage1_prefixes)
    return {**m, "depth": int(depth), "feature_alignment": bool(af), "arm": arm(af)}, ev


# ------------------------------------------------------------------------------------------- latency

def latency(cfg: Config, depths, *, foundation: Path, teacher: Path) -> dict:
    """ControlNet-alone and full-step (backbone + ControlNet) latency per depth, measured by
    pipeline.evaluation.benchmark.run_benchmark on untrained students (cost depends on shape only), the
    teacher in the same process as the speedup reference."""
    from pipeline.evaluation.benchmark import run_benchmark

    bcfg = cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(update={"extra_layers": list(depths)})})
    b = run_benchmark(bcfg, foundation, {"teacher": teacher})
    keep = ("controlnet_params", "controlnet_layers", "controlnet_flops", "step_flops", "controlnet_ms", "step_ms",
            "controlnet_speedup", "step_speedup", "controlnet_speedup_ideal", "step_speedup_ideal",
            "controlnet_peak_mb", "step_peak_mb")
    models = b["models"]
    return {**{k: b[k] for k in ("device", "dtype", "threads", "batch_size", "warmup", "repeats")},
            "backbone_step_ms": b["backbone"]["step_ms"],
            "teacher": {k: models["teacher"][k] for k in keep if k in models["teacher"]},
            "depths": {str(d): {k: models[f"layers_{d}"][k] for k in keep if k in models[f"layers_{d}"]}
                       for d in depths}}


# ---------------------------------------------------------------------------------------- statistics

def _read(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [k for k in ("id", *METRICS) if k not in df]
    if missing:
        raise ValueError(f"{path}: per-image table lacks columns {missing}")
    return df.set_index("id")[list(METRICS)]


def seed_average(per_image: Path, depth: int, af: bool, seeds) -> tuple[pd.DataFrame | None, list[int]]:
    tables, found = [], []
    for s in seeds:
        p = Path(per_image) / f"{run_name(depth, af, s)}.csv"
        if p.exists():
            tables.append(_read(p))
            found.append(s)
    if not tables:
        return None, []
    for t, s in zip(tables[1:], found[1:]):
        if not t.index.equals(tables[0].index):
            raise ValueError(f"{per_image}/{run_name(depth, af, s)}.csv: other test images than "
                             f"{run_name(depth, af, found[0])}.csv")
    return sum(tables) / len(tables), found


def _ci(values) -> dict:
    from pipeline.evaluation.stats import paired_difference

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return paired_difference(v, np.zeros_like(v))


def _paired(a: pd.DataFrame, b: pd.DataFrame, key: str) -> dict:
    from pipeline.evaluation.stats import paired_difference

    if not a.index.equals(b.index):
        raise ValueError("paired comparison of different test images")
    return paired_difference(a[key].to_numpy(), b[key].to_numpy())


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


def aggregate(per_image: Path, depths, seeds, feature_alignment, reference: int, lat: dict | None = None) -> dict:
    """The frontier's summary (metrics/studies/frontier.json) from the per-run per-image tables."""
    avg: dict[tuple[int, bool], pd.DataFrame] = {}
    rows: dict[str, dict] = {}
    for d in depths:
        row: dict = {"depth": int(d)}
        if lat and str(d) in lat.get("depths", {}):
            row["latency"] = lat["depths"][str(d)]
        for af in feature_alignment:
            table, found = seed_average(per_image, d, af, seeds)
            if table is None:
                continue
            avg[(d, af)] = table
            row[arm(af)] = {"seeds": found, "n_seeds": len(found), "n_images": len(table),
                            **{k: _ci(table[k]) for k in METRICS}}
        if (d, True) in avg and (d, False) in avg:
            row["af_minus_no_af"] = {k: _paired(avg[(d, True)], avg[(d, False)], k) for k in DIFF_METRICS}
        rows[str(d)] = row
    knees = {}
    for af in feature_alignment:
        ref = avg.get((reference, af))
        if ref is None:
            continue
        vs = {d: _paired(avg[(d, af)], ref, "psnr") for d in depths if (d, af) in avg and d != reference}
        for d, diff in vs.items():
            rows[str(d)][arm(af)]["vs_reference_psnr"] = diff
        k = knee(vs, reference)
        knees[arm(af)] = {"depth": k, "reference": reference,
                          "step_ms": (lat or {}).get("depths", {}).get(str(k), {}).get("step_ms") if k else None,
                          "controlnet_ms": (lat or {}).get("depths", {}).get(str(k), {}).get("controlnet_ms") if k else None}
    return {"reference_depth": reference, "seeds": list(seeds), "knee_rule": KNEE_RULE, "knee": knees,
            "depths": rows, "latency": {k: v for k, v in (lat or {}).items() if k != "depths"}}


# ------------------------------------------------------------------------------------------- report

def plot(summary: dict, path: Path) -> Path:
    """PSNR (whole image) vs measured full-step latency, BCa 95% CI error bars, one series per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(ci: dict | None, nd: int = 2) -> str:
    if not ci or ci.get("mean") is None or math.isnan(ci["mean"]):
        return "-"
    return f"{ci['mean']:.{nd}f} [{ci['ci_low']:.{nd}f}, {ci['ci_high']:.{nd}f}]"


def markdown(summary: dict, figure: str) -> str:
    ref = summary["reference_depth"]
    lat = summary.get("latency", {})
    t = lat.get("teacher", {})
    out = ["# Studies", "", "## Compression frontier (issue 15)", "",
           f"Students of each depth, with and without L_af, at the headline budget; seeds {summary['seeds']} "
           "(per-image values averaged over seeds; mean and BCa 95% CI over test images). Latency: "
           f"median ms, batch {lat.get('batch_size')}, {lat.get('device')} ({lat.get('dtype')}, "
           f"{lat.get('threads')} threads), untrained students (cost depends on shape only); teacher "
           f"{t.get('controlnet_ms', float('nan')):.2f} ms ControlNet, {t.get('step_ms', float('nan')):.2f} ms step.", "",
           f"![frontier]({figure})", "",
           "| depth | arm | PSNR | SSIM | PSNR hole | SSIM hole | agree PSNR | ControlNet ms | step ms | step speedup |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["depths"].values():
        L = r.get("latency", {})
        for name in ("af", "no_af"):
            if name not in r:
                continue
            a = r[name]
            out.append(f"| {r['depth']} | {name} | {_fmt(a['psnr'])} | {_fmt(a['ssim'], 3)} | {_fmt(a['psnr_masked'])} "
                       f"| {_fmt(a['ssim_masked'], 3)} | {_fmt(a['agree_psnr'])} | {L.get('controlnet_ms', float('nan')):.2f} "
                       f"| {L.get('step_ms', float('nan')):.2f} | {L.get('step_speedup', float('nan')):.2f}x |")
    out += ["", "Paired difference with L_af minus without, per depth (dB; BCa 95% CI over images):", "",
            "| depth | PSNR | PSNR hole |", "|---|---|---|"]
    for r in summary["depths"].values():
        if "af_minus_no_af" in r:
            dd = r["af_minus_no_af"]
            out.append(f"| {r['depth']} | {_fmt(dd['psnr'])} | {_fmt(dd['psnr_masked'])} |")
    out += ["", f"**Knee** (rule: {summary['knee_rule']}; reference depth {ref}):", ""]
    for name, k in summary["knee"].items():
        if k["depth"] is None:
            out.append(f"- {name}: none")
        else:
            ms = f", {k['step_ms']:.2f} ms per step" if k.get("step_ms") else ""
            out.append(f"- {name}: **{k['depth']} layers**{ms}")
    return "\n".join(out) + "\n"
