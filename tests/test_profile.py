"""pipeline.profile.apply_profile: configs/NAME.yaml merged into a workspace's params.yaml in place."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.profile import ROOT, apply_profile


def _workspace(tmp_path, profile_text: str):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(profile_text)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


def test_apply_profile_keeps_comments_and_reads_back_as_the_merge(tmp_path):
    root = _workspace(tmp_path, "distill:\n  stage1:\n    train: {lr: 1.0e-5}\nteacher:\n  gate_min_gain_db: null\n")
    before = (root / "params.yaml").read_text()
    apply_profile("tiny", root)
    after = (root / "params.yaml").read_text()
    assert [l for l in before.splitlines() if l.lstrip().startswith("#")] == \
        [l for l in after.splitlines() if l.lstrip().startswith("#")]
    data = yaml.safe_load(after)
    assert data["distill"]["stage1"]["train"]["lr"] == 1e-5           # a float to PyYAML, not '1e-05'
    assert data["distill"]["mixed_precision"] == "fp32"
    assert data["teacher"]["gate_min_gain_db"] is None
    assert apply_profile("default", root) == root / "params.yaml" and (root / "params.yaml").read_text() == after


def test_unknown_or_invalid_profile_raises_and_leaves_params(tmp_path):
    root = _workspace(tmp_path, "data:\n  image_size: -1\n")
    before = (root / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"profile 'nope'.*known profiles: \['default', 'tiny'\]"):
        apply_profile("nope", root)
    with pytest.raises(ConfigError, match="data.image_size"):
        apply_profile("tiny", root)
    assert (root / "params.yaml").read_text() == before
