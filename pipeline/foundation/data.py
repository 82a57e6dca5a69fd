"""Scene tensors for training the tiny world: its own 'pretraining' data, the world split only (disjoint
from the labelled, unlabelled, val and test splits that distillation and evaluation use)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.config import WORLD_SPLIT
from pipeline.data.images import load_manifest, read_images, read_masks
from pipeline.models import condition as conditions
from pipeline.models import inpaint

TRAIN_SPLITS = (WORLD_SPLIT,)


def scenes(scenes_dir: Path, splits: tuple[str, ...]) -> pd.DataFrame:
    df = load_manifest(Path(scenes_dir) / "manifest.parquet")
    out = df[df["split"].isin(splits)].reset_index(drop=True)
    if out.empty:
        raise ValueError(f"{scenes_dir}/manifest.parquet: no rows in splits {list(splits)}")
    return out


def pixels(df: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return read_images(df["image"], size), read_masks(df["mask"], size)


@torch.no_grad()
def encode_in_batches(vae, images: torch.Tensor, masks: torch.Tensor | None = None, batch: int = 256,
                      desc: str = "encode", condition: str | None = None) -> dict[str, torch.Tensor]:
    """VAE latents of the images and, given masks, of the masked images plus the latent hole mask. Given a
    ``condition``, also ``control``: the ControlNet input pipeline.models.condition.prepare_control makes
    (inpaint: from the masked latents and hole above, edges: the encoded edge map)."""
    out: dict[str, list] = {"latents": [], "masked_latents": [], "hole": [], "control": []}
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        img = images[i:i + batch]
        out["latents"].append(inpaint.encode(vae, img))
        m = None if masks is None else masks[i:i + batch]
        if condition is not None and conditions.check(condition) == "edges":
            out["control"].append(conditions.prepare_control(vae, img, m, condition)[0])
        elif m is not None:
            control, hole = conditions.prepare_control(vae, img, m, "inpaint")
            out["masked_latents"].append(control[:, :-1])
            out["hole"].append(hole)
            if condition is not None:
                out["control"].append(control)
    return {k: torch.cat(v) for k, v in out.items() if v}
