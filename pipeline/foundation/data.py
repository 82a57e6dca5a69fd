"""Scene tensors for training the tiny world: its own 'pretraining' data, the world split only (disjoint
from the labelled, unlabelled, val and test splits that distillation and evaluation use)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.config import WORLD_SPLIT
from pipeline.data.images import load_manifest, read_images, read_masks
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
                      desc: str = "encode") -> dict[str, torch.Tensor]:
    """VAE latents of the images and, given masks, of the masked images plus the latent hole mask."""
    out: dict[str, list] = {"latents": [], "masked_latents": [], "hole": []}
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        img = images[i:i + batch]
        out["latents"].append(inpaint.encode(vae, img))
        if masks is not None:
            m = masks[i:i + batch]
            ml = inpaint.encode(vae, inpaint.masked_image(img, m))
            out["masked_latents"].append(ml)
            out["hole"].append(inpaint.latent_mask(m, ml.shape[-2:]))
    return {k: torch.cat(v) for k, v in out.items() if v}
