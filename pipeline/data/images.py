"""Manifest and image readers shared by every stage.

Conventions: images -> float (B,3,H,W) in [-1, 1]; masks -> float (B,1,H,W) in {0, 1} with 1 = hole
(region to repaint). Mask PNGs are binarised with MASK_THRESHOLD: pixel value > 127 = hole.
Files are read as users have them (to_rgb / to_mask): EXIF orientation, 16-bit and float images, palette,
CMYK, and masks drawn in the alpha channel.
A path column holds a file path or a shard reference ``<shard>.parquet#<column>/<row>`` (the pipeline's own
scenes and triplets, pipeline.data.image_shards); open_image, image_exists and image_bytes take either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from pipeline.data import image_shards

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


class PixelError(ValueError):
    """A file that decodes but whose pixels cannot be read unambiguously; ``kind`` names the reject kind."""
    kind = "unreadable"


class AlphaMaskError(PixelError):
    kind = "alpha_mask"


_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA")


def _grey8(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image -> 8-bit L, scaled rather than clipped (PIL's
    convert clips: a 16-bit mid-grey would become white)."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if img.mode in _16BIT:
        top = 65535.0
    elif lo < 0 or hi > 65535:
        raise PixelError(f"{img.mode} pixel values {lo:g}..{hi:g}: unknown range (expected 0..1, 0..255 or 0..65535)")
    else:  # mode I or F carries no bit depth: take the smallest usual range that holds the values
        top = 1.0 if img.mode == "F" and hi <= 1 else 255.0 if hi <= 255 else 65535.0
    return Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB as viewers show it: EXIF orientation applied, high bit depths scaled.
    Alpha is dropped (the stored colour is kept). 16-bit RGB PNGs already open as 8-bit RGB in PIL."""
    img = ImageOps.exif_transpose(img)
    if img.mode in (*_16BIT, "I", "F"):
        img = _grey8(img)
    return img.convert("RGB")  # P, L, LA, CMYK, YCbCr, 1, ... through PIL's own conversions


def to_mask(img: Image.Image) -> Image.Image:
    """Any decoded mask image -> 8-bit L (> MASK_THRESHOLD = hole), EXIF orientation applied.

    A mask drawn only in the alpha channel (colour constant, alpha varying) is read from the alpha channel,
    opaque = hole; when both colour and alpha vary and disagree, AlphaMaskError says so."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency is an alpha channel too
    if img.mode in (*_16BIT, "I", "F"):
        return _grey8(img)
    if img.mode not in _ALPHA:
        return img.convert("L")
    alpha = np.asarray(img.getchannel("A"))
    colour = np.asarray(img.convert("RGB"))
    grey = img.convert("L")
    if (alpha == alpha.flat[0]).all():
        return grey
    if (colour == colour[0, 0]).all():
        return Image.fromarray(alpha, "L")
    by_grey, by_alpha = np.asarray(grey) > MASK_THRESHOLD, alpha > MASK_THRESHOLD
    if (by_grey == by_alpha).all():  # e.g. white strokes, opaque, on transparent black: both say the same
        return grey
    raise AlphaMaskError(
        f"the mask is in the alpha channel as well as in its grey values, and they disagree (hole by grey "
        f"{by_grey.mean():.1%}, by alpha {by_alpha.mean():.1%}); save it as a greyscale mask, white = hole")


def image_exists(path: str | Path) -> bool:
    """A file that exists, or a shard reference whose shard holds that row and column."""
    return image_shards.ref_exists(path) if image_shards.is_ref(path) else Path(path).is_file()


def image_bytes(path: str | Path) -> bytes:
    """The stored bytes: the file's, or the PNG a shard reference names."""
    return image_shards.read_bytes(path) if image_shards.is_ref(path) else Path(path).read_bytes()


def open_image(path: str | Path) -> Image.Image:
    """Decode a file or a shard reference fully (truncated files fail here)."""
    if image_shards.is_ref(path):
        return image_shards.open_ref(path)
    img = Image.open(path)
    img.load()  # full decode: truncated files fail here
    return img


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    img = to_rgb(open_image(path))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def load_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Bool (H, W), True = hole."""
    img = to_mask(open_image(path))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img) > MASK_THRESHOLD


def read_images(paths: Iterable[str | Path], size: int | None = None) -> torch.Tensor:
    arr = np.stack([load_rgb(p, size) for p in paths]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def read_masks(paths: Iterable[str | Path], size: int | None = None) -> torch.Tensor:
    arr = np.stack([load_mask(p, size) for p in paths]).astype(np.float32)
    return torch.from_numpy(arr)[:, None]
