"""End to end: the real DAG on the smoke profile, run by the Prefect flow in a separate DVC workspace."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flows import dvc_stages, pipeline_flow
    from pipeline.orchestration.dag import product_stages
    from pipeline.profile import make_workspace

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    ws = make_workspace("smoke", tmp_path_factory.mktemp("smoke") / "ws")
    with prefect_test_harness(server_startup_timeout=120):
        ran = pipeline_flow(workspace=str(ws))
    # the flow without targets runs the root dvc.yaml (studies/dvc.yaml runs when targeted: make studies)
    return ws, ran, [s.name for s in product_stages(dvc_stages(ws))]


def finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from finite_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_flow_ran_every_stage_in_dag_order(smoke):
    ws, ran, stages = smoke
    assert [r["stage"] for r in ran] == stages
    assert {"scenes", "vae", "backbone", "teacher", "validate_teacher", "distill_stage1", "distill_stage2"} <= set(stages)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "-q", "dvc.yaml"], cwd=ws, capture_output=True,
                            text=True)
    assert status.returncode == 0, status.stdout + status.stderr


def test_gate_metrics_exist_and_are_finite(smoke):
    ws, _, _ = smoke
    vae = json.loads((ws / "metrics/foundation/vae.json").read_text())
    gate = json.loads((ws / "metrics/gates/teacher.json").read_text())
    for key in ("vae_val_psnr",):
        assert math.isfinite(vae[key])
    for key in ("teacher_psnr", "teacher_ssim", "teacher_psnr_masked", "backbone_only_psnr", "backbone_only_psnr_masked"):
        assert math.isfinite(gate[key]), key
    for path in (ws / "metrics").rglob("*.json"):
        for v in finite_numbers(json.loads(path.read_text())):
            assert math.isfinite(v), path


def test_stock_pipeline_loads_backbone_with_teacher_and_student(smoke):
    import torch
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline

    from pipeline.config import load
    from pipeline.data.images import load_manifest, open_image

    ws, _, _ = smoke
    cfg = load(ws / "params.yaml")
    size = cfg.data.image_size
    scenes = load_manifest(ws / "data/scenes/manifest.parquet")
    first = scenes[scenes["split"] == "test"].iloc[0]
    image, mask = open_image(first["image"]), open_image(first["mask"])
    for model in ("teacher", "student"):
        pipe = StableDiffusion3ControlNetInpaintingPipeline.from_pretrained(
            ws / "models/backbone", controlnet=SD3ControlNetModel.from_pretrained(ws / "models" / model),
            text_encoder_3=None, tokenizer_3=None)
        out = pipe("a red circle", control_image=image, control_mask=mask, height=size, width=size,
                   num_inference_steps=2, guidance_scale=1.0, max_sequence_length=cfg.text.max_sequence_length,
                   generator=torch.Generator().manual_seed(0)).images[0]
        assert out.size == (size, size)


def _dvc(ws, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # stages' python
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True, check=True,
                          env=env)


def _changed(ws) -> set[str]:
    return {name.split("@")[0] for name in json.loads(_dvc(ws, "status", "--json", "dvc.yaml").stdout)}


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_docstring_and_comment_edits_rerun_no_stage(smoke):
    """A docstring in pipeline/config.py (every stage's closure) and one in a distill module, and a comment:
    only the code-digest stage is out of date, and `dvc repro` reruns it alone."""
    ws, _, _ = smoke
    edits = {ws / "pipeline/config.py": ('"""', '"""Edited. '), ws / "pipeline/distill/losses.py": ("\n", "\n# edited\n")}
    before = {p: p.read_text() for p in edits}
    try:
        for p, (old, new) in edits.items():
            p.write_text(before[p].replace(old, new, 1))
        assert _changed(ws) == {"code_digests"}
        assert _ran(_dvc(ws, "repro", "dvc.yaml").stdout) == {"code_digests"}
        assert _changed(ws) == set()
    finally:
        for p, text in before.items():
            p.write_text(text)
        _dvc(ws, "repro", "code_digests")
    assert _changed(ws) == set()


@pytest.mark.parametrize("module", ["pipeline/models/inpaint.py", "pipeline/models/mapping.py",
                                    "pipeline/distill/losses.py", "pipeline/validation/gx.py"])
def test_a_code_edit_reruns_exactly_the_stages_whose_closure_holds_it(smoke, module):
    from pipeline.closure import import_closure

    ws, _, _ = smoke
    path = ws / module
    before = path.read_text()
    path.write_text(before + "\nEDITED = 1\n")
    try:
        assert _changed(ws) == {"code_digests"}     # DVC sees the code; the digests say which stages it reaches
        _dvc(ws, "repro", "code_digests")
        changed = _changed(ws)
    finally:
        path.write_text(before)
        _dvc(ws, "repro", "code_digests")
    spec = __import__("yaml").safe_load((ws / "dvc.yaml").read_text())["stages"]
    importers = {name for name, st in spec.items()
                 if name != "code_digests" and module in import_closure(st["cmd"].split()[2], ws)}
    assert importers and changed == importers
    assert _changed(ws) == set()


def test_documented_sweep_runs_as_a_dvc_experiment(smoke):
    """Last in this module: it changes the workspace. `dvc exp run -S` rewrites params.yaml; the file must
    still validate (no value a rewrite reinterprets) and `dvc exp show` must stay readable."""
    from pipeline.config import load

    ws, _, _ = smoke
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "smoke run"], cwd=ws, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # stages' python
    run = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "distill.stage1.train.steps=8",
                          "-n", "steps8"], cwd=ws, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cfg = load(ws / "params.yaml")
    assert cfg.distill.stage1.train.steps == 8 and cfg.distill.mixed_precision == "fp32"
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=ws,
                                      capture_output=True, text=True, check=True).stdout)
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    runs = [r for e in exps for r in e.get("revs", [])]
    steps8 = [r for r in runs if r.get("name") == "steps8"]
    assert steps8, shown
    params = steps8[0]["data"]["params"]["params.yaml"]["data"]
    assert params["distill"]["stage1"]["train"]["steps"] == 8
    assert "metrics/headline.json" in steps8[0]["data"]["metrics"]
    table = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--md"], cwd=ws,
                           capture_output=True, text=True, check=True).stdout
    header = table.splitlines()[0]
    assert len(header) < 2000, header   # 27,615 characters before the metrics were split
