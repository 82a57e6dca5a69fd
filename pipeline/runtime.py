"""The runtime policy: where models run, in what dtype, and in what micro-batches. The one place that
decides it; every stage that runs a model asks here (params section ``runtime``, plus ``world.dtype``).

- device: ``runtime.device`` = auto (the accelerator when there is one) | cpu | cuda[:i] | mps, resolved
  by pipeline/device.py (re-exported here: :func:`resolve_device`): a rank's GPU under a launcher, and no
  silent CPU for pretrained models. Apart from this module because every stage's entry point runs that
  check, and every stage's code deps would otherwise hold the model loaders below.
- dtype of the frozen models (VAE, text encoders, backbone, teacher): ``world.dtype`` on an accelerator;
  ``runtime.cpu_dtype`` on the CPU (float32 in the default profile: bf16 CPU kernels are slow and would
  change the tiny world's outputs). Trained models keep float32 weights; ``distill.mixed_precision``
  decides their autocast.
- micro-batches: ``runtime.encode_batch_size`` rows per VAE/text-encoder call in ``encode``;
  ``runtime.sample_batch_size`` images per denoising loop in the sampler (each image has its own noise,
  from ``evaluate.seed`` + its index, so this changes memory, not which noise an image gets).
- ``runtime.vae_slicing`` (one image at a time through the VAE; same values) and ``runtime.vae_tiling``
  (tiles above the VAE's sample size, for resolutions whose activations do not fit; changes values
  slightly, the stock pipeline does not tile by default).

The training Loop asks accelerate for its device (the same LOCAL_RANK rule: one process per GPU under a
launcher); the frozen models follow that device in this policy's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.device import resolve_device

__all__ = ["Runtime", "dtype_for", "resolve_device", "runtime"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype               # the frozen models'
    encode_batch_size: int
    sample_batch_size: int
    vae_slicing: bool
    vae_tiling: bool
    condition: str = "inpaint"      # params ``condition``: the ControlNets' input (pipeline.models.condition)

    def place(self, model):
        """A frozen model onto the policy's device, in its dtype, in eval mode without grad."""
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    def load_foundation(self, path: str | Path, with_t5: bool | None = None):
        """The SD3 pipeline (pipeline.models.world.load_foundation) loaded in the policy's dtype, every model
        on its device, the VAE sliced/tiled as the policy says."""
        from pipeline.models.world import load_foundation

        pipe = load_foundation(path, dtype=self.dtype, device=self.device, with_t5=with_t5)
        if self.vae_slicing:
            pipe.vae.enable_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        return pipe

    def load_controlnet(self, path: str | Path):
        """A frozen ControlNet for the run's ``condition`` (its extra_conditioning_channels)."""
        from pipeline.models.world import load_controlnet

        return load_controlnet(path, dtype=self.dtype, device=self.device, condition=self.condition)


def dtype_for(cfg: Config, device: torch.device) -> torch.dtype:
    return getattr(torch, cfg.world.dtype if device.type != "cpu" else cfg.runtime.cpu_dtype)


def runtime(cfg: Config) -> Runtime:
    r = cfg.runtime
    device = resolve_device(r.device)
    return Runtime(device, dtype_for(cfg, device), r.encode_batch_size, r.sample_batch_size, r.vae_slicing,
                   r.vae_tiling, cfg.condition)
