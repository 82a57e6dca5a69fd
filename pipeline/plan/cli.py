"""``python -m pipeline.plan``: memory and GPU-hours of a profile before it runs (pipeline.plan)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
         "tb": 1e12}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '80' (GiB when no unit) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GiB or 80GB")
    unit = UNITS[m.group(2).lower()] if m.group(2) else 2**30
    return int(float(m.group(1)) * unit)


def arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="the workspace's params (default: params.yaml)")
    ap.add_argument("--profile", default=None, help="a profile (configs/NAME.yaml) merged over --params")
    ap.add_argument("--studies", default="studies/params.yaml", help="the studies' params (opt-in lines)")
    ap.add_argument("--device-memory", type=parse_bytes, default=parse_bytes("80GiB"))
    ap.add_argument("--reserve", type=parse_bytes, default=parse_bytes("2GiB"),
                    help="kept free of tensors: CUDA context and allocator slack (default 2GiB)")
    ap.add_argument("--gpu-name", default="H100 SXM")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak, TFLOP/s")
    ap.add_argument("--gpu-bandwidth", type=float, default=3.35, help="memory bandwidth, TB/s")
    ap.add_argument("--utilisation", type=float, default=0.4, help="share of peak achieved (default 0.4)")
    ap.add_argument("--ignore-measured", action="store_true",
                    help="cost from FLOPs only, not from rates this workspace's runs recorded")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the traces do no arithmetic)")
    ap.add_argument("--out", default="reports/plan.json", help="JSON output ('' for none)")
    return ap.parse_args(argv)


def load_params(params: str, profile: str | None) -> dict:
    from pipeline.config import load_raw
    from pipeline.profile import merged

    return merged(profile, Path(params)) if profile else load_raw(params)


def _quiet() -> None:
    """diffusers warns at every cast of a built model to the frozen dtype (from_pretrained would not)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def main(argv=None) -> int:
    args = arguments(argv)
    import torch

    from pipeline.config import from_dict
    from pipeline.metrics_io import write_json
    from pipeline.plan import make_plan
    from pipeline.plan.cost import Gpu
    from pipeline.plan.report import Budget, render

    torch.set_num_threads(args.threads)
    _quiet()
    t0 = time.perf_counter()
    raw = load_params(args.params, args.profile)
    cfg = from_dict(raw, args.params if not args.profile else f"{args.profile} over {args.params}")
    gpu = Gpu(args.gpu_name, args.gpu_tflops, args.gpu_bandwidth, args.utilisation)
    budget = Budget(args.device_memory, args.reserve)
    plan = make_plan(cfg, None if args.ignore_measured else raw, gpu, budget, Path("."), Path(args.studies),
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    plan.update(profile=args.profile or args.params, threads=args.threads,
                wall_seconds=round(time.perf_counter() - t0, 1))
    print(render(plan, gpu, budget))
    if args.out:
        write_json(args.out, plan)
        print(f"written: {args.out}")
    return 0
