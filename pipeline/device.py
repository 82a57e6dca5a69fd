"""Where a process runs its models: a device setting (``runtime.device``, the captioners' own keys) resolved,
a rank's own GPU under a launcher, and no silent CPU. Part of the runtime policy (pipeline/runtime.py, which
re-exports :func:`resolve_device`), apart from it because the stage entry point (pipeline/entry.py) runs
:func:`require_accelerator` before the body of every stage that runs networks: a module in every stage's code
deps (pipeline.closure) must not hold the model loaders.

- ``auto``: the accelerator when torch sees one (torch.accelerator), else the CPU; cpu | cuda[:i] | mps as named.
- Under a launcher (pipeline/launch.py: LOCAL_RANK set) a CUDA device is the rank's own, cuda:LOCAL_RANK, so
  eight ranks use eight GPUs; an explicit cuda:i, which would pile them onto one, is refused.
- No silent CPU: with pretrained models (``world.source: pretrained``) and ``runtime.device: auto``, a machine
  where torch sees no accelerator is an error naming what torch found, not a CPU run of weeks;
  ``runtime.device: cpu`` runs them on the CPU on purpose (configs/sd3_local.yaml).
"""

from __future__ import annotations

import re

import torch

from pipeline.config import Config, ConfigError
from pipeline.launch import local_rank

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the current accelerator (torch.accelerator), else the CPU; anything else as named; a CUDA
    device under a launcher -> cuda:LOCAL_RANK (an explicit index there is a ValueError)."""
    if not DEVICE.match(name):
        raise ValueError(f"device {name!r}: expected auto | cpu | cuda[:i] | mps")
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}); "
                               "set runtime.device: auto or cpu")
    else:
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        dev = torch.device(acc) if acc is not None else torch.device("cpu")
    rank = local_rank()
    if rank is None or dev.type != "cuda":
        return dev
    if ":" in name:
        raise ValueError(f"device {name!r} under a launcher: every rank would use that one GPU; set auto or "
                         "cuda (each rank takes the GPU of its LOCAL_RANK)")
    return torch.device("cuda", rank)


def require_accelerator(cfg: Config) -> None:
    """No silent CPU: with ``world.source: pretrained`` and ``runtime.device: auto``, a ConfigError when torch
    sees no accelerator, saying what it found and the setting that runs on the CPU on purpose."""
    if cfg.world.source != "pretrained" or cfg.runtime.device != "auto" or torch.accelerator.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise ConfigError(
        f"the models are pretrained (world.source: pretrained) and runtime.device is auto, but torch sees no "
        f"accelerator (torch {torch.__version__}, {build}, torch.cuda.is_available() = "
        f"{torch.cuda.is_available()}): refusing to run them on the CPU. Install a CUDA build of torch or fix "
        "the driver / CUDA_VISIBLE_DEVICES; or set runtime.device: cpu to run on the CPU on purpose")
