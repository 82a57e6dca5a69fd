"""The three foundation stages (vae, backbone, teacher), one body: train the tiny world's component, or, with
``world.source: pretrained``, resolve, check and link the pretrained one; then write its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline import distributed, paths
from pipeline.config import Config
from pipeline.entry import Stage
from pipeline.metrics_io import write_json
from pipeline.models import pretrained

Train = Callable[[Config, Path, Path], dict]  # (cfg, checkpoints, live) -> metrics (rank 0's; {} on the others)


def foundation_stage(doc: str, component: str, out: Path, train: Train) -> Stage:
    """The ``main`` of stages/<component>.py (a component is named as its stage)."""
    return Stage(component, doc, lambda args, cfg: make_component(cfg, component, out, train), kind="model")


def make_component(cfg: Config, component: str, out: Path, train: Train) -> dict | None:
    """``component`` -> ``out``; its metrics -> metrics/foundation/<component>.json. ``train`` writes its
    checkpoints and dvclive logs under checkpoints/<component> and dvclive/<component>. Launched on several
    processes, every rank trains (DDP), and rank 0 alone links, saves, writes and returns the metrics; the
    others write nothing and return None."""
    checkpoints, live = paths.CHECKPOINTS / component, paths.DVCLIVE / component
    main = distributed.world().main
    if pretrained.is_pretrained(cfg):
        if not main:  # linking is one process's work
            return None
        metrics = pretrained.materialise(cfg, component, out)
        for folder in (checkpoints, live):
            folder.mkdir(parents=True, exist_ok=True)  # the stage's (persistent) outs: nothing was trained
    else:
        metrics = train(cfg, checkpoints, live)
        if not main:
            return None
    write_json(paths.FOUNDATION_METRICS / f"{component}.json", metrics)
    print(metrics)
    return metrics
