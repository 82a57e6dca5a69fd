"""Shared entry point of the stages/validate_*.py gates: exit 1 with the failure message on violation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import paths
from pipeline.config import ConfigError, load
from pipeline.validation.gx import GateError


def gate_main(name: str, add_args, run, argv=None) -> int:
    ap = argparse.ArgumentParser(description=f"Great Expectations gate: {name}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-dir", default=str(paths.GATES), help="where <gate>.json/.md go")
    add_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load(args.params)
        report = run(args, cfg, cfg.gates)
    except GateError as exc:
        print(f"validate_{name}: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"validate_{name}: {exc}", file=sys.stderr)
        return 2
    print(f"validate_{name}: passed {report['evaluated']} expectations -> {args.out_dir}/{name}.json")
    return 0
