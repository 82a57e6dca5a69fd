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

Launched on several processes (pipeline.distributed), each inpaints a contiguous run of the micro-batches
and rank 0 merges: the same per-image tables, reference PNGs and samples as one process, byte for byte;
``sampling_seconds`` is then the slowest process's (the wall time of the split's sampling).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.atomic import check_replaceable, write_dir
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


@dataclass
class _Share:
    """What one process computed of a model's evaluation: per-image columns (float64), the grid's samples
    among its rows, its outputs and targets when FID/CMMD need them all (None otherwise), its seconds."""

    columns: dict[str, torch.Tensor]
    samples: torch.Tensor
    pred: torch.Tensor | None
    target: torch.Tensor | None
    seconds: float = 0.0

    @classmethod
    def concat(cls, shares: list["_Share"]) -> "_Share":
        """The shares of consecutive rows, in row order; the slowest process's seconds (the wall time)."""
        def cat(ts):
            ts = [t for t in ts if t is not None and len(t)]
            return torch.cat(ts) if ts else None

        keys = dict.fromkeys(k for s in shares for k in s.columns)
        samples = cat([s.samples for s in shares])
        return cls({k: cat([s.columns.get(k) for s in shares]) for k in keys},
                   torch.empty(0) if samples is None else samples, cat([s.pred for s in shares]),
                   cat([s.target for s in shares]), max(s.seconds for s in shares))


def _inpaint_rows(cfg: Config, pipe, cn, name: str, df: pd.DataFrame, rows: slice, prompt: str,
                  reference: Path | None, ref_out: Path | None) -> _Share:
    """Inpaint rows ``rows`` of ``df`` in micro-batches; row i (its place in ``df``) gets noise seed + i.
    ``ref_out``: write each output there as <id>.png; else with ``reference``, agreement against it."""
    ec, step = cfg.evaluate, cfg.runtime.sample_batch_size
    columns: dict[str, list[torch.Tensor]] = {}
    samples, kept = [], {"pred": [], "target": []}
    keep_all = any(getattr(ec, f"{m}_weights") for m in OPTIONAL)  # FID/CMMD compare distributions
    for i in tqdm(range(rows.start, rows.stop, step), desc=f"evaluate {name}", leave=False):
        batch = df.iloc[i:min(i + step, rows.stop)]
        images, masks = load_pixels(batch, cfg.data.image_size)
        pred = inpaint_images(pipe, cn, convention_of(name), images, masks, list(batch[prompt]),
                              seeds=[ec.seed + i + k for k in range(len(batch))],
                              num_inference_steps=ec.num_inference_steps, guidance_scale=ec.guidance_scale,
                              conditioning_scale=ec.conditioning_scale,
                              max_sequence_length=cfg.text.max_sequence_length, condition=cfg.condition)
        # condition edges has no hole: its hole / unmasked columns are n/a (pipeline.evaluation.quality)
        got = per_image(pred, images, inpaint.binarise(masks) if cfg.condition == "inpaint" else None)
        if ref_out is not None:
            for rid, x in zip(batch["id"], pred):
                to_png(x, ref_out / f"{rid}.png")
        elif reference is not None:
            got.update(per_image_agreement(pred, read_images([Path(reference) / f"{r}.png" for r in batch["id"]],
                                                             cfg.data.image_size)))
        for k, v in got.items():
            columns.setdefault(k, []).append(v.double())
        if i < ec.num_samples:   # the first num_samples rows of df
            samples.append(pred[:ec.num_samples - i])
        if keep_all:
            kept["pred"].append(pred)
            kept["target"].append(images)
    return _Share({k: torch.cat(v) for k, v in columns.items()}, torch.cat(samples) if samples else torch.empty(0),
                  *(torch.cat(kept[k]) if keep_all and kept[k] else None for k in ("pred", "target")))


def evaluate_model(cfg: Config, pipe, name: str, controlnet: str | Path | None, df: pd.DataFrame, *,
                   prompt: str = "local_prompt", reference: Path | None = None,
                   write_reference: bool = False) -> Evaluation | None:
    """Inpaint every row of ``df`` (image, mask, prompt columns, in split order: row i gets noise seed + i)
    with one model (``controlnet``: its folder, None = the backbone alone). ``reference``: the teacher's
    output folder, read for agreement, or written by this model when ``write_reference``.

    Launched on several processes (pipeline.distributed), each inpaints a contiguous run of the
    micro-batches; rank 0 merges the shares (the same per-image values, so the same means) and returns the
    Evaluation, the other ranks None. The reference is whole on every rank when this returns."""
    ec, rt = cfg.evaluate, runtime(cfg)
    w = distributed.connect(rt.device)
    cn = None if controlnet is None else rt.load_controlnet(controlnet)
    rows = w.rows(len(df), cfg.runtime.sample_batch_size)

    def inpaint(ref_out: Path | None) -> _Share:
        return _inpaint_rows(cfg, pipe, cn, name, df, rows, prompt, reference, ref_out)

    with distributed.parts(f"evaluate-{name}", w) as job:
        if job is None:
            with stopwatch(rt.device) as clock, write_dir(reference) if write_reference else nullcontext() as ref_out:
                share = inpaint(ref_out)
            share.seconds = clock.seconds
        else:
            share = _merged(job, inpaint, rt.device, reference if write_reference else None)
    if share is None:
        return None
    summary = {"n_images": len(df), "prompt": prompt, **summarise(share.columns)}
    values, reasons = optional_metrics(ec, share.pred, share.target)
    summary.update(values, not_computed=reasons, controlnet_params=n_params(cn),
                   controlnet_layers=0 if cn is None else int(cn.config.num_layers), sampling_seconds=share.seconds)
    table = pd.DataFrame({"id": list(df["id"]), **{k: v.numpy() for k, v in share.columns.items()}})
    return Evaluation(summary, table, share.samples)


def _merged(job: distributed.Parts, inpaint, device, reference_out: Path | None) -> _Share | None:
    """``inpaint`` (this rank's rows) into its part, its reference PNGs too when it writes ``reference_out``;
    rank 0 merges every part (the reference with write_dir), then every rank waits for the whole reference.
    Returns the merged share on rank 0, None on the others."""
    if reference_out is not None:
        check_replaceable(reference_out)  # every rank: a wrong output path fails before the sampling
        (job.mine / "reference").mkdir()
    with stopwatch(device) as clock:
        share = inpaint(None if reference_out is None else job.mine / "reference")
    share.seconds = clock.seconds
    job.save("share", vars(share))
    dirs = job.gather()
    if reference_out is not None:
        if dirs is not None:
            with write_dir(reference_out) as tmp:
                distributed.copy_files([d / "reference" for d in dirs], tmp)
        distributed.barrier()   # the next model agrees against the whole reference
    return None if dirs is None else _Share.concat([_Share(**s) for s in distributed.load_parts(dirs, "share")])


def evaluate_models(cfg: Config, pipe, models: dict[str, str | Path | None], df: pd.DataFrame, *,
                    prompt: str = "local_prompt", reference: Path | None = None) -> dict[str, Evaluation] | None:
    """``evaluate_model`` for each model (name -> ControlNet folder, or None for the backbone alone). With
    ``reference``, a listed teacher is evaluated first and writes it; every other model agrees against it.
    Launched on several processes: the evaluations on rank 0, None on the other ranks."""
    order = sorted(models, key=lambda n: n != TEACHER)
    evals = {name: evaluate_model(cfg, pipe, name, models[name], df, prompt=prompt, reference=reference,
                                  write_reference=reference is not None and name == TEACHER)
             for name in order}
    return evals if distributed.world().main else None


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
