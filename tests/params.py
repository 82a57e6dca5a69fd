"""Test params: the repository's params.yaml (the one home of every value) with a test's overrides."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, deep_merge, from_dict, load_raw

REPO = Path(__file__).resolve().parents[1]


def full(overrides: dict | None = None) -> dict:
    """params.yaml deep-merged with ``overrides``: a complete params mapping."""
    return deep_merge(load_raw(REPO / "params.yaml"), overrides or {})


def config(overrides: dict | None = None) -> Config:
    return from_dict(full(overrides), "test params")
