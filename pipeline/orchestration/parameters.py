"""What a run's parameters are: a configuration profile and ``-S``-style overrides applied to the
workspace's params.yaml (through :mod:`pipeline.profile`), and the run artifact recording them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from pipeline.atomic import write_file
from pipeline.config import ConfigError, load
from pipeline.orchestration.stages import DVC, command_env
from pipeline.profile import apply_profile, update_params


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1, 'c': {'d': 2}} -> {'a': {'b': 1}, 'c': {'d': 2}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _nested(value) if isinstance(value, dict) else value
    return out


def apply_parameters(workspace: str | Path = ".", profile: str | None = None,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply a configuration profile, then ``overrides`` (dotted keys, like ``dvc exp run -S``), to the
    workspace's params.yaml (comments kept); validate; return a record of what was applied."""
    root = Path(workspace)
    params = root / "params.yaml"
    before = params.read_text() if params.exists() else None
    try:
        if profile:
            apply_profile(profile, root)   # the workspace's configs/PROFILE.yaml, as `pipeline.profile use`
        if overrides:
            update_params(params, _nested(overrides))
        if params.exists():
            load(params)   # every section, every variant: a bad value fails here, naming the key, before any stage runs
    except ConfigError:
        if before is not None:
            write_file(params, before)     # nothing half-applied is left in the workspace
        raise
    diff = subprocess.run([*DVC, "params", "diff", "--md"], cwd=str(root), env=command_env(),
                          capture_output=True, text=True)
    return {"workspace": str(root.resolve()), "profile": profile, "overrides": overrides or {},
            "params_diff_vs_head": diff.stdout.strip() if diff.returncode == 0 else diff.stderr.strip()}


def record_parameters(record: dict[str, Any], stages: list[str]) -> None:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=record["workspace"],
                         capture_output=True, text=True)
    md = [
        "# Run parameters", "",
        f"- workspace: `{record['workspace']}`",
        f"- git commit: `{git.stdout.strip() or 'none'}`",
        f"- profile: `{record['profile'] or 'default (params.yaml)'}`",
        f"- overrides: `{json.dumps(record['overrides'], default=str)}`",
        f"- stages ({len(stages)}): " + ", ".join(f"`{s}`" for s in stages), "",
        "## `dvc params diff` (workspace vs HEAD)", "",
        record["params_diff_vs_head"] or "(no change)",
    ]
    create_markdown_artifact("\n".join(md), key="run-parameters", description="profile and params overrides")
