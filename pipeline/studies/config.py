"""studies/params.yaml -> a validated StudiesConfig, checked against params.yaml's Config (depths within the
teacher, seeds with a stage-1 prefix). Strict like pipeline/config.py: unknown keys are errors."""

from __future__ import annotations

import re
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


def prompt_level(name: str) -> float | None:
    """A prompt-quality level: ``noise<P>`` = P% of the pseudo-labeller's unlabelled local prompts replaced by
    wrong ones (caption_noise's rule; noise0 = its own prompts) -> P / 100; ``empty`` = every one "" -> None."""
    if name == "empty":
        return None
    m = re.fullmatch(r"noise(\d{1,3})", name)
    if not m or int(m.group(1)) > 100:
        raise ValueError(f"prompt level {name!r}: expected noise<0-100> or empty")
    return int(m.group(1)) / 100


class PromptQualityConfig(_Strict):
    """Stage 2 on unlabelled prompts of controlled quality (``levels``, see prompt_level), at ``seeds``."""
    levels: list[str]
    seeds: list[int]

    @field_validator("levels", "seeds")
    @classmethod
    def _levels(cls, v, info):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"{info.field_name}: empty or duplicates in {v}")
        if info.field_name == "levels":
            for name in v:
                prompt_level(name)
        elif min(v) < 0:
            raise ValueError(f"seeds: {min(v)} < 0")
        return v


class EdgesConfig(_Strict):
    """The method under condition edges: its own teacher (params' teacher section), students at ``seeds``."""
    seeds: list[int]

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"seeds: empty, duplicates or negative in {v}")
        return v


class StudiesConfig(_Strict):
    frontier: FrontierConfig
    prompt_quality: PromptQualityConfig
    edges: EdgesConfig


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
    extra = sorted(set(studies.prompt_quality.seeds) - set(cfg.ablations.headline_seeds))
    if extra:
        raise ConfigError(f"{source}: prompt_quality.seeds: {extra} not in ablations.headline_seeds "
                          f"{cfg.ablations.headline_seeds} (stage 2 starts from full's stage 1 at each seed)")
    if cfg.condition != "inpaint":
        raise ConfigError(f"{source}: the studies compare against the inpainting pipeline; params.yaml has "
                          f"condition {cfg.condition!r}")
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
