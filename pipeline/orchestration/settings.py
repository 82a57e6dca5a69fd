"""The ``flows:`` section of a workspace's params.yaml: how the Prefect flows run the DVC stages."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import FlowSettings, ShardSpec, load

__all__ = ["FlowSettings", "ShardSpec", "TRAINING_STAGES", "flow_settings"]

TRAINING_STAGES = tuple(FlowSettings.model_fields["accelerate_stages"].default)


def flow_settings(workspace: str | Path) -> FlowSettings:
    """The workspace's validated ``flows`` section (the whole params file is validated)."""
    return load(Path(workspace) / "params.yaml").flows
