"""The edges study's statistics and report section (issue 15, item 3), from per-image tables only:

- edges (metrics/studies/per_image/edges): teacher.csv, backbone_only.csv, student-s<seed>.csv;
- inpainting, beside it (the main pipeline's committed tables, metrics/per_image): teacher.csv,
  backbone_only.csv, ablations/full-s<seed>.csv (full = the method; seed-averaged, the inpainting student).

Per condition: each model's whole-image PSNR/SSIM (the student's seed-averaged per image) with its mean and
BCa 95% CI over test images, the student's agreement with its teacher, and the paired per-image gap student -
teacher (pipeline.evaluation.stats.paired_difference, as pipeline.evaluation.study's gap). Both conditions are
evaluated on the same test images with the same per-image noise, so the gaps are paired too: their per-image
difference (edges gap - inpainting gap) gets a CI as well. Hole / outside-hole metrics do not exist under
edges (no hole: NaN columns) and are never read or reported here, for either condition (the comparison is on
what both have).

Kept apart from pipeline.studies.edges (the training stages' code): editing the report reruns only the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from pipeline.config import Config
from pipeline.evaluation.stats import ci_side, paired_difference
from pipeline.studies.report_format import DPI, ci_text, dig, has_ci
from pipeline.studies.report_stats import mean_ci, paired, read_table, seed_average

KEYS = ("psnr", "ssim")                    # whole image: what both conditions have
AGREE = ("agree_psnr", "agree_ssim")       # the student's agreement with its own teacher
CONDITIONS = ("inpaint", "edges")
LABELS = {"inpaint": "inpainting", "edges": "edges"}


def _table(path: Path, keys: Sequence[str]) -> pd.DataFrame | None:
    """``path``'s per-image ``keys``, every value finite; None when the file does not exist (yet)."""
    return read_table(path, keys, finite=True) if Path(path).exists() else None


def condition_summary(teacher: Path, backbone: Path, students: dict[int, Path]) -> dict:
    """One condition's models and its gap from per-image tables (missing files: that entry is None).
    Also returns the per-image gap (student - teacher, seed-averaged) under ``_gap`` for pairing."""
    t, b = _table(teacher, KEYS), _table(backbone, KEYS)
    st, found = seed_average(students, lambda p: _table(p, (*KEYS, *AGREE)))
    out: dict = {
        "teacher": None if t is None else {"n_images": len(t), **{k: mean_ci(t[k]) for k in KEYS}},
        "backbone_only": None if b is None else {"n_images": len(b), **{k: mean_ci(b[k]) for k in KEYS}},
        "student": None if st is None else {"seeds": found, "n_seeds": len(found), "n_images": len(st),
                                            **{k: mean_ci(st[k]) for k in (*KEYS, *AGREE)}},
        "gap_student_minus_teacher": None, "teacher_minus_backbone": None, "_gap": None,
    }
    if st is not None and t is not None:
        out["gap_student_minus_teacher"] = {k: paired(st, t, k, f"{teacher} vs students") for k in KEYS}
        out["_gap"] = st[list(KEYS)] - t.loc[st.index, list(KEYS)]
    if t is not None and b is not None:
        out["teacher_minus_backbone"] = {k: paired(t, b, k, f"{teacher} vs {backbone}") for k in KEYS}
    return out


def summarise(cfg: Config, seeds: Sequence[int], *, edges_per_image: Path | None = None,
              inpaint_per_image: Path | None = None, inpaint_seeds: Sequence[int] | None = None) -> dict:
    """metrics/studies/edges.json. ``cfg``: params.yaml's (inpaint) Config, for the loss weights reported;
    ``seeds``: studies/params.yaml edges.seeds; ``inpaint_seeds``: the seeds of the main study's ``full``
    to average (default: ablations.headline_seeds). Paths default to the pipeline's
    (pipeline.studies.EDGES_PER_IMAGE, pipeline.paths.PER_IMAGE)."""
    from pipeline import paths as P
    from pipeline import studies as S
    from pipeline.studies.edges import student_name

    e = Path(edges_per_image if edges_per_image is not None else S.EDGES_PER_IMAGE)
    i = Path(inpaint_per_image if inpaint_per_image is not None else P.PER_IMAGE)
    iseeds = list(cfg.ablations.headline_seeds if inpaint_seeds is None else inpaint_seeds)
    conds = {
        "inpaint": condition_summary(i / "teacher.csv", i / "backbone_only.csv",
                                     {s: i / "ablations" / f"full-s{s}.csv" for s in iseeds}),
        "edges": condition_summary(e / "teacher.csv", e / "backbone_only.csv",
                                   {s: e / f"{student_name(s)}.csv" for s in seeds}),
    }
    gi, ge = conds["inpaint"].pop("_gap"), conds["edges"].pop("_gap")
    gap_diff = None
    if gi is not None and ge is not None and set(gi.index) == set(ge.index):
        gap_diff = {k: paired_difference(ge[k].to_numpy(), gi.loc[ge.index, k].to_numpy()) for k in KEYS}
    d = cfg.distill
    return {
        "conditions": conds,
        "gap_edges_minus_inpaint": gap_diff,
        "seeds": {"edges": list(seeds), "inpaint": iseeds},
        "student_layers": d.student_layers, "teacher_layers": cfg.teacher.num_layers,
        "loss": {"alpha_inpaint": d.alpha,
                 "task": {"stage1": d.stage1.loss.task, "stage2": d.stage2.loss.task},
                 "distill": {"stage1": d.stage1.loss.distill, "stage2": d.stage2.loss.distill},
                 "af": {"stage1": d.stage1.loss.af, "stage2": d.stage2.loss.af}},
        "metrics": list(KEYS), "not_applicable_under_edges": ["psnr_masked", "ssim_masked", "psnr_unmasked",
                                                              "ssim_unmasked"],
    }


# ------------------------------------------------------------------------------------------- report

# where a CI lies against 0 (pipeline.evaluation.stats.ci_side), in this section's words
EXCLUDES_ZERO = {1: "its CI lies above 0", -1: "its CI lies below 0", 0: "its CI contains 0",
                 None: "its CI could not be computed"}


def markdown(summary: dict) -> str:
    """The "## Edges condition" section of reports/studies.md (ends with a newline)."""
    c = summary["conditions"]
    L = summary["loss"]
    out = ["## Edges condition (issue 15)", "",
           f"The method under another spatial condition: the control image is the scene's Sobel edge map "
           f"(16 control channels, no mask channel). The edges teacher ({summary['teacher_layers']} layers) is "
           f"trained in the study on the same world split; students of {summary['student_layers']} layers are "
           f"distilled from it with the same tri-level loss, both stages, the headline budget, seeds "
           f"{summary['seeds']['edges']}; inpainting beside it: the main pipeline's teacher and its `full` "
           f"student, seeds {summary['seeds']['inpaint']}. Whole-image metrics on the same test images and "
           "per-image noise; per-image values of the students averaged over seeds; mean and BCa 95% CI over "
           "images. Gap = paired per-image student - teacher. Hole metrics are n/a under edges (no hole) and "
           "are left out for both.", "",
           "| condition | teacher PSNR | teacher SSIM | student PSNR | student SSIM | gap PSNR (dB) | gap SSIM "
           "| student agree PSNR | backbone alone PSNR |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in CONDITIONS:
        r = c[name]
        out.append(f"| {LABELS[name]} | {ci_text(dig(r, 'teacher', 'psnr'))} | {ci_text(dig(r, 'teacher', 'ssim'), 3)} "
                   f"| {ci_text(dig(r, 'student', 'psnr'))} | {ci_text(dig(r, 'student', 'ssim'), 3)} "
                   f"| {ci_text(dig(r, 'gap_student_minus_teacher', 'psnr'))} "
                   f"| {ci_text(dig(r, 'gap_student_minus_teacher', 'ssim'), 3)} "
                   f"| {ci_text(dig(r, 'student', 'agree_psnr'))} | {ci_text(dig(r, 'backbone_only', 'psnr'))} |")
    out += ["", f"Weighting: under edges there is no hole, so L_task weighs every latent pixel 1: the plain "
                f"flow-matching MSE, the teacher's own loss (alpha = {L['alpha_inpaint']} weighs inpainting's "
                f"hole vs the rest and plays no part under edges). The terms' weights are params' for both "
                f"conditions: task {L['task']['stage1']} / {L['task']['stage2']}, distill "
                f"{L['distill']['stage1']} / {L['distill']['stage2']}, af {L['af']['stage1']} / "
                f"{L['af']['stage2']} (stage 1 / stage 2).", ""]
    out.append("**Answer.** " + findings(summary))
    return "\n".join(out) + "\n"


def findings(summary: dict) -> str:
    """One paragraph stating only what the figures show (or what is missing)."""
    c = summary["conditions"]
    said = []
    for name in CONDITIONS:
        g = dig(c[name], "gap_student_minus_teacher", "psnr")
        if g is None:
            said.append(f"{LABELS[name].capitalize()}: no student - teacher gap (tables missing).")
            continue
        said.append(f"{LABELS[name].capitalize()}: the student - teacher PSNR gap is {g['mean']:+.2f} dB and "
                    f"{EXCLUDES_ZERO[ci_side(g)]} ({ci_text(g)}, {g['n']} images).")
    ge = dig(c["edges"], "gap_student_minus_teacher", "psnr")
    gi = dig(c["inpaint"], "gap_student_minus_teacher", "psnr")
    if ge is not None and gi is not None:
        bigger = "larger" if abs(ge["mean"]) > abs(gi["mean"]) else "smaller" if abs(ge["mean"]) < abs(gi["mean"]) else "the same"
        said.append(f"In size the edges gap is {bigger} than inpainting's ({abs(ge['mean']):.2f} vs "
                    f"{abs(gi['mean']):.2f} dB).")
    dd = dig(summary.get("gap_edges_minus_inpaint"), "psnr")
    if dd is not None:
        said.append(f"Paired per image, edges gap - inpainting gap = {ci_text(dd)} dB: {EXCLUDES_ZERO[ci_side(dd)]}.")
    tb = dig(c["edges"], "teacher_minus_backbone", "psnr")
    if tb is not None:
        said.append(f"The edges teacher minus the backbone alone: {ci_text(tb)} dB ({EXCLUDES_ZERO[ci_side(tb)]}).")
    tbs = dig(c["edges"], "teacher_minus_backbone", "ssim")
    if tbs is not None:
        said.append(f"In SSIM, the edges teacher minus the backbone alone: {ci_text(tbs, 3)} ({EXCLUDES_ZERO[ci_side(tbs)]}).")
    if ge is not None:
        said.append("Whole-image PSNR/SSIM against the ground truth do not measure how closely an output follows "
                    "the control edges; an edge-fidelity metric is not computed here.")
    return " ".join(said)


def plot(summary: dict, path: Path) -> Path:
    """Whole-image PSNR of teacher, student (seed-averaged) and backbone alone per condition, BCa 95% CI bars."""
    from pipeline.reporting.figures import plt, save

    models = (("teacher", "teacher"), ("student", "student"), ("backbone_only", "backbone alone"))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(models)
    for j, (key, label) in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, name in enumerate(CONDITIONS):
            ci = dig(summary["conditions"][name], key, "psnr")
            if not has_ci(ci):
                continue
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(ci["mean"])
            lo.append(ci["mean"] - ci["ci_low"])
            hi.append(ci["ci_high"] - ci["mean"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(CONDITIONS)), [LABELS[n] for n in CONDITIONS])
    ax.set_ylabel("PSNR, whole image (dB)")
    ax.set_title("Teacher, student and backbone alone per condition")
    ax.legend(fontsize=8)
    return save(fig, path, dpi=DPI)
