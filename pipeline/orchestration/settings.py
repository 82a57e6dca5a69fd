"""The ``flows:`` section of params.yaml: how the Prefect flows run the DVC stages."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

TRAINING_STAGES = ("foundation*", "teacher*", "stage1*", "stage2*", "ablat*")


class ShardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = Field(..., description="template with {shard} (i/N), {index}, {num_shards}, {out}")
    num_shards: int = Field(2, ge=1)
    out: str = Field(..., description="the stage's output folder; shard i writes to <out>.shards/shard-i")


class FlowSettings(BaseModel):
    """The ``flows:`` section of params.yaml (all optional)."""

    model_config = ConfigDict(extra="forbid")
    retries: int = Field(1, ge=0, description="retries of a stage after a transient failure")
    retry_delay_seconds: float = Field(10, ge=0)
    no_retry_stages: list[str] = Field(["validate*"], description="globs: failures here are never retried")
    dask_address: str | None = Field(None, description="scheduler address; None = local processes")
    dask_workers: int | None = Field(None, ge=1, description="local cluster size (default: min(shards, CPUs))")
    accelerate_config: str | None = Field(None, description="accelerate config file for training stages")
    accelerate_stages: list[str] = Field(list(TRAINING_STAGES))
    sharded: dict[str, ShardSpec] = Field(default_factory=dict, description="stage -> sharded command")


def flow_settings(workspace: str | Path) -> FlowSettings:
    path = Path(workspace) / "params.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return FlowSettings(**(raw.get("flows") or {}))
