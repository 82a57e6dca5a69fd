"""Inpainting evaluation: the teacher, the backbone alone, and every student, on the whole test split.

Every model inpaints the same images with the same initial noise (image i of the split: ``evaluate.seed +
i``, pipeline.evaluation.sampler), steps, CFG and conditioning scale, so two models' per-image results are
paired (pipeline.evaluation.stats). Images are streamed in micro-batches (``runtime.sample_batch_size``):
memory holds a batch, not the split. Per model:

- per image (``Evaluation.per_image``, written to metrics/per_image/<model>.csv): ``psnr``/``ssim`` on the
  whole image, ``*_masked`` on the hole, ``*_unmasked`` outside it; ``agree_psnr``/``agree_ssim`` against
  the teacher's output for the same image and noise, read from the reference folder the teacher's
  evaluation wrote once (data/eval/teacher, PNG per id) and reused by every later evaluation;
- ``summary``: their means, plus ``lpips``/``fid``/``cmmd`` only when their weights exist locally (params
  ``evaluate.*_weights``; those need the whole split's outputs in memory), otherwise null with the reason
  under ``not_computed``. Never estimated.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.atomic import write_dir
from pipeline.config import Config
from pipeline.data.images import read_images, read_masks
from pipeline.evaluation.benchmark import n_params
from pipeline.evaluation.quality import OPTIONAL, optional_metrics, per_image, per_image_agreement, summarise
from pipeline.evaluation.sampler import inpaint_images
from pipeline.models import inpaint
from pipeline.models.mapping import TEACHER, convention_of
from pipeline.runtime import runtime
from pipeline.timing import stopwatch

BACKBONE_ONLY = "backbone_only"
PROMPT_COLUMNS = {"local": "local_prompt", "global": "global_prompt"}


# ---------------------------------------------------------------------------------------------- data


def test_rows(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """The test split in manifest order (fixed by the data stages); its first ``n`` rows when n is set."""
    test = df[df["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError("evaluate: the manifest has no test rows")
    return test if n is None else test.head(n)


def load_pixels(df: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return read_images(df["image"], size), read_masks(df["mask"], size)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Evaluation:
    summary: dict                 # the metrics JSON of one model
    per_image: pd.DataFrame       # id + one column per per-image metric
    samples: torch.Tensor         # its first evaluate.num_samples outputs (the report's grid)


def evaluate_model(cfg: Config, pipe, name: str, controlnet: str | Path | None, df: pd.DataFrame, *,
                   prompt: str = "local_prompt", reference: Path | None = None,
                   write_reference: bool = False) -> Evaluation:
    """Inpaint every row of ``df`` (image, mask, prompt columns, in split order: row i gets noise seed + i)
    with one model (``controlnet``: its folder, None = the backbone alone). ``reference``: the teacher's
    output folder, read for agreement, or written by this model when ``write_reference``."""
    ec, rt = cfg.evaluate, runtime(cfg)
    cn = None if controlnet is None else rt.load_controlnet(controlnet)
    columns: dict[str, list[torch.Tensor]] = {}
    samples, kept = [], {"pred": [], "target": []}
    keep_all = any(getattr(ec, f"{m}_weights") for m in OPTIONAL)  # FID/CMMD compare distributions
    step = cfg.runtime.sample_batch_size
    with stopwatch(rt.device) as clock, write_dir(reference) if write_reference else nullcontext() as ref_out:
        for i in tqdm(range(0, len(df), step), desc=f"evaluate {name}", leave=False):
            rows = df.iloc[i:i + step]
            images, masks = load_pixels(rows, cfg.data.image_size)
            pred = inpaint_images(pipe, cn, convention_of(name), images, masks, list(rows[prompt]),
                                  seeds=[ec.seed + i + k for k in range(len(rows))],
                                  num_inference_steps=ec.num_inference_steps, guidance_scale=ec.guidance_scale,
                                  conditioning_scale=ec.conditioning_scale,
                                  max_sequence_length=cfg.text.max_sequence_length, condition=cfg.condition)
            # condition edges has no hole: its hole / unmasked columns are n/a (pipeline.evaluation.quality)
            got = per_image(pred, images, inpaint.binarise(masks) if cfg.condition == "inpaint" else None)
            if ref_out is not None:
                for rid, x in zip(rows["id"], pred):
                    to_png(x, ref_out / f"{rid}.png")
            elif reference is not None:
                got.update(per_image_agreement(pred, read_images([Path(reference) / f"{r}.png" for r in rows["id"]],
                                                                 cfg.data.image_size)))
            for k, v in got.items():
                columns.setdefault(k, []).append(v.double())
            if (kept := sum(len(s) for s in samples)) < ec.num_samples:
                samples.append(pred[:ec.num_samples - kept])
            if keep_all:
                kept["pred"].append(pred)
                kept["target"].append(images)
    cols = {k: torch.cat(v) for k, v in columns.items()}
    summary = {"n_images": len(df), "prompt": prompt, **summarise(cols)}
    values, reasons = optional_metrics(ec, *(torch.cat(kept[k]) if keep_all else None for k in ("pred", "target")))
    summary.update(values, not_computed=reasons, controlnet_params=n_params(cn),
                   controlnet_layers=0 if cn is None else int(cn.config.num_layers), sampling_seconds=clock.seconds)
    table = pd.DataFrame({"id": list(df["id"]), **{k: v.numpy() for k, v in cols.items()}})
    return Evaluation(summary, table, torch.cat(samples) if samples else torch.empty(0))


def evaluate_models(cfg: Config, pipe, models: dict[str, str | Path | None], df: pd.DataFrame, *,
                    prompt: str = "local_prompt", reference: Path | None = None) -> dict[str, Evaluation]:
    """``evaluate_model`` for each model (name -> ControlNet folder, or None for the backbone alone). With
    ``reference``, a listed teacher is evaluated first and writes it; every other model agrees against it."""
    order = sorted(models, key=lambda n: n != TEACHER)
    return {name: evaluate_model(cfg, pipe, name, models[name], df, prompt=prompt, reference=reference,
                                 write_reference=reference is not None and name == TEACHER)
            for name in order}


def to_png(x: torch.Tensor, path: Path) -> None:
    """One image in [-1, 1] (3, H, W) or a mask in [0, 1] (1, H, W) -> PNG."""
    arr = x.detach().float()
    arr = (arr + 1) / 2 if arr.shape[0] == 3 else arr
    arr = (arr.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def save_samples(outputs: dict[str, torch.Tensor], df: pd.DataFrame, size: int, out: Path) -> list[str]:
    """PNG files ``<i>_<column>.png`` for the report's grid: masked input, mask, ground truth, each model's
    sample (``outputs``: name -> its first images, those of the first rows of ``df``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    n = min(len(v) for v in outputs.values())
    images, masks = load_pixels(df.head(n), size)
    masks = inpaint.binarise(masks)
    masked = inpaint.masked_image(images, masks)
    written = []
    for i in range(n):
        cols = {"masked_input": masked[i], "mask": masks[i], "ground_truth": images[i],
                **{k: v[i] for k, v in outputs.items()}}
        for col, x in cols.items():
            to_png(x, out / f"{i:02d}_{col}.png")
            written.append(f"{i:02d}_{col}.png")
    return written


def sample_columns(models: list[str]) -> list[str]:
    return ["masked_input", "mask", "ground_truth", *models]
