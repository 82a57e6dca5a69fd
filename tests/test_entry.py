"""pipeline/entry.py, the one entry point of the stages/ modules: command line, params.yaml, exit codes
(0 done, 1 a check failed, 2 bad input, each failure one ``NAME: message`` on stderr)."""

import importlib
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.closure import import_closure
from pipeline.entry import KINDS, CheckFailed, Stage, arg, stage
from pipeline.validation.cli import gate
from pipeline.validation.gx import GateError
from tests.params import REPO, full

STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")


def _params(tmp_path, overrides: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full(overrides)))
    return str(path)


def test_a_bad_params_key_exits_2_naming_the_stage_and_the_key(tmp_path, capsys):
    from stages import scenes

    rc = scenes.main(["--params", _params(tmp_path, {"data": {"bogus_key": 1}}), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("scenes: ") and "data.bogus_key: unknown key" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # the body never ran


def test_a_failing_gate_exits_1_with_its_message_and_a_passing_one_counts(tmp_path, capsys):
    @gate("fake", "A gate.", arg("--fail", action="store_true"))
    def main(args, cfg):
        if args.fail:
            raise GateError("gate 'fake' failed: expect_nothing(id)")
        return {"evaluated": 3}

    assert main(["--fail", "--out-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "test_entry: gate 'fake' failed: expect_nothing(id)\n"
    assert main(["--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"validate_fake: passed 3 expectations -> {tmp_path}/fake.json\n"


def test_a_gate_on_a_missing_file_is_bad_input(tmp_path, capsys):
    from stages import validate_triplets

    rc = validate_triplets.main(["--params", str(REPO / "params.yaml"), "--manifest", str(tmp_path / "none.parquet"),
                                 "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("validate_triplets: ") and "none.parquet" in err


def test_check_failed_exits_1_bad_input_2_and_anything_else_propagates(capsys):
    raised = {"check": CheckFailed("too weak"), "value": ValueError("no such level"),
              "missing": FileNotFoundError("models/teacher"), "bug": KeyError("oops")}

    @stage("A stage.", arg("what"))
    def main(args, cfg):
        raise raised[args.what]

    assert main(["check"]) == 1 and capsys.readouterr().err == "test_entry: too weak\n"
    assert main(["value"]) == 2 and capsys.readouterr().err == "test_entry: no such level\n"
    assert main(["missing"]) == 2 and capsys.readouterr().err == "test_entry: models/teacher\n"
    with pytest.raises(KeyError):
        main(["bug"])


def test_bad_input_from_inside_a_library_keeps_its_traceback(capsys):
    import json

    @stage("A stage.")
    def main(args, cfg):
        json.loads("{")      # a ValueError raised in the standard library, not by the project

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "json" in err and err.splitlines()[-1].startswith("test_entry: Expecting")
    with pytest.raises(ValueError, match="kind 'gpu'"):
        stage("A stage.", kind="gpu")(lambda args, cfg: None)


def test_python_m_stage_help_and_error_lines_name_the_module(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *argv: subprocess.run([sys.executable, "-m", "stages.scenes", *argv], cwd=REPO, env=env,
                                       capture_output=True, text=True, timeout=120)
    helped = run("--help")
    assert helped.returncode == 0 and "DVC stage `scenes`" in helped.stdout
    assert "--params" in helped.stdout and "--out" in helped.stdout
    failed = run("--params", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out"))
    assert failed.returncode == 2 and failed.stderr.startswith("scenes: "), failed.stderr
    assert "missing.yaml" in failed.stderr and "Traceback" not in failed.stderr


def test_the_runner_imports_nothing_heavy():
    """Every stage's code deps hold the runner's closure: pipeline.config (in all of them), pipeline.atomic,
    the launcher (with pipeline.threads: its ranks' thread shares) and the device policy (its no-silent-CPU
    check; imported by stages that run networks only)."""
    assert import_closure("pipeline.entry") == ["pipeline/__init__.py", "pipeline/atomic.py", "pipeline/config.py",
                                                "pipeline/device.py", "pipeline/entry.py", "pipeline/launch.py",
                                                "pipeline/threads.py"]
    code = "import sys, pipeline.entry; print(sorted({'torch', 'diffusers', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_module_declares_its_main_and_parses_help(name, capsys):
    mod = importlib.import_module(f"stages.{name}")
    main = mod.main
    assert isinstance(main, Stage) and main.name == name and main.kind in KINDS
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--params" in out and mod.__doc__.splitlines()[0] in out
    studies = mod.__doc__.startswith("studies/dvc.yaml")
    assert ("--studies" in out) == studies
    # studies code stays out of the main stages' code deps (pipeline/study_stage.py, not pipeline/entry.py)
    assert ("pipeline/study_stage.py" in import_closure(f"stages.{name}")) == studies
