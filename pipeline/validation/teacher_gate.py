"""The tiny world's gate: on the val split (never test: reported numbers only), the teacher must inpaint clearly better than the backbone
alone (no control residuals). If it does not, the world is too weak to distil from.

Under condition edges there is no hole: the hole metrics are n/a (None) and the gate reads the whole
image's PSNR alone."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.evaluation.evaluate import BACKBONE_ONLY, TEACHER, evaluate_models
from pipeline.foundation.data import scenes
from pipeline.runtime import runtime

GATE_KEYS = ("psnr", "ssim", "psnr_masked", "ssim_masked")


def teacher_gate(cfg: Config, scenes_dir: Path, foundation_dir: Path, teacher_dir: Path) -> dict:
    df = scenes(scenes_dir, ("val",))
    evals = evaluate_models(cfg, runtime(cfg).load_foundation(foundation_dir),
                            {TEACHER: teacher_dir, BACKBONE_ONLY: None}, df)
    metrics = {name: ev.summary for name, ev in evals.items()}
    out = {"n_images": len(df)}
    for name in (TEACHER, BACKBONE_ONLY):
        out.update({f"{name}_{k}": metrics[name][k] for k in GATE_KEYS})
    out["teacher_gain_psnr_db"] = out["teacher_psnr"] - out["backbone_only_psnr"]
    need = cfg.teacher.gate_min_gain_db
    out["required_gain_db"] = need
    hole_ok = (cfg.condition != "inpaint"  # edges: no hole to compare in
               or out["teacher_psnr_masked"] > out["backbone_only_psnr_masked"])
    out["passed"] = need is None or bool(out["teacher_gain_psnr_db"] >= need and hole_ok)
    return out
