"""reports/report.md from the metrics files the pipeline wrote, and metrics/report.json with every figure
the report derives (paper reference figures, means and standard deviations, gaps, evaluation settings).

Every number in report.md is read from a file under metrics/ (tests/test_report.py checks it): the
report computes nothing it does not first write to metrics/report.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


from pipeline.config import Config
from pipeline.distill.ablation import run_name
from pipeline.evaluation.study import study
from pipeline.metrics_io import write_json

# REFINE-CONTROL (arXiv 2509.22139): SD3-medium backbone, 1024 px, 130k + 130k training images.
PAPER = {
    "teacher_psnr": 19.71, "teacher_ssim": 0.7535,
    "student_psnr": 19.25, "student_ssim": 0.7505,
    "wo_af_psnr": 19.17, "wo_mask_psnr": 18.98, "single_stage_psnr": 18.81,
}
PAPER_ROWS = [  # (label, paper key prefix, ours: ("eval", model) or ("ablation", variant))
    ("Teacher", "teacher", ("eval", "teacher")),
    ("Student, two-stage, full loss", "student", ("eval", "student")),
    ("Student, two-stage, full loss (mean over seeds)", None, ("ablation", "full")),
    ("w/o L_af (feature alignment)", "wo_af", ("ablation", "wo_af")),
    ("w/o mask weighting (alpha 0.5)", "wo_mask", ("ablation", "wo_mask")),
    ("Single stage (first stage only)", "single_stage", ("ablation", "single_stage")),
    ("From scratch (L_task only)", None, ("ablation", "from_scratch")),
    ("Backbone alone (no control)", None, ("eval", "backbone_only")),
]
EVAL_ORDER = ("teacher", "backbone_only", "student_stage1", "student")
ABLATION_KEYS = ("psnr", "ssim", "psnr_masked", "ssim_masked", "psnr_unmasked", "agree_psnr", "agree_ssim")



def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def collect(cfg: Config, metrics: Path) -> dict:
    """The metrics files the report reads. Ablation runs are the ones params ask for (stale files of an
    earlier, larger matrix are ignored); those not yet run are listed as missing."""
    metrics = Path(metrics)
    ab = cfg.ablations
    runs, missing = {}, []
    for variant, seed in ab.runs():
        m = _read(metrics / "ablations" / f"{run_name(variant, seed)}.json")
        if m is None:
            missing.append(run_name(variant, seed))
        else:
            runs.setdefault(variant, []).append(m)
    return {
        "eval": {n: m for n in EVAL_ORDER if (m := _read(metrics / "eval" / f"{n}.json")) is not None},
        "ablations": runs, "missing_ablations": missing,
        "benchmark": _read(metrics / "benchmark.json"),
        "step_benchmark": _read(metrics / "step_benchmark.json"),
        "pseudo_labeller": _read(metrics / "pseudo_labeller.json"),
        "distill": {p.stem: _read(p) for p in sorted((metrics / "distill").glob("*.json"))},
        "study": study(ab, metrics / "per_image"),
    }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def summarize(cfg: Config, c: dict) -> dict:
    """Everything the report derives, as one metrics file (metrics/report.json)."""
    ablations = {}
    for variant, ms in c["ablations"].items():
        row = {"n_seeds": len(ms), "controlnet_params": ms[0].get("controlnet_params"),
               "controlnet_layers": ms[0].get("controlnet_layers"), "total_steps": ms[0].get("total_steps")}
        for k in ABLATION_KEYS:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([m.get(k) for m in ms])
        ablations[variant] = row
    full = ablations.get("full", {}).get("psnr_mean")
    for row in ablations.values():
        row["psnr_delta_vs_full"] = None if full is None or row["psnr_mean"] is None else row["psnr_mean"] - full
    ev = c["eval"]
    ours = {}
    for name, m in ev.items():
        ours[f"{name}_psnr"], ours[f"{name}_ssim"] = m["psnr"], m["ssim"]
    if "teacher" in ev and "student" in ev:
        t, s = ev["teacher"], ev["student"]
        ours["student_minus_teacher_psnr"] = s["psnr"] - t["psnr"]
        ours["student_minus_teacher_ssim"] = s["ssim"] - t["ssim"]
        if "backbone_only" in ev and t["psnr"] != ev["backbone_only"]["psnr"]:
            b = ev["backbone_only"]["psnr"]
            ours["teacher_gain_recovered"] = (s["psnr"] - b) / (t["psnr"] - b)
    paper = {**PAPER, "student_minus_teacher_psnr": PAPER["student_psnr"] - PAPER["teacher_psnr"],
             "student_minus_teacher_ssim": PAPER["student_ssim"] - PAPER["teacher_ssim"]}
    e = cfg.evaluate
    return {
        "paper_sd3_1024px": paper, "ours": ours, "ablations": ablations, "study": c["study"],
        "missing_ablation_runs": len(c["missing_ablations"]),
        "settings": {"num_inference_steps": e.num_inference_steps, "guidance_scale": e.guidance_scale,
                     "conditioning_scale": e.conditioning_scale, "eval_seed": e.seed,
                     "student_stage1_steps": cfg.distill.stage1.train.steps,
                     "student_stage2_steps": cfg.distill.stage2.train.steps,
                     "batch_size": cfg.distill.stage1.train.batch_size},
    }


def headline(summary: dict) -> dict:
    """The few figures `dvc metrics show` / `dvc exp show` carry (the pipeline's only DVC metrics file):
    quality of each evaluated model, the student - teacher gap, and each ablation's PSNR difference from
    `full`. Timings, per-seed and per-round figures stay in the other files under metrics/."""
    st = summary["study"]
    gap = st.get("gap_full_minus_teacher", {}).get("psnr")
    return {**summary["ours"],
            **({"full_minus_teacher_psnr": gap["mean"], "full_minus_teacher_psnr_ci_low": gap["ci_low"],
                "full_minus_teacher_psnr_ci_high": gap["ci_high"]} if gap else {}),
            **{f"ablation_{v}_psnr_vs_full": row["vs_full"]["psnr"]["mean"]
               for v, row in st["variants"].items() if "vs_full" in row}}


# ---------------------------------------------------------------------------------------------- markdown

NA = "n/a"


def f(x, d: int = 2, sign: bool = False) -> str:
    if x is None:
        return NA
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int) and d == 0:
        return str(x)
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def sci(x) -> str:
    return NA if x is None else f"{x:.3e}"


def pm(mean, std, d: int) -> str:
    if mean is None:
        return NA
    return f(mean, d) if std is None else f"{f(mean, d)} ± {f(std, d)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _headline(summary: dict, c: dict) -> str:
    paper, abl, ev = summary["paper_sd3_1024px"], summary["ablations"], c["eval"]
    rows = []
    for label, pkey, (kind, name) in PAPER_ROWS:
        p_psnr = paper.get(f"{pkey}_psnr") if pkey else None
        p_ssim = paper.get(f"{pkey}_ssim") if pkey else None
        if kind == "eval":
            m = ev.get(name)
            ours_psnr, ours_ssim = (m["psnr"], m["ssim"]) if m else (None, None)
            src = f"`metrics/eval/{name}.json`"
            o_psnr, o_ssim = f(ours_psnr, 2), f(ours_ssim, 4)
        else:
            a = abl.get(name)
            o_psnr = pm(a["psnr_mean"], a["psnr_std"], 2) if a else NA
            o_ssim = pm(a["ssim_mean"], a["ssim_std"], 4) if a else NA
            src = f"`metrics/ablations/{name}-s*.json`"
        rows.append([label, f(p_psnr, 2), f(p_ssim, 4), o_psnr, o_ssim, src])
    o = summary["ours"]
    rows.append(["Student minus teacher", f(paper["student_minus_teacher_psnr"], 2, True),
                 f(paper["student_minus_teacher_ssim"], 4, True), f(o.get("student_minus_teacher_psnr"), 2, True),
                 f(o.get("student_minus_teacher_ssim"), 4, True), "`metrics/report.json`"])
    return table(["Model", "Paper PSNR", "Paper SSIM", "Ours PSNR", "Ours SSIM", "Ours: source"], rows)


def _optional(m: dict, k: str) -> str:
    v = m.get(k)
    return f(v, 4) if v is not None else "not computed"


def _results(c: dict) -> str:
    rows = []
    for name, m in c["eval"].items():
        rows.append([name, f(m.get("controlnet_layers"), 0), f(m["psnr"]), f(m["ssim"], 4), f(m["psnr_masked"]),
                     f(m["ssim_masked"], 4), f(m["psnr_unmasked"]), f(m["ssim_unmasked"], 4),
                     f(m.get("agree_psnr")), f(m.get("agree_ssim"), 4),
                     _optional(m, "lpips"), _optional(m, "fid"), _optional(m, "cmmd")])
    return table(["Model", "Layers", "PSNR", "SSIM", "PSNR hole", "SSIM hole", "PSNR outside", "SSIM outside",
                  "PSNR vs teacher", "SSIM vs teacher", "LPIPS", "FID", "CMMD"], rows)


def _not_computed(c: dict) -> str:
    reasons = {}
    for m in c["eval"].values():
        for k, why in (m.get("not_computed") or {}).items():
            reasons.setdefault(k, why)
    if not reasons:
        return ""
    return "Not computed (no local weights; these metrics are never estimated):\n\n" + "\n".join(
        f"- {k.upper()}: `{why}`" for k, why in sorted(reasons.items()))


def ci(d: dict | None, digits: int = 2) -> str:
    if not d:
        return NA
    return f"{f(d['mean'], digits, True)} [{f(d['ci_low'], digits, True)}, {f(d['ci_high'], digits, True)}]"


def _ablation_table(summary: dict, cfg: Config) -> str:
    ab, st = cfg.ablations, summary["study"]["variants"]
    rows = []
    for variant in [*ab.headline, *ab.others]:
        a, s = summary["ablations"].get(variant), st.get(variant)
        if a is None or s is None:
            rows.append([variant, "not run", *[NA] * 7])
            continue
        vs = s.get("vs_full", {})
        rows.append([variant, f(s["n_seeds"], 0), f(a["total_steps"], 0),
                     f"{f(s['psnr_mean'])} [{f(s['psnr_ci']['ci_low'])}, {f(s['psnr_ci']['ci_high'])}]",
                     f(a["psnr_std"]), f(s["ssim_mean"], 4), f(s["psnr_masked_mean"]),
                     ci(vs.get("psnr")) if vs else "reference", ci(vs.get("psnr_masked")) if vs else "reference"])
    return table(["Variant", "Seeds", "Steps", "PSNR [CI]", "Seed sd", "SSIM", "PSNR hole",
                  "PSNR vs full [CI]", "Hole PSNR vs full [CI]"], rows)


def _orderings(summary: dict) -> str:
    paper = summary["paper_sd3_1024px"]
    rows = []
    for o in summary["study"]["orderings"]:
        pa, pb = paper.get(f"{o['better'] if o['better'] != 'full' else 'student'}_psnr"), paper.get(f"{o['worse']}_psnr")
        rows.append([f"{o['better']} > {o['worse']}", f(None if pa is None or pb is None else pa - pb, 2, True),
                     ci(o["psnr"]), ci(o["psnr_masked"]), f"**{o['verdict']}**"])
    if not rows:
        return ""
    return table(["Paper's ordering", "Paper PSNR difference", "Ours: PSNR difference [CI]",
                  "Ours: hole PSNR difference [CI]", "Verdict"], rows)


def _gap(summary: dict) -> str:
    g = summary["study"].get("gap_full_minus_teacher")
    if not g:
        return ""
    return (f"Student (full, mean over its seeds) minus teacher, paired per test image: PSNR {ci(g['psnr'])} dB, "
            f"hole PSNR {ci(g['psnr_masked'])} dB (paper: {f(summary['paper_sd3_1024px']['student_minus_teacher_psnr'], 2, True)} dB).")


def _efficiency(b: dict | None) -> str:
    if not b:
        return "The benchmark has not run (`metrics/benchmark.json` is missing)."
    rows = []
    order = sorted(b["models"].items(), key=lambda kv: (kv[0] != "teacher", kv[0] != "student",
                                                        -kv[1]["controlnet_layers"]))
    for name, m in order:
        rows.append([name, f(m["controlnet_layers"], 0), f(m["controlnet_params"], 0), sci(m["controlnet_flops"]),
                     f(m["controlnet_ms"]), f(m["controlnet_speedup"]), f(m["controlnet_speedup_ideal"]),
                     sci(m["step_flops"]), f(m["step_ms"]), f(m["step_speedup"]), f(m["step_speedup_ideal"]),
                     f(m["controlnet_peak_mb"]), f(m["step_peak_mb"])])
    bb = b["backbone"]
    rows.append([f"backbone alone ({f(bb['params'], 0)} params)", NA, NA, NA, NA, NA, NA, sci(bb["step_flops"]),
                 f(bb["step_ms"]), NA, NA, NA, f(bb.get("step_peak_mb"))])
    return table(["Model", "Layers", "ControlNet params", "ControlNet FLOPs", "ControlNet ms", "Speedup",
                  "Ideal (FLOP ratio)", "Step FLOPs", "Step ms", "Step speedup", "Step ideal",
                  "ControlNet peak MiB", "Step peak MiB"], rows)


def _pseudo_labeller(p: dict | None) -> str:
    if not p or not p.get("used"):
        return ("The unlabelled split is not captioned by the pseudo-labeller in this profile "
                "(`caption.unlabelled_backend`)." if p else "")
    v = p["val"]
    rows = [[reading, f(v[f"{reading}_exact_match"], 3), f(v[f"majority_{reading}_exact_match"], 3),
             *(f(v[f"{reading}_accuracy"].get(k), 3) for k in ("background", "colors", "shapes", "count"))]
            for reading in ("local", "global")]
    return ("Stage 2's local prompts come from the pseudo-labeller (trained on the labelled split only; "
            "`metrics/pseudo_labeller.json`), scored on the val split against the annotations:\n\n"
            + table(["Prompt", "Exact match", "Commonest-prompt baseline", "Background", "Colours", "Shapes",
                     "Count"], rows))


def _step_benchmark(s: dict | None) -> str:
    if not s:
        return ""
    rows = [["distillation step (teacher forward + student)", f(s["distill_step_ms"], 1), sci(s["distill_flops"]),
             f(s["distill_gflops_per_s"], 1), f(s["distill_fraction_of_ceiling"], 3)],
            ["plain ControlNet step (train_controlnet_sd3.py)", f(s["plain_step_ms"], 1), sci(s["plain_flops"]),
             f(s["plain_gflops_per_s"], 1), f(s["plain_fraction_of_ceiling"], 3)]]
    c = s.get("compile") or {}
    compiled = (f"torch.compile (`{', '.join(c.get('modules') or [])}`): steady-state speedup "
                f"{f(c.get('speedup'))}, compile {f(c.get('compile_seconds'), 1)} s, break-even after "
                f"{f(c.get('break_even_steps'), 0)} steps." if c.get("speedup") is not None
                else f"torch.compile: not measured (`{c.get('error', 'no figures')}`).")
    return (f"Where a distillation step's time goes (`metrics/step_benchmark.json`; {f(s['threads'], 0)} thread, "
            f"batch {f(s['batch_size'], 0)}): time ratio {f(s['time_ratio'], 3)} against a FLOP ratio of "
            f"{f(s['flop_ratio'], 3)}; ceiling: a plain matmul of the model's width at "
            f"{f(s['ceiling_gflops_per_s'], 1)} GFLOP/s.\n\n"
            + table(["Step", "ms", "FLOPs", "GFLOP/s", "Share of the matmul ceiling"], rows) + "\n\n" + compiled)


def _throughput(c: dict) -> str:
    rows = []
    for stage, m in c["distill"].items():
        if m:
            rows.append([stage, f(m.get(f"{stage}_steps"), 0), f(m.get(f"{stage}_samples_per_s"), 2),
                         f(m.get(f"{stage}_train_seconds"), 1)])
    if not rows:
        return "No distillation metrics (`metrics/distill/*.json`) yet."
    return table(["Stage", "Steps", "Samples/s", "Seconds"], rows)


def render(cfg: Config, summary: dict, c: dict, figures: dict[str, str]) -> str:
    rc = cfg.report
    s = summary["settings"]
    b = c["benchmark"]
    eval_n = next(iter(c["eval"].values()))["n_images"] if c["eval"] else None
    parts = [
        f"# {rc.title}",
        "Generated by the `report` stage from the metrics files under `metrics/` (each table names its source; "
        "derived figures such as means, standard deviations and gaps are in `metrics/report.json`). "
        "**The paper's figures are REFINE-CONTROL's SD3-medium results at 1024px; ours come from this "
        "pipeline's run (the embedded tiny world in the default profile).** Absolute values are not comparable "
        "across the two; compare the orderings and the student-teacher gaps.",
        "## Evaluation settings",
        table(["Setting", "Value"], [
            ["Test images", f(eval_n, 0)],
            ["Denoising steps", f(s["num_inference_steps"], 0)], ["Guidance scale (CFG)", f(s["guidance_scale"], 1)],
            ["Conditioning scale", f(s["conditioning_scale"], 1)],
            ["Noise seed of test image i (same for every model)", f"{f(s['eval_seed'], 0)} + i"],
            ["Student steps (first stage, second stage), batch; every ablation variant the same",
             f"{f(s['student_stage1_steps'], 0)}, {f(s['student_stage2_steps'], 0)}, {f(s['batch_size'], 0)}"],
        ]),
        "## Paper vs ours (PSNR, SSIM on the whole image)",
        "Ablation rows are means ± standard deviation over seeds, each variant at the student's budget.",
        _headline(summary, c),
        "## Results on the test split",
        "Hole = the masked region (what is repainted); outside = the unmasked region. *vs teacher*: the model's "
        "output against the teacher's at the same seed (agreement).",
        _results(c),
        _not_computed(c),
        "## Ablation study",
        "Every variant trains the student's steps at its batch size and is evaluated like it, on the same test "
        "images with the same noise per image. PSNR: mean over images of the per-image PSNR averaged over the "
        "variant's seeds, with a bootstrap CI (level `0.95`, BCa) over images; *vs full*: the paired per-image difference from "
        "`full` (seed-averaged) and its bootstrap CI (`metrics/study.json`).",
        _ablation_table(summary, cfg),
        "Verdict per ordering: *reproduced* when the CI of the paired difference excludes zero in the paper's "
        "direction, *reversed* when it excludes zero in the other, otherwise *not significant*.",
        _orderings(summary),
        _gap(summary),
    ]
    if c["missing_ablations"]:
        parts.append("Not run yet: " + ", ".join(f"`{r}`" for r in c["missing_ablations"]))
    parts += [
        "## Efficiency",
        (f"One process, device `{b['device']}`, batch `{b['batch_size']}`, median of `{b['repeats']}` repeats "
         f"after `{b['warmup']}` warm-up calls. Speedup: the teacher's latency over the model's; ideal: the "
         f"teacher's FLOPs over the model's. Peak memory: `{b['memory_method']}`." if b else ""),
        _efficiency(b),
        _step_benchmark(c["step_benchmark"]),
        "Training throughput (from the trainers' metrics):",
        _throughput(c),
        "## Pseudo-labeller",
        _pseudo_labeller(c["pseudo_labeller"]),
        # a pointer, not a dep: the studies run outside `make run` (studies/dvc.yaml) and write their own page
        "## Studies beyond the paper",
        "The compression frontier (students of every depth, with and without L_af), prompt quality in stage 2 and the "
        "edges condition, each with its figures and answer: [studies.md](studies.md) (`make studies`).",
        "## Figures",
    ]
    for title, path in figures.items():
        parts.append(f"### {title}\n\n![{title}]({path})")
    return "\n\n".join(p for p in parts if p) + "\n"


def build_report(cfg: Config, metrics: Path, out_md: Path, figures_dir: Path, samples_dir: Path,
                 dvclive_dir: Path) -> dict:
    from pipeline.reporting import figures as figs

    c = collect(cfg, metrics)
    summary = summarize(cfg, c)
    write_json(Path(metrics) / "report.json", {k: v for k, v in summary.items() if k != "study"})
    write_json(Path(metrics) / "study.json", summary["study"])
    write_json(Path(metrics) / "headline.json", headline(summary))
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    rel = lambda p: Path(p).resolve().relative_to(Path(out_md).resolve().parent).as_posix()  # noqa: E731
    if (p := figs.sample_grid(samples_dir, figures_dir / "samples.png")):
        made["Samples: masked input, mask, ground truth, teacher, students"] = rel(p)
    if (p := figs.frontier(c, summary, figures_dir / "frontier.png")):
        made["PSNR vs ControlNet parameters"] = rel(p)
    if (p := figs.loss_curves(dvclive_dir, cfg.report.loss_stages, figures_dir / "loss_curves.png")):
        made["Distillation loss curves"] = rel(p)
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    write_frontier_csv(c, summary, Path(out_md).parent / "frontier.csv")
    Path(out_md).write_text(render(cfg, summary, c, made))
    return summary


def write_frontier_csv(c: dict, summary: dict, out: Path) -> None:
    """model, controlnet_params, psnr, ssim: the frontier as data for `dvc plots show/diff` (scatter)."""
    import csv

    rows = [(n, m.get("controlnet_params"), m["psnr"], m["ssim"]) for n, m in c["eval"].items()]
    rows += [(f"ablation:{v}", a["controlnet_params"], a["psnr_mean"], a["ssim_mean"])
             for v, a in summary["ablations"].items()]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "controlnet_params", "psnr", "ssim"])
        w.writerows(rows)
