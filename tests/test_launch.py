"""pipeline/launch.py through the stage entry point: one setting (params ``launch``, REFINE_LAUNCH_* in the
environment) decides how many processes a model stage runs on; a model stage asked for two starts two
torchrun ranks from its plain ``python -m`` command, every other kind runs once, one process spawns nothing;
and a pretrained profile on a machine without an accelerator stops before a model stage writes."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline import launch
from pipeline.config import ConfigError, LaunchConfig, from_dict
from pipeline.entry import KINDS, LAUNCHED, ON_DEVICE, Stage
from tests import launch_probe
from tests.params import REPO, full

STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")
SPLIT = {"caption", "encode", "trajectories", "distill", "evaluate", "ablate", "ablate_stage1"}
PRETRAINED = {"world": {"source": "pretrained",
                        "foundation": {"repo": "stabilityai/stable-diffusion-3-medium-diffusers", "revision": None,
                                       "local_dir": None},
                        "teacher": {"repo": "alimama-creative/SD3-Controlnet-Inpainting", "revision": None,
                                    "local_dir": None}}}


def _params(tmp_path, overrides: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full(overrides)))
    return str(path)


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if the entry point starts a launcher."""
    def refuse(*a, **k):
        raise AssertionError(f"launched: {a}")
    monkeypatch.setattr(launch, "run_launched", refuse)
    for key in [k for k in os.environ if k.startswith(launch.ENV)] + ["WORLD_SIZE", "LOCAL_RANK"]:
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------------------------------ the setting

def test_environment_overrides_name_themselves(monkeypatch, no_launch):
    cfg = from_dict(full({"launch": {"processes": 2}}))
    monkeypatch.setenv("REFINE_LAUNCH_MACHINES", "3")
    monkeypatch.setenv("REFINE_LAUNCH_MACHINE_RANK", "1")
    s = launch.settings(cfg)
    assert (s.processes, s.machines, s.machine_rank, s.world_size) == (2, 3, 1, 6)
    monkeypatch.setenv("REFINE_LAUNCH_PROCESSES", "eight")
    with pytest.raises(ConfigError, match=r"REFINE_LAUNCH_PROCESSES=eight.*launch\.processes: Input should be"):
        launch.settings(cfg)


def test_torchrun_command_one_machine_standalone_several_static():
    one = LaunchConfig(processes=8)
    assert launch.torchrun_args(one, "stages.encode", ["--shard", "0/1"]) == \
        ["--nproc_per_node=8", "--standalone", "-m", "stages.encode", "--shard", "0/1"]
    two = LaunchConfig(processes=8, machines=2, machine_rank=1, main_address="10.0.0.1", main_port=29600)
    assert launch.torchrun_args(two, "stages.distill", ["stage1"]) == \
        ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29600",
         "-m", "stages.distill", "stage1"]


# ------------------------------------------------------------------------------------------ the launch

def _probe(tmp_path, kind: str, processes: int, *extra: str) -> tuple[subprocess.CompletedProcess, int, dict]:
    """`python -m tests.launch_probe` as a DVC stage's cmd runs: (its result, its pid, what each body wrote)."""
    out = tmp_path / f"{kind}-{processes}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(launch.ENV) and k not in ("WORLD_SIZE", "LOCAL_RANK")}
    env.update(PROBE_KIND=kind, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    params = _params(tmp_path, {"launch": {"processes": processes}, "runtime": {"device": "cpu"}})
    proc = subprocess.Popen([sys.executable, "-m", "tests.launch_probe", "--params", params, "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    ranks = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")} if out.exists() else {}
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), proc.pid, ranks


def test_a_model_stage_asked_for_two_processes_runs_two_ranks_from_its_plain_command(tmp_path):
    """`python -m MODULE` (a DVC cmd, unchanged) with launch.processes 2: torchrun starts two ranks, each runs
    the body once with its own RANK / LOCAL_RANK, and the process that was started runs no body itself."""
    done, pid, ranks = _probe(tmp_path, "model", 2)
    assert done.returncode == 0, done.stderr
    assert "launch: torchrun --nproc_per_node=2 --standalone -m tests.launch_probe" in done.stderr
    assert sorted(ranks) == ["0", "1"]  # no "none": the launching process did not run the body
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for _, r in sorted(ranks.items())] == \
        [("0", "0", "2"), ("1", "1", "2")]
    assert len({r["pid"] for r in ranks.values()} | {pid}) == 3
    assert all(r["device"] == "cpu" for r in ranks.values())


def test_a_failing_rank_gives_its_own_exit_code_and_message(tmp_path):
    done, _, ranks = _probe(tmp_path, "model", 2, "--fail-rank", "1", "--code", "2")
    assert done.returncode == 2 and sorted(ranks) == ["0", "1"]
    assert "launch_probe: rank 1 failed on purpose" in done.stderr


@pytest.mark.parametrize("kind", sorted(set(KINDS) - LAUNCHED))
def test_every_other_kind_runs_once_in_the_process_started(tmp_path, kind):
    done, pid, ranks = _probe(tmp_path, kind, 2)
    assert done.returncode == 0, done.stderr
    assert list(ranks) == ["none"] and ranks["none"]["pid"] == pid and ranks["none"]["WORLD_SIZE"] is None
    assert "torchrun" not in done.stderr


def test_one_process_spawns_nothing_and_a_rank_never_relaunches(tmp_path, monkeypatch, no_launch):
    main = launch_probe.main
    assert main.kind == "model" and main.module == "tests.launch_probe"
    assert main(["--params", _params(tmp_path, {}), "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "none.json").read_text())
    assert one["pid"] == os.getpid() and one["WORLD_SIZE"] is None
    # a process started by a launcher (torchrun, accelerate launch by hand) runs the body, whatever launch says
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["--params", _params(tmp_path, {"launch": {"processes": 2}}), "--out", str(tmp_path / "rank")]) == 0
    assert json.loads((tmp_path / "rank" / "1.json").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("name", STAGES)
def test_stages_that_cannot_split_run_on_one_process(name):
    """Benchmarks (a measurement is one process's), gates and reports never start several ranks; the
    issue's distributed stages (captions, encoding, trajectories, training, evaluation, ablations) do."""
    kind = importlib.import_module(f"stages.{name}").main.kind
    if "benchmark" in name or "latency" in name or name.startswith("validate_") or name.endswith("report"):
        assert kind not in LAUNCHED, name
    if name in SPLIT:
        assert kind in LAUNCHED, name


# ------------------------------------------------------------------------------------------ no silent CPU

@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as one without an accelerator, whatever it has."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("module, argv", [("encode", []), ("distill", ["stage1"])])
@pytest.mark.parametrize("processes", [1, 2])
def test_pretrained_auto_on_a_cpu_machine_stops_before_the_stage_writes(tmp_path, monkeypatch, cpu_only, no_launch,
                                                                         capsys, module, argv, processes):
    params = _params(tmp_path, {**PRETRAINED, "launch": {"processes": processes}})
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    main = importlib.import_module(f"stages.{module}").main
    capsys.readouterr()  # the import's library warnings
    rc = main([*argv, "--params", params])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"{module}: the models are pretrained"), err
    for found in (f"torch {torch.__version__}", "torch.cuda.is_available() = False", "runtime.device: cpu"):
        assert found in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before == ["params.yaml"]  # nothing written


def test_the_check_runs_before_any_body_and_only_where_networks_run(tmp_path, cpu_only, no_launch, capsys):
    ran = []
    params = _params(tmp_path, PRETRAINED)
    for kind in KINDS:
        rc = Stage("probe", "doc", lambda args, cfg, k=kind: ran.append(k), kind=kind)(["--params", params])
        assert rc == (2 if kind in ON_DEVICE else 0)
    assert ran == [k for k in KINDS if k not in ON_DEVICE]
    # on purpose: runtime.device cpu (configs/sd3_local.yaml) runs
    cpu = _params(tmp_path, {**PRETRAINED, "runtime": {"device": "cpu"}})
    assert Stage("probe", "doc", lambda args, cfg: ran.append("cpu"), kind="model")(["--params", cpu]) == 0
    assert ran[-1] == "cpu"


def test_sd3_local_runs_on_the_cpu_on_purpose_and_sd3_refuses_it(cpu_only):
    from pipeline.device import require_accelerator
    from pipeline.profile import merged

    local = from_dict(merged("sd3_local"))
    assert (local.world.source, local.runtime.device) == ("pretrained", "cpu")
    require_accelerator(local)
    with pytest.raises(ConfigError, match="refusing to run them on the CPU"):
        require_accelerator(from_dict(merged("sd3")))
    require_accelerator(from_dict(full()))  # the embedded tiny world runs on the CPU as it always has


def test_flows_run_a_launching_stage_alone_and_leave_the_rest_as_they_were(tmp_path, monkeypatch, no_launch):
    """A flow runs each stage's own command (the launch is in it); a model stage that starts several ranks
    holds every device, so the concurrent scheduler runs it alone."""
    from pipeline.orchestration.concurrent import is_exclusive
    from pipeline.orchestration.dag import Stage as DagStage
    from pipeline.orchestration.settings import launches_ranks

    _params(tmp_path, {})
    assert launches_ranks(tmp_path)("python -m stages.encode") is False   # one process: nothing changes
    _params(tmp_path, {"launch": {"processes": 2}})
    launches = launches_ranks(tmp_path)
    assert [launches(f"python -m stages.{s}") for s in ("encode", "distill stage1", "scenes", "benchmark")] == \
        [True, True, False, False]
    assert launches("python -c 'print(1)'") is False
    stage = lambda cmd: DagStage("x", "x", cmd, ())
    assert is_exclusive(stage("python -m stages.evaluate"), launches)
    assert not is_exclusive(stage("python -m stages.report"), launches)


def test_encode_from_its_dvc_cmd_on_two_processes_writes_the_one_process_shards(micro_world, tmp_path):
    """The whole chain: the encode stage's dvc.yaml cmd, unchanged, with launch.processes 2 -> torchrun, two
    gloo ranks that split the rows (pipeline/distributed.py) -> the shards one process writes, byte for byte."""
    import pandas as pd

    from pipeline.config import deep_merge
    from tests.conftest import MICRO

    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["encode"]["cmd"]
    assert cmd == "python -m stages.encode"
    ws = tmp_path / "ws"
    batches = {"runtime": {"encode_batch_size": 4}, "launch": {"processes": 2}}  # several micro-batches a rank
    (ws / "data/captions").mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(full(deep_merge(MICRO, batches))))
    for src, dst in ((micro_world["scenes"], "data/triplets"), (micro_world["foundation"], "models/backbone")):
        (ws / dst).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, ws / dst)
    scenes = pd.read_parquet(micro_world["scenes"] / "manifest.parquet")
    scenes[["id", "split", "local_prompt", "global_prompt"]].to_parquet(ws / "data/captions/captions.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launch.ENV) and k not in ("WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    run = lambda **extra: subprocess.run([sys.executable, *cmd.split()[1:]], cwd=ws, env={**env, **extra},
                                         capture_output=True, text=True, timeout=300)
    one = run(REFINE_LAUNCH_PROCESSES="1")
    assert one.returncode == 0 and "torchrun" not in one.stderr, one.stderr[-3000:]
    (ws / "data/encoded").rename(ws / "data/encoded_one")
    two = run()
    assert two.returncode == 0, two.stderr[-3000:]
    assert "launch: torchrun --nproc_per_node=2 --standalone -m stages.encode" in two.stderr
    files = [sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())
             for d in (ws / "data/encoded_one", ws / "data/encoded")]
    assert files[0] == files[1] and files[0]
    for name in files[0]:
        assert (ws / "data/encoded_one" / name).read_bytes() == (ws / "data/encoded" / name).read_bytes(), name
