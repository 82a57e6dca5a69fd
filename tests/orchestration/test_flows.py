"""Prefect flows over a tiny self-contained DVC project (no other stage of this repo is used).

One Prefect test server (prefect_test_harness, ~20 s to start) is shared by the module; PREFECT_HOME is a
temp dir. The stage order must come from DVC: dvc.yaml lists the stages out of dependency order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import flows
from pipeline.flows import (
    GateFailed,
    StageFailed,
    artifact_key,
    dvc_stages,
    gate_failures,
    merge_shards,
    select_stages,
)

from tests.params import full  # noqa: E402

PY = sys.executable

# Listed so that file order != DAG order: report needs train and validate_data, both need prepare.
_REPORT = ("import json; m=json.load(open('metrics/train.json')); "
           "open('reports/report.md','w').write('# Report\\n\\nscore %s\\n' % m['score'])")
# The stages read the real params (validated by the flow) and the test's knobs from toy.yaml.
_TRAIN = ("import yaml,json,sys; s=yaml.safe_load(open('params.yaml'))['distill']['stage1']['train']['steps']; "
          "print('training with steps', s); "
          "sys.exit(print('boom: loss is nan') or 3) if yaml.safe_load(open('toy.yaml'))['fail']=='train' else "
          "json.dump({'score': s*0.5, 'nested': {'psnr': 19.2}}, open('metrics/train.json','w'))")
_GATE = ("import yaml,json,sys; bad=yaml.safe_load(open('toy.yaml'))['fail']=='gate'; "
         "json.dump({'success': not bad, 'results': ["
         "{'success': True, 'expectation_config': {'type': 'expect_column_values_to_not_be_null', 'kwargs': {'column': 'image'}}, 'result': {}}, "
         "{'success': not bad, 'expectation_config': {'type': 'expect_column_values_to_be_unique', 'kwargs': {'column': 'id'}}, 'result': {'unexpected_count': int(bad)}}]}, "
         "open('metrics/gates/data.json','w')); "
         "sys.exit('gate data failed: expect_column_values_to_be_unique(id)' if bad else 0)")
_PREPARE = ("import os,sys,yaml; [os.makedirs(d, exist_ok=True) for d in ('data','metrics/gates','reports')]; "
            "flaky = yaml.safe_load(open('toy.yaml')).get('flaky') and not os.path.exists('.tried'); "
            "open('.tried','w'); sys.exit('transient: connection reset' if flaky else 0) if flaky else "
            "open('data/x.txt','w').write('x')")
DVC_SPEC = {"stages": {
    "report": {"cmd": f'python -c "{_REPORT}"', "deps": ["metrics/train.json", "metrics/gates/data.json"],
               "outs": ["reports/report.md"]},
    "train": {"cmd": f'python -c "{_TRAIN}"', "deps": ["data/x.txt", "toy.yaml"], "params": ["distill.stage1.train.steps"],
              "metrics": [{"metrics/train.json": {"cache": False}}]},
    "validate_data": {"cmd": f'python -c "{_GATE}"', "deps": ["data/x.txt", "toy.yaml"],
                      "metrics": [{"metrics/gates/data.json": {"cache": False}}]},
    "prepare": {"cmd": f'python -c "{_PREPARE}"', "deps": ["toy.yaml"], "outs": ["data/x.txt"]},
}}


def toy(root: Path, fail: str = "none", flaky: bool = False) -> None:
    """The toy stages' knobs: fail = none | train | gate; flaky: prepare fails once, transiently."""
    (root / "toy.yaml").write_text(yaml.safe_dump({"fail": fail, "flaky": flaky}))


def _make_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([PY, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True, env=env)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_SPEC, sort_keys=False))
    (root / "params.yaml").write_text("# tiny project\n" + yaml.safe_dump(
        full({"distill": {"stage1": {"train": {"steps": 4}}}, "flows": {"retries": 0}}), sort_keys=False))
    toy(root)
    for d in ("data", "metrics/gates", "reports"):
        (root / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True, env=env)
    return root


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)        # for subprocesses (Dask workers)
    try:
        with temporary_settings(updates={PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=90):
            yield home
    finally:
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


@pytest.fixture
def project(tmp_path):
    return _make_project(tmp_path / "proj")


def _artifact(key):
    from prefect.artifacts import Artifact

    return Artifact.get(key)


# ----------------------------------------------------------------------------- no server needed


def test_order_and_selection_come_from_dvc(project):
    stages = dvc_stages(project)
    order = [s.address for s in stages]
    assert order == ["prepare", "train", "validate_data", "report"]   # dvc.yaml order is report first
    assert [s.address for s in select_stages(stages, ["train"])] == ["prepare", "train"]
    assert [s.address for s in select_stages(stages, ["report"], upstream=False)] == ["report"]
    assert [s.address for s in select_stages(stages, ["valid*"])] == ["prepare", "validate_data"]
    with pytest.raises(ValueError, match="no DVC stage matches 'nope'.*prepare"):
        select_stages(stages, ["nope"])
    assert select_stages(stages, ["nope"], missing_ok=True) == []


def test_matrix_stages_selected_by_stem(tmp_path):
    root = _make_project(tmp_path / "m")
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["ablate"] = {
        "matrix": {"variant": ["full", "wo_af"], "seed": [0, 1]},
        "cmd": "python -c \"print('${item.variant}')\"",
        "deps": ["metrics/train.json"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    stages = dvc_stages(root)
    chosen = [s.address for s in select_stages(stages, ["ablat*"])]
    assert chosen == ["prepare", "train", "ablate@full-0", "ablate@full-1", "ablate@wo_af-0", "ablate@wo_af-1"]
    assert [s.address for s in select_stages(stages, ["ablate"], upstream=False)][:1] == ["ablate@full-0"]


def test_without_targets_only_the_root_pipeline_runs(tmp_path):
    from pipeline.orchestration.dag import product_stages
    root = _make_project(tmp_path / "sub")
    (root / "studies").mkdir()
    (root / "studies" / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"study": {
        "cmd": "python -c \"print(1)\"", "wdir": "..", "deps": ["metrics/train.json"]}}}))
    stages = dvc_stages(root)
    assert "studies/dvc.yaml:study" in [s.address for s in stages]
    assert [s.address for s in product_stages(stages)] == ["prepare", "train", "validate_data", "report"]
    assert [s.address for s in select_stages(stages, ["studies/dvc.yaml:*"], upstream=False)] == \
        ["studies/dvc.yaml:study"]


def test_helpers(tmp_path):
    assert artifact_key("gate", "Validate_Triplets.v2") == "gate-validate-triplets-v2"
    gate = tmp_path / "captions.json"
    gate.write_text(json.dumps([{"expectation": "expect_column_value_lengths_to_be_between",
                                 "column": "local_prompt", "success": False}]))
    assert gate_failures(gate) == ["captions: expect_column_value_lengths_to_be_between(local_prompt)"]
    a, b = tmp_path / "s0", tmp_path / "s1"
    for i, d in enumerate((a, b)):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / f"part-{i}.txt").write_text(str(i))
        (d / "rows.jsonl").write_text(f'{{"i": {i}}}\n')
    merge_shards([a, b], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == ["part-0.txt", "part-1.txt"]
    assert (tmp_path / "out" / "rows.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n'


# ----------------------------------------------------------------------------- flows under the harness


def test_full_flow_runs_dag_in_order_with_artifacts(harness, project):
    results = flows.pipeline_flow(str(project), overrides={"distill.stage1.train.steps": 6}, jobs=2)
    assert [r["stage"] for r in results] == ["prepare", "train", "validate_data", "report"]
    assert [r["threads"] for r in results] == [2, 1, 1, 2]     # train and validate_data side by side
    status = subprocess.run([PY, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True, text=True)
    assert json.loads(status.stdout or "{}") == {}             # all recorded in dvc.lock
    assert json.loads((project / "metrics/train.json").read_text())["score"] == 3.0   # override applied
    assert "# tiny project" in (project / "params.yaml").read_text()                    # comments kept
    assert yaml.safe_load((project / "params.yaml").read_text())["distill"]["stage1"]["train"]["steps"] == 6

    metrics = _artifact("run-metrics")
    assert metrics is not None and "nested.psnr" in metrics.data
    gate = _artifact("gate-data")
    assert gate is not None and "expect_column_values_to_be_unique" in gate.data
    report = _artifact("report")
    assert report is not None and "score 3.0" in report.data
    params = _artifact("run-parameters")
    assert params is not None and "distill.stage1.train.steps" in params.data

    again = flows.evaluate_flow(str(project))    # evaluate+report only: the existing stages of that set
    assert [r["stage"] for r in again] == ["report"] and again[0]["skipped"]


def test_failing_stage_fails_flow_naming_stage(harness, project):
    toy(project, fail="train")
    state = flows.pipeline_flow(str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as err:
        state.result()
    assert err.value.stage == "train" and "DVC stage 'train' failed (its command exited with 3)" in str(err.value)
    assert "boom: loss is nan" in str(err.value)          # the tail of its output
    assert not (project / "reports/report.md").exists()


def test_failing_gate_fails_flow_naming_expectation(harness, project):
    toy(project, fail="gate")
    state = flows.pipeline_flow(str(project), targets=["validate_data"], return_state=True)
    assert state.is_failed()
    with pytest.raises(GateFailed, match=r"data: expect_column_values_to_be_unique\(id\)"):
        state.result()
    gate = _artifact("gate-data")
    assert gate is not None and "FAILED" in gate.description


def test_retry_only_transient_failures():
    from prefect.states import Failed

    retry = flows._retry_transient
    assert retry(None, None, Failed(data=StageFailed("train", "DVC stage 'train' failed")))
    assert not retry(None, None, Failed(data=GateFailed("validate_triplets", "gate failed")))
    assert not retry(None, None, Failed(data=flows.NotRetried("validate_captions", "failed")))


@pytest.mark.parametrize("jobs", [1, 2])   # dvc repro --single-item; the concurrent flow's task
def test_transient_failure_is_retried(harness, project, jobs):
    toy(project, flaky=True)
    results = flows.pipeline_flow(str(project), targets=["prepare"], jobs=jobs,
                                  overrides={"flows": {"retries": 1, "retry_delay_seconds": 0}})
    assert [r["stage"] for r in results] == ["prepare"]
    assert (project / ".tried").exists() and (project / "data/x.txt").read_text() == "x"


def test_profile_applied_and_unknown_profile_named(tmp_path):
    root = _make_project(tmp_path / "p")
    (root / "configs").mkdir()
    (root / "configs" / "smoke.yaml").write_text("distill:\n  stage1:\n    train:\n      steps: 1\n")
    record = flows.apply_parameters(root, "smoke", {"seed": 3})
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert raw["distill"]["stage1"]["train"]["steps"] == 1 and raw["seed"] == 3
    assert record["profile"] == "smoke" and "distill.stage1.train.steps" in record["params_diff_vs_head"]
    with pytest.raises(ValueError, match=r"profile 'nope'.*known profiles: \['default', 'smoke'\]"):
        flows.apply_parameters(root, "nope")


def test_a_bad_value_in_any_section_fails_before_any_stage_runs(tmp_path):
    from pipeline.config import ConfigError

    root = _make_project(tmp_path / "p")
    with pytest.raises(ConfigError, match=r"trajectories\.points_per_image: Input should be greater than or equal to 1"):
        flows.apply_parameters(root, None, {"trajectories.points_per_image": -5})
    assert yaml.safe_load((root / "params.yaml").read_text())["trajectories"]["points_per_image"] == 2   # put back
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("points_per_image: 2", "points_per_image: -5"))
    with pytest.raises(ConfigError, match=r"trajectories\.points_per_image"):
        flows.apply_parameters(root)          # no profile, no overrides: the workspace's file is checked too
    assert not (root / "data/x.txt").exists()


def test_the_flow_refuses_stages_on_several_machines(tmp_path):
    """Each machine must run a multi-machine stage's command at once; the flow starts it on one, so it says so
    before anything runs."""
    import yaml as _yaml

    from pipeline.flows import _refuse_machines
    from tests.params import REPO

    params = _yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(_yaml.safe_dump(params))
    _refuse_machines(str(tmp_path))                      # 1 machine: nothing to refuse
    params["launch"]["machines"] = 2
    (tmp_path / "params.yaml").write_text(_yaml.safe_dump(params))
    with pytest.raises(ValueError, match="launch.machines is 2"):
        _refuse_machines(str(tmp_path))
