"""Inpainting evaluation on the test split: the teacher, the backbone alone, and every student.

Every model inpaints the same first ``evaluate.num_images`` test images with the same initial noise
(``evaluate.seed``), steps, CFG and conditioning scale, through pipeline.evaluation.sampler (the stock
StableDiffusion3ControlNetInpaintingPipeline's conventions; tests/test_sampler.py). Metrics per model:

- ``psnr``/``ssim`` on the whole image, ``*_masked`` on the hole, ``*_unmasked`` outside it (torchmetrics);
- ``agree_psnr``/``agree_ssim``: the model's output against the teacher's at the same seed (students and
  the no-control baseline);
- ``lpips``/``fid``/``cmmd``: only when their weights exist locally (params ``evaluate.*_weights``);
  otherwise null, with the reason under ``not_computed``. Never estimated.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from pipeline.config import Config, EvaluateConfig
from pipeline.data.images import read_images, read_masks
from pipeline.evaluation.benchmark import n_params
from pipeline.evaluation.quality import agreement, optional_metrics, quality
from pipeline.evaluation.sampler import inpaint_all
from pipeline.models import inpaint
from pipeline.models.mapping import TEACHER, convention_of
from pipeline.runtime import runtime
from pipeline.timing import stopwatch

BACKBONE_ONLY = "backbone_only"



# ---------------------------------------------------------------------------------------------- data


def test_rows(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows of the test split, in manifest order (fixed by the data stages)."""
    test = df[df["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError("evaluate: the manifest has no test rows")
    return test.head(n)


def load_pixels(df: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return read_images(df["image"], size), read_masks(df["mask"], size)


# ---------------------------------------------------------------------------------------------- models


def sample(cfg: Config, pipe, controlnet, name: str, images, masks, prompts) -> torch.Tensor:
    e = cfg.evaluate
    return inpaint_all(pipe, controlnet, convention_of(name), images, masks, prompts, batch_size=e.batch_size,
                       seed=e.seed, num_inference_steps=e.num_inference_steps, guidance_scale=e.guidance_scale,
                       conditioning_scale=e.conditioning_scale, max_sequence_length=cfg.text.max_sequence_length,
                       micro_batch=cfg.runtime.sample_batch_size)


# ---------------------------------------------------------------------------------------------- metrics


def score(name: str, pred, images, hole, reference, ec: EvaluateConfig) -> dict:
    m = {"n_images": len(pred), **quality(pred, images, hole)}
    if reference is not None and name != TEACHER:
        m.update(agreement(pred, reference))
    values, reasons = optional_metrics(ec, pred, images)
    m.update(values)
    m["not_computed"] = reasons
    return m


# ---------------------------------------------------------------------------------------------- runs


def evaluate_models(cfg: Config, pipe, models: dict[str, str | Path | None], df: pd.DataFrame,
                    prompt: str = "local_prompt") -> tuple[dict[str, dict], dict[str, torch.Tensor], dict]:
    """Inpaint ``df`` (rows with image, mask, prompts) with each model; ``models``: name -> ControlNet
    folder, or None for the backbone alone. The teacher (when listed) is sampled first and is every other
    model's agreement reference. Returns (metrics per model, outputs per model, inputs)."""
    ec, rt = cfg.evaluate, runtime(cfg)  # the ControlNets join ``pipe`` (loaded by rt.load_foundation)
    images, masks = load_pixels(df, cfg.data.image_size)
    hole = inpaint.binarise(masks)
    prompts = list(df[prompt])
    order = sorted(models, key=lambda n: n != TEACHER)
    outputs, metrics = {}, {}
    for name in order:
        cn = None if models[name] is None else rt.load_controlnet(models[name])
        with stopwatch(rt.device) as t:
            outputs[name] = sample(cfg, pipe, cn, name, images, masks, prompts)
        metrics[name] = score(name, outputs[name], images, hole, outputs.get(TEACHER), ec)
        metrics[name].update(controlnet_params=n_params(cn),
                             controlnet_layers=0 if cn is None else int(cn.config.num_layers),
                             sampling_seconds=t.seconds)
    return metrics, outputs, {"images": images, "masks": hole}


def to_png(x: torch.Tensor, path: Path) -> None:
    """One image in [-1, 1] (3, H, W) or a mask in [0, 1] (1, H, W) -> PNG."""
    arr = x.detach().float()
    arr = (arr + 1) / 2 if arr.shape[0] == 3 else arr
    arr = (arr.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def save_samples(outputs: dict[str, torch.Tensor], inputs: dict, n: int, out: Path) -> list[str]:
    """PNG files ``<i>_<column>.png`` for the report's grid: masked input, mask, ground truth, each model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    images, masks = inputs["images"], inputs["masks"]
    masked = inpaint.masked_image(images, masks)
    written = []
    for i in range(min(n, len(images))):
        cols = {"masked_input": masked[i], "mask": masks[i], "ground_truth": images[i],
                **{k: v[i] for k, v in outputs.items()}}
        for col, x in cols.items():
            to_png(x, out / f"{i:02d}_{col}.png")
            written.append(f"{i:02d}_{col}.png")
    return written


def sample_columns(models: list[str]) -> list[str]:
    return ["masked_input", "mask", "ground_truth", *models]
