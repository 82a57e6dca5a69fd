"""The shared body of the three foundation stages: train the tiny world's component, or, with
``world.source: pretrained``, resolve, check and link the pretrained one; then write its metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from pipeline import paths
from pipeline.config import Config, load
from pipeline.metrics_io import write_json
from pipeline.models import pretrained


def run(description: str, component: str, out: Path, train: Callable[[Config], dict], argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    if pretrained.is_pretrained(cfg):
        metrics = pretrained.materialise(cfg, component, out)
        for folder in (paths.CHECKPOINTS / component, paths.DVCLIVE / component):
            folder.mkdir(parents=True, exist_ok=True)  # the stage's (persistent) outs: nothing was trained
    else:
        metrics = train(cfg)
    write_json(paths.FOUNDATION_METRICS / f"{component}.json", metrics)
    print(metrics)
    return metrics
