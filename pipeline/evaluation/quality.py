"""Per-image PSNR/SSIM on images in [-1, 1], whole and restricted to a region (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR (B,). ``region`` (B,1,H,W) in {0,1} restricts the error to those pixels."""
    p, t = _unit(pred), _unit(target)
    if region is None:
        return peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    w = region.float().expand_as(p)
    mse = ((p - t) ** 2 * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM (B,), the SSIM map averaged over ``region`` when given."""
    p, t = _unit(pred), _unit(target)
    _, smap = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none", return_full_image=True)
    if region is None:
        return smap.mean(dim=(1, 2, 3))
    w = region.float().expand_as(smap)
    return (smap * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1)
