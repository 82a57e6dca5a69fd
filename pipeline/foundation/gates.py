"""The tiny world's gate: on the test split, the teacher must inpaint clearly better than the backbone
alone (no control residuals). If it does not, the world is too weak to distil from."""

from __future__ import annotations

from pathlib import Path

from diffusers import SD3ControlNetModel

from pipeline.config import Config
from pipeline.evaluation.quality import psnr, ssim
from pipeline.evaluation.sampler import inpaint_all
from pipeline.foundation.data import pixels, scenes
from pipeline.foundation.teacher import TEACHER_CONVENTION
from pipeline.models.world import load_foundation

class GateFailed(RuntimeError):
    pass


def score(pred, target, hole) -> dict:
    return {
        "psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean()),
        "psnr_masked": float(psnr(pred, target, hole).mean()), "ssim_masked": float(ssim(pred, target, hole).mean()),
    }


def teacher_gate(cfg: Config, scenes_dir: Path, foundation_dir: Path, teacher_dir: Path) -> dict:
    pipe = load_foundation(foundation_dir)
    teacher = SD3ControlNetModel.from_pretrained(teacher_dir).eval()
    df = scenes(scenes_dir, ("test",)).head(cfg.evaluate.num_images)
    images, masks = pixels(df, cfg.data.image_size)
    kw = dict(num_inference_steps=cfg.evaluate.num_inference_steps, guidance_scale=cfg.evaluate.guidance_scale,
              conditioning_scale=cfg.evaluate.conditioning_scale, seed=cfg.evaluate.seed,
              max_sequence_length=cfg.text.max_sequence_length, batch_size=cfg.evaluate.batch_size)
    prompts = list(df["local_prompt"])
    out = {"n_images": len(df)}
    for name, cn in (("teacher", teacher), ("backbone_only", None)):
        pred = inpaint_all(pipe, cn, TEACHER_CONVENTION, images, masks, prompts, **kw)
        out.update({f"{name}_{k}": v for k, v in score(pred, images, masks).items()})
    out["teacher_gain_psnr_db"] = out["teacher_psnr"] - out["backbone_only_psnr"]
    need = cfg.teacher.gate_min_gain_db
    out["required_gain_db"] = need
    out["passed"] = need is None or bool(out["teacher_gain_psnr_db"] >= need
                                         and out["teacher_psnr_masked"] > out["backbone_only_psnr_masked"])
    return out
