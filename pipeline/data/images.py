"""Manifest and image readers shared by every stage.

Conventions: images -> float (B,3,H,W) in [-1, 1]; masks -> float (B,1,H,W) in {0, 1} with 1 = hole
(region to repaint). Mask PNGs are binarised with MASK_THRESHOLD: pixel value > 127 = hole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image

MASK_THRESHOLD = 127
PATH_COLUMNS = ("image", "mask", "instances")


def load_manifest(path: str | Path, resolve: bool = True) -> pd.DataFrame:
    """Read a manifest parquet; with `resolve`, path columns become paths relative to the cwd
    (they are stored relative to the manifest's folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    df = pd.read_parquet(path)
    if resolve:
        for col in PATH_COLUMNS:
            if col in df.columns:
                df[col] = pd.Series([str(path.parent / p) if isinstance(p, str) and p else None for p in df[col]],
                                    index=df.index, dtype=object)
    return df


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def load_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Bool (H, W), True = hole."""
    img = Image.open(path).convert("L")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img) > MASK_THRESHOLD


def read_images(paths: Iterable[str | Path], size: int | None = None) -> torch.Tensor:
    arr = np.stack([load_rgb(p, size) for p in paths]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def read_masks(paths: Iterable[str | Path], size: int | None = None) -> torch.Tensor:
    arr = np.stack([load_mask(p, size) for p in paths]).astype(np.float32)
    return torch.from_numpy(arr)[:, None]
