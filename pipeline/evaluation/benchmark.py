"""Efficiency benchmark of the teacher and the students, in one process, on the same inputs.

For each ControlNet: parameters; FLOPs (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions
and attention, i.e. what dominates); peak memory of the call; latency (``warmup`` calls, then the median
of ``repeats``) of (a) the ControlNet forward alone and (b) one full denoising step, backbone + ControlNet
(pipeline.models.controlled.Controlled). Speedups are the teacher's latency over the model's, written
beside the ideal the FLOP ratio predicts. Training throughput (samples/s) per distillation stage comes
from the trainers' metrics (metrics/distill/*.json).

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU, the peak of the allocations the
PyTorch profiler records during one call (its memory timeline), i.e. activations and temporaries on top
of the resident weights (``*_weights_mb``). tracemalloc is not used: it does not see tensor memory.

Depths other than the trained students' (``benchmark.extra_layers``) are measured on freshly initialised
students: cost depends on the architecture, not the weights.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import BenchmarkConfig, Config
from pipeline.models.controlled import Controlled
from pipeline.models.mapping import TEACHER, convention_of
from pipeline.timing import median_ms, sync



def n_params(model) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters())


def weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def count_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def latency_ms(fn, bc: BenchmarkConfig, device) -> float:
    """Median ms of an inference call (pipeline.timing: the clock is read after the device finished)."""
    with torch.no_grad():
        return median_ms(fn, bc.warmup, bc.repeats, device)


def peak_memory_mb(fn, device: torch.device) -> tuple[float | None, str]:
    """(peak MiB of one call beyond what was allocated before it, method)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prof.export_memory_timeline(f"{tmp}/m.json", device="cpu")
            _, sizes = json.loads(Path(f"{tmp}/m.json").read_text())
        except Exception as exc:  # noqa: BLE001 - the timeline is optional; say why it is missing
            return None, f"not measured: torch.profiler memory timeline failed ({type(exc).__name__})"
    return max(sum(s) for s in sizes) / 2**20, "torch.profiler memory timeline (CPU allocations during one call)"


def inputs(pipe, cfg: Config, batch: int, timestep: float, device) -> dict:
    """Inputs on ``device`` in the backbone's dtype (drawn on the CPU, so they do not depend on the device)."""
    from pipeline.models.world import encode_prompts

    g = torch.Generator().manual_seed(0)
    t, dt = pipe.transformer.config, pipe.transformer.dtype
    h = w = t.sample_size
    embeds, pooled = encode_prompts(pipe, ["a red circle on a plain background"] * batch, cfg.text.max_sequence_length,
                                    device)
    return {"noisy": torch.randn(batch, t.in_channels, h, w, generator=g).to(device, dt),
            "timesteps": torch.full((batch,), timestep, device=device),
            "prompt_embeds": embeds.to(device, dt), "pooled": pooled.to(device, dt),
            "control": torch.randn(batch, t.in_channels + 1, h, w, generator=g).to(device, dt)}


def measure(ctrl: Controlled, x: dict, bc: BenchmarkConfig, device) -> dict:
    args = (x["noisy"], x["timesteps"], x["prompt_embeds"], x["pooled"])

    def cn_forward():
        return ctrl.control(*args, x["control"])

    def step():
        return ctrl(*args, x["control"])

    out = {"controlnet_params": n_params(ctrl.controlnet), "controlnet_layers": int(ctrl.controlnet.config.num_layers),
           "controlnet_weights_mb": weights_mb(ctrl.controlnet),
           "controlnet_flops": count_flops(cn_forward), "step_flops": count_flops(step),
           "controlnet_ms": latency_ms(cn_forward, bc, device), "step_ms": latency_ms(step, bc, device)}
    out["controlnet_peak_mb"], _ = peak_memory_mb(cn_forward, device)
    out["step_peak_mb"], _ = peak_memory_mb(step, device)
    return out


def training_throughput(distill_metrics: Path) -> dict:
    """samples/s per distillation stage, as the trainers measured them (metrics/distill/<stage>.json)."""
    out = {}
    for path in sorted(Path(distill_metrics).glob("*.json")):
        m = json.loads(path.read_text())
        for k, v in m.items():
            if k.endswith("_samples_per_s"):
                out[k] = v
    return out


def run_benchmark(cfg: Config, foundation: Path, models: dict[str, Path], distill_metrics: Path | None = None) -> dict:
    """``models``: name -> ControlNet folder; the teacher must be one of them, named ``teacher``."""
    from pipeline.models.student import controlnet_from_backbone
    from pipeline.runtime import runtime

    if TEACHER not in models:
        raise ValueError("benchmark: the models must include the teacher (the speedup reference)")
    bc = cfg.benchmark
    if bc.threads:
        torch.set_num_threads(bc.threads)
    rt = runtime(cfg)  # device and dtype of every model measured
    device = rt.device
    pipe = rt.load_foundation(foundation)
    backbone = pipe.transformer
    x = inputs(pipe, cfg, bc.batch_size, bc.timestep, device)
    nets = {name: rt.load_controlnet(path) for name, path in models.items()}
    trained_depths = {int(n.config.num_layers) for k, n in nets.items() if k != TEACHER}
    for n in bc.extra_layers:
        if n not in trained_depths:
            nets[f"layers_{n}"] = controlnet_from_backbone(backbone, n, cfg.condition)
    args = (x["noisy"], x["timesteps"], x["prompt_embeds"], x["pooled"])

    def backbone_step():
        return backbone(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2],
                        pooled_projections=args[3], return_dict=False)

    # the baseline first, before any profiler has run in this process
    base = {"params": n_params(backbone), "step_ms": latency_ms(backbone_step, bc, device),
            "step_flops": count_flops(backbone_step)}
    base["step_peak_mb"], method = peak_memory_mb(backbone_step, device)
    per_model = {}
    for name, net in nets.items():
        net = rt.place(net)
        per_model[name] = measure(Controlled(backbone, net, convention_of(name)), x, bc, device)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in per_model[name].items()})
    t = per_model[TEACHER]
    for m in per_model.values():
        m["controlnet_speedup"] = t["controlnet_ms"] / m["controlnet_ms"]
        m["controlnet_speedup_ideal"] = t["controlnet_flops"] / m["controlnet_flops"]
        m["step_speedup"] = t["step_ms"] / m["step_ms"]
        m["step_speedup_ideal"] = t["step_flops"] / m["step_flops"]
        m["params_ratio"] = t["controlnet_params"] / m["controlnet_params"]
    return {
        "device": str(device), "dtype": str(rt.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "batch_size": bc.batch_size,
        "warmup": bc.warmup, "repeats": bc.repeats, "memory_method": method,
        "backbone": base,
        "models": per_model,
        "training": training_throughput(distill_metrics) if distill_metrics else {},
    }
