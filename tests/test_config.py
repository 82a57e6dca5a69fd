"""pipeline/config.py: params.yaml is complete, unknown keys fail at any depth naming the closest known one."""

import subprocess
import sys

import pytest
import yaml

from pipeline.config import Config, ConfigError, LaunchConfig, from_dict
from tests.params import REPO, full


def test_params_yaml_sets_every_key_and_the_schema_changes_no_output():
    raw = full()
    cfg = from_dict(raw)
    assert cfg.model_dump(mode="json")["distill"]["stage1"] == raw["distill"]["stage1"]
    # a key missing from params.yaml is an error, not a silent default
    del raw["distill"]["alpha"]
    with pytest.raises(ConfigError, match=r"distill\.alpha: missing"):
        from_dict(raw)


@pytest.mark.parametrize("path, typo, hint", [
    ((), "ablatoins", "ablations"),
    (("distill",), "alhpa", "distill.alpha"),
    (("distill", "stage1", "train"), "stpes", "distill.stage1.train.steps"),
    (("caption", "qwen"), "modle", "caption.qwen.model"),
])
def test_unknown_key_at_any_depth_names_it_and_the_closest_known(path, typo, hint):
    raw = full()
    node = raw
    for p in path:
        node = node[p]
    node[typo] = 1
    with pytest.raises(ConfigError) as exc:
        from_dict(raw)
    key = ".".join([*path, typo])
    assert f"{key}: unknown key; did you mean '{hint}'?" in str(exc.value)


def test_bad_variant_override_fails_at_load_naming_the_variant():
    raw = full({"ablations": {"variants": {"full": {"two_stage": True, "overrides": {"distill": {"alhpa": 1}}}}}})
    with pytest.raises(ConfigError, match=r"(?s)ablations\.variants\.full\.overrides.*distill\.alhpa: unknown key"):
        from_dict(raw)


def test_bad_value_in_any_section_fails_at_load():
    with pytest.raises(ConfigError, match=r"trajectories\.points_per_image: Input should be greater than or equal to 1"):
        from_dict(full({"trajectories": {"points_per_image": -5}}))


def test_no_value_that_a_yaml_rewrite_can_reinterpret():
    """`dvc exp run -S` rewrites params.yaml unquoted: no string may read back as a bool or null."""
    def leaves(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from leaves(v, f"{key}.{k}" if key else k)
        elif isinstance(x, list):
            for v in x:
                yield from leaves(v, key)
        else:
            yield key, x
    for key, value in leaves(full()):
        if isinstance(value, str):
            assert yaml.safe_load(value) is not None and not isinstance(yaml.safe_load(value), bool), key


def test_cli_validates_and_prints(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.config", str(REPO / "params.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and Config(**yaml.safe_load(out.stdout))
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(full({"ablatoins": {}})))
    out = subprocess.run([sys.executable, "-m", "pipeline.config", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "ablatoins: unknown key; did you mean 'ablations'?" in out.stderr


def test_ablation_seeds_must_be_headline_seeds():
    """Every run at ablations.seeds starts from full's stage 1 at its seed (ablate_stage1 trains it at
    headline_seeds only): a seed outside them is an error naming both keys."""
    raw = full()
    raw["ablations"].update(headline_seeds=[0, 1], seeds=[0, 3])
    with pytest.raises(ConfigError, match=r"ablations\.seeds: \[3\] not in ablations\.headline_seeds \[0, 1\]"):
        from_dict(raw)
    raw["ablations"]["seeds"] = [1]
    assert from_dict(raw).ablations.seeds == [1]


def test_launch_defaults_to_one_process_and_validates():
    """params launch (pipeline/launch.py): one process unless asked; a file without the section is one process."""
    cfg = from_dict(full())
    assert cfg.launch == LaunchConfig() and cfg.launch.world_size == 1
    raw = full()
    del raw["launch"]  # a params file from before the section: one process
    assert from_dict(raw).launch.world_size == 1
    with pytest.raises(ConfigError, match=r"launch\.machine_rank: 2 is not below launch\.machines \(2\)"):
        from_dict(full({"launch": {"machines": 2, "machine_rank": 2}}))
    with pytest.raises(ConfigError, match=r"launch\.porcesses: unknown key; did you mean 'launch\.processes'"):
        from_dict(full({"launch": {"porcesses": 2}}))
