"""pipeline/dvcgen.py: dvc.yaml's deps cannot drift from the code and params the stages read."""

import copy

import pytest
import yaml

from pipeline import dvcgen
from tests.params import REPO, full


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def code_deps(st: dict) -> list[str]:
    return [d for d in st["deps"] if d.endswith(".py") or d.startswith("digests") or d in ("pipeline", "stages")]


def test_dvc_yaml_is_generated_from_the_spec():
    assert (REPO / "dvc.yaml").read_text() == dvcgen.render(), "run `python -m pipeline.dvcgen`"


@pytest.mark.parametrize("doc", [_dvc_yaml, lambda: yaml.safe_load((REPO / "studies" / "dvc.yaml").read_text())])
def test_every_stage_depends_on_its_own_closure_digest_and_no_other_code(doc):
    """code_digests depends on all the code; every other stage on its stage module's digest file only."""
    for name, st in doc()["stages"].items():
        if name == "code_digests":
            assert st["cmd"] == "python -m pipeline.closure" and code_deps(st) == ["pipeline", "stages"]
            assert st["outs"] == [{"digests": {"cache": False}}]
            continue
        module = st["cmd"].split()[2]
        assert code_deps(st) == [f"digests/{module}.json"], name


def test_closure_follows_lazy_and_from_package_imports():
    closure = dvcgen.import_closure("stages.teacher")
    # pipeline/foundation/teacher.py: `from pipeline.models import flow, inpaint` (modules named in a from-import)
    assert {"pipeline/models/flow.py", "pipeline/models/inpaint.py", "pipeline/config.py"} <= set(closure)


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_params_deps_are_dotted_keys_that_exist():
    raw = full()
    for name, st in _dvc_yaml()["stages"].items():
        for key in st.get("params", []):
            keys = [key.replace("${item.variant}", v) for v in raw["ablations"]["variants"]] if "${" in key else [key]
            for k in keys:
                assert _has_key(raw, k), f"{name}: params dep {k!r} is not in params.yaml"


def test_stage2_settings_do_not_rerun_stage1_and_the_study_follows_the_headline_budget():
    stages = _dvc_yaml()["stages"]
    assert not any(p.startswith("distill.stage2") for p in stages["distill_stage1"]["params"])
    assert not any(p.startswith("distill.stage1") for p in stages["distill_stage2"]["params"])
    # every variant trains at the headline budget: all of distill, and the headline student it may reuse
    ablate = stages["ablate"]
    assert "distill" in ablate["params"] and "models/student" in ablate["deps"]


@pytest.mark.parametrize("stage", ["distill_stage1", "distill_stage2", "evaluate", "ablate"])
def test_model_stages_depend_on_the_mapping_module(stage):
    module = _dvc_yaml()["stages"][stage]["cmd"].split()[2]
    assert "pipeline/models/mapping.py" in dvcgen.import_closure(module)


def test_ablate_stage1_trains_full_stage1_once_per_headline_seed_for_the_runs_to_share():
    stages = _dvc_yaml()["stages"]
    s1 = stages["ablate_stage1"]
    assert s1["matrix"] == {"seed": "${ablations.headline_seeds}"}
    assert s1["cmd"] == "python -m stages.ablate_stage1 ${item.seed}"
    assert s1["outs"] == ["checkpoints/ablations/stage1-s${item.seed}"]
    data = [d for d in stages["distill_stage1"]["deps"] if d not in code_deps(stages["distill_stage1"])]
    assert [d for d in s1["deps"] if d not in code_deps(s1)] == [*data, "checkpoints/distill_stage1"]
    assert "ablations.variants.full" in s1["params"] and "distill.stage1" in s1["params"]
    assert not any(p.startswith("distill.stage2") for p in s1["params"]) and "seed" not in s1["params"]
    names = list(stages)
    for stage in ("ablate_headline", "ablate"):
        assert "checkpoints/ablations/stage1-s${item.seed}" in stages[stage]["deps"]
        assert names.index("ablate_stage1") < names.index(stage)


# ------------------------------------------------------------------------------------ studies/dvc.yaml

def _studies_yaml() -> dict:
    return yaml.safe_load((REPO / "studies" / "dvc.yaml").read_text())


def test_studies_dvc_yaml_is_generated_from_the_spec():
    assert (REPO / "studies" / "dvc.yaml").read_text() == dvcgen.render_studies(), "run `python -m pipeline.dvcgen`"
    assert set(dvcgen.outputs()) == {REPO / "dvc.yaml", REPO / "studies" / "dvc.yaml"}


def test_study_stages_run_at_the_root_on_their_closure_and_studies_params():
    doc = _studies_yaml()
    assert set(doc["stages"]) >= {"frontier", "frontier_latency", "prompt_encode", "prompt_stage1", "prompt_quality",
                                  "studies_report"}
    for name, st in doc["stages"].items():
        assert st["wdir"] == "..", name
        for p in st.get("params", []):
            if isinstance(p, dict):
                assert list(p) == ["studies/params.yaml"], name
            else:
                assert _has_key(full(), p), (name, p)
    fr = doc["stages"]["frontier"]
    assert fr["cmd"] == "python -m stages.study_frontier ${item.depth} ${item.af} ${item.seed}"
    assert set(fr["matrix"]) == {"depth", "af", "seed"}
    studies_params = yaml.safe_load((REPO / "studies" / "params.yaml").read_text())
    for v in fr["matrix"].values():
        assert _has_key(studies_params, v.strip("${}"))


def test_study_outputs_stay_out_of_the_main_pipeline_s_outputs_and_report_inputs():
    def paths(st, *keys):
        for k in keys:
            for e in st.get(k, []):
                yield next(iter(e)) if isinstance(e, dict) else e

    main = _dvc_yaml()["stages"]
    main_outs = {p for st in main.values() for p in paths(st, "outs", "metrics")}
    report_deps = set(main["report"]["deps"])
    for name, st in _studies_yaml()["stages"].items():
        for out in paths(st, "outs", "metrics"):
            for other in main_outs | report_deps:
                assert not (out == other or out.startswith(other + "/") or other.startswith(out + "/")), (name, out, other)
