"""Image-quality metrics of images in [-1, 1].

- ``psnr``/``ssim``: per image, on the whole image or restricted to a region (no weights needed);
  ``quality`` reports them whole, in the hole and outside it, ``agreement`` against a reference output.
- LPIPS, FID, CMMD (``optional_metrics``): only from weights present locally, otherwise None with the
  reason; never estimated, never downloaded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.config import EvaluateConfig

OPTIONAL = ("lpips", "fid", "cmmd")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def _region_mean(x: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Per-image mean of ``x`` (B,C,H,W) over ``region`` (B,1,H,W) in {0,1}; the whole image when None."""
    if region is None:
        return x.mean(dim=(1, 2, 3))
    w = region.float().expand_as(x)
    return (x * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR (B,) of [0, 1] intensities, the MSE taken over ``region`` when given. Identical images
    read 100 dB (an MSE floor of 1e-10), not inf, which a JSON metrics file cannot hold."""
    mse = _region_mean((_unit(pred) - _unit(target)) ** 2, region)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM (B,): torchmetrics' SSIM map (Gaussian window 11, sigma 1.5), averaged over ``region``
    when given."""
    _, smap = structural_similarity_index_measure(_unit(pred), _unit(target), data_range=1.0, reduction="none",
                                                  return_full_image=True)
    return _region_mean(smap, region)


HOLE_KEYS = ("psnr_masked", "ssim_masked", "psnr_unmasked", "ssim_unmasked")


def per_image(pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-image PSNR/SSIM on the whole image, in the hole and outside it (NaN where an image has no
    pixel outside the hole). ``hole=None`` (condition edges: there is no hole): the hole and outside
    columns are not applicable, NaN for every image, so ``summarise`` reports them None (n/a), never the
    whole image's values under their names."""
    if hole is None:
        out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
        nan = torch.full_like(out["psnr"], float("nan"))
        return {**out, **{k: nan.clone() for k in HOLE_KEYS}}
    keep = 1 - hole
    out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target),
           "psnr_masked": psnr(pred, target, hole), "ssim_masked": ssim(pred, target, hole),
           "psnr_unmasked": psnr(pred, target, keep), "ssim_unmasked": ssim(pred, target, keep)}
    none_outside = keep.flatten(1).sum(1) == 0
    for k in ("psnr_unmasked", "ssim_unmasked"):
        out[k] = out[k].masked_fill(none_outside, float("nan"))
    return out


def per_image_agreement(pred: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"agree_psnr": psnr(pred, reference), "agree_ssim": ssim(pred, reference)}


def summarise(columns: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Per-image columns -> their means (None when a column has no finite value), plus psnr_std."""
    out: dict[str, float | None] = {}
    for k, v in columns.items():
        v = v.double()
        v = v[~torch.isnan(v)]
        out[k] = float(v.mean()) if len(v) else None
        if k == "psnr":
            out["psnr_std"] = float(v.std()) if len(v) > 1 else 0.0
    return out


@contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _lpips(path: str, net: str, pred, target) -> float:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    with _env("TORCH_HOME", str(path)):  # torchvision loads the backbone weights from here, never downloads
        m = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
        return float(m(_unit(pred), _unit(target)))


def _fid(path: str, pred, target) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    m.update(_unit(target), real=True)
    m.update(_unit(pred), real=False)
    return float(m.compute())


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of images in [-1, 1] (bicubic resize to the model's size)."""
    size = model.config.image_size
    x = torch.nn.functional.interpolate(_unit(images), size=(size, size), mode="bicubic", align_corners=False)
    x = (x.clamp(0, 1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    emb = model(pixel_values=x.to(model.dtype)).image_embeds.double()
    return emb / emb.norm(dim=-1, keepdim=True)


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD's statistic (Jayasumana et al. 2024, google-research/cmmd): Gaussian-RBF MMD^2 times 1000."""
    gamma = 1 / (2 * sigma**2)

    def k(a, b):
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-gamma * d).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


def _cmmd(path: str, pred, target) -> float:
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
    return mmd(clip_embeddings(model, target), clip_embeddings(model, pred))


def optional_metrics(ec: EvaluateConfig, pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, dict]:
    """(values, reasons): a metric whose weights are not present locally is None with a reason."""
    values: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for name in OPTIONAL:
        path = getattr(ec, f"{name}_weights")
        values[name] = None
        if path is None:
            reasons[name] = f"no local weights (params evaluate.{name}_weights is null); never estimated"
            continue
        if not Path(path).exists():
            reasons[name] = f"weights not found at {path}; never estimated"
            continue
        try:
            if name == "lpips":
                values[name] = _lpips(path, ec.lpips_net, pred, target)
            elif name == "fid":
                values[name] = _fid(path, pred, target)
            else:
                values[name] = _cmmd(path, pred, target)
        except ImportError as exc:  # the package that reads the weights is not installed
            reasons[name] = f"missing package: {exc}"
    return values, reasons
