"""The ``flows:`` section of a workspace's params.yaml: how the Prefect flows run the DVC stages; and what
its ``launch:`` section means to them."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path
from typing import Callable

from pipeline import launch
from pipeline.config import FlowSettings, load

__all__ = ["FlowSettings", "flow_settings", "launches_ranks"]


def flow_settings(workspace: str | Path) -> FlowSettings:
    """The workspace's validated ``flows`` section (the whole params file is validated)."""
    return load(Path(workspace) / "params.yaml").flows


def launches_ranks(workspace: str | Path) -> Callable[[str], bool]:
    """A stage command -> whether it starts several ranks, one per device (pipeline/launch.py: a ``model``
    stage when ``launch`` asks for more than one process), so it runs alone. The stage's own command
    launches them; a flow only keeps other stages off its devices. Imports the stage modules
    (their ``main``'s kind), and only when ``launch`` asks for several processes."""
    from pipeline.entry import LAUNCHED

    if launch.settings(load(Path(workspace) / "params.yaml")).world_size == 1:
        return lambda cmd: False

    def model_stage(cmd: str) -> bool:
        argv = shlex.split(cmd)
        if "-m" not in argv[:-1]:
            return False
        main = getattr(importlib.import_module(argv[argv.index("-m") + 1]), "main", None)
        return getattr(main, "kind", None) in LAUNCHED

    return model_stage
