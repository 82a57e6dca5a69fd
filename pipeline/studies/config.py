"""studies/params.yaml -> a validated StudiesConfig, checked against params.yaml's Config (depths within the
teacher, seeds with a stage-1 prefix). Strict like pipeline/config.py: unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError, field_validator

from pipeline.config import Config, ConfigError, _describe, _Strict, deep_merge


class FrontierConfig(_Strict):
    """Students of each depth x {with, without L_af} x seed, at the headline budget (distill.*)."""
    depths: list[int]
    seeds: list[int]
    feature_alignment: list[bool]

    @field_validator("depths", "seeds", "feature_alignment")
    @classmethod
    def _unique(cls, v, info):
        if not v:
            raise ValueError(f"{info.field_name}: empty")
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name}: duplicates in {v}")
        if info.field_name == "depths" and min(v) < 1:
            raise ValueError(f"depths: {min(v)} < 1")
        if info.field_name == "seeds" and min(v) < 0:
            raise ValueError(f"seeds: {min(v)} < 0")
        return v


class StudiesConfig(_Strict):
    frontier: FrontierConfig


def check(studies: StudiesConfig, cfg: Config, source: str = "studies/params.yaml") -> StudiesConfig:
    """Cross-checks with params.yaml: raises ConfigError naming the key."""
    f = studies.frontier
    deep = [d for d in f.depths if d > cfg.teacher.num_layers]
    if deep:
        raise ConfigError(f"{source}: frontier.depths: {deep} deeper than the teacher "
                          f"(teacher.num_layers {cfg.teacher.num_layers})")
    extra = sorted(set(f.seeds) - set(cfg.ablations.headline_seeds))
    if extra:
        raise ConfigError(f"{source}: frontier.seeds: {extra} not in ablations.headline_seeds "
                          f"{cfg.ablations.headline_seeds} (the stage-1 prefixes the frontier runs depend on)")
    d = cfg.distill
    if True in f.feature_alignment and d.stage1.loss.af == 0 and d.stage2.loss.af == 0:
        raise ConfigError(f"{source}: frontier.feature_alignment: true, but params.yaml's L_af weights "
                          "(distill.stage{1,2}.loss.af) are 0: both arms would be the same")
    return studies


def from_dict(raw: dict, cfg: Config, source: str = "studies/params.yaml") -> StudiesConfig:
    try:
        studies = StudiesConfig(**(raw or {}))
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid params:\n  " + "\n  ".join(_describe(e) for e in exc.errors())) from None
    return check(studies, cfg, source)


def load(cfg: Config, path: str | Path = "studies/params.yaml", overrides: dict | None = None) -> StudiesConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: studies params file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    return from_dict(deep_merge(raw, overrides or {}), cfg, str(path))
