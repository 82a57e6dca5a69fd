"""pipeline/runtime.py: every model-running stage runs where the runtime policy says, in its dtype; the
default policy (CPU, float32) changes no output; training reads encoded rows lazily with the same batches."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from pipeline.config import deep_merge
from pipeline.data.shards import EncodedSplit, load_split
from pipeline.runtime import dtype_for, resolve_device, runtime
from tests.conftest import MICRO, micro_config
from tests.params import full

# Small budgets for the stages that measure or ablate; the teacher gate reports only (2 training steps).
STAGE_PARAMS = deep_merge(MICRO, {
    "teacher": {"gate_min_gain_db": None},
    "benchmark": {"batch_size": 2, "warmup": 0, "repeats": 1, "extra_layers": [2]},
    "encode_benchmark": {"steps": 1, "batch_size": 2, "repeats": 1, "warmup_steps": 0},
})
BF16_CPU = {"runtime": {"device": "cpu", "cpu_dtype": "bfloat16", "sample_batch_size": 2}}


def test_device_and_dtype_policy():
    cfg = micro_config()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == (torch.accelerator.current_accelerator().type
                                           if torch.accelerator.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto"):
        resolve_device("gpu")
    assert dtype_for(cfg, torch.device("cpu")) == torch.float32                      # runtime.cpu_dtype
    assert dtype_for(cfg, torch.device("cuda")) == getattr(torch, cfg.world.dtype)  # world.dtype on accelerators
    assert dtype_for(micro_config(**BF16_CPU), torch.device("cpu")) == torch.bfloat16


def test_a_launched_rank_runs_on_the_gpu_of_its_local_rank(monkeypatch):
    """Under a launcher (LOCAL_RANK set), auto and cuda resolve to cuda:LOCAL_RANK, so N ranks use N GPUs;
    cuda:i would pile them onto one and is refused. One process and the CPU resolve as before."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")  # one process: as before
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="under a launcher: every rank would use that one GPU"):
        resolve_device("cuda:0")


@contextlib.contextmanager
def spy_models(monkeypatch):
    """Record (model class, its parameters' dtype and device, trainable) at every call of a model."""
    calls: list[tuple[str, torch.dtype, torch.device, bool]] = []

    def wrap(cls, method):
        orig = getattr(cls, method)

        def spied(self, *a, **k):
            p = next(self.parameters())
            calls.append((cls.__name__, p.dtype, p.device, any(q.requires_grad for q in self.parameters())))
            return orig(self, *a, **k)
        monkeypatch.setattr(cls, method, spied)

    for cls, method in ((SD3Transformer2DModel, "forward"), (SD3ControlNetModel, "forward"),
                        (CLIPTextModelWithProjection, "forward"), (AutoencoderKL, "encode"),
                        (AutoencoderKL, "decode")):
        wrap(cls, method)
    yield calls


@pytest.fixture(scope="module")
def workspace_factory(micro_world, tmp_path_factory):
    """A workspace in the layout the DVC stages read (pipeline.paths), on the micro world's models."""

    def make(name: str, overrides: dict) -> Path:
        root = tmp_path_factory.mktemp(name)
        (root / "params.yaml").write_text(yaml.safe_dump(full(deep_merge(STAGE_PARAMS, overrides))))
        for src, dst in ((micro_world["scenes"], "data/scenes"), (micro_world["scenes"], "data/triplets"),
                         (micro_world["foundation"], "models/backbone"), (micro_world["teacher"], "models/teacher")):
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, root / dst)
        scenes = pd.read_parquet(micro_world["scenes"] / "manifest.parquet")
        (root / "data/captions").mkdir(parents=True)
        scenes[["id", "split", "local_prompt", "global_prompt"]].to_parquet(root / "data/captions/captions.parquet")
        return root
    return make


def run_model_stages(ws: Path) -> None:
    """Every stage that runs a model, as `dvc repro` runs them (their main functions, in the workspace)."""
    from stages import ablate, benchmark, distill, encode, encode_benchmark, evaluate, trajectories, validate_teacher

    with contextlib.chdir(ws):
        for stage, argv in ((encode, []), (validate_teacher, []), (trajectories, []), (distill, ["stage1"]),
                            (distill, ["stage2"]), (evaluate, []), (ablate, ["full", "1"]), (benchmark, []),
                            (encode_benchmark, [])):
            assert stage.main(argv) == 0, stage.main.name


def test_every_model_stage_runs_on_the_policy_device_and_dtype(workspace_factory, monkeypatch):
    ws = workspace_factory("bf16", BF16_CPU)
    with spy_models(monkeypatch) as calls:
        run_model_stages(ws)
    seen = {c[0] for c in calls}
    assert seen == {"SD3Transformer2DModel", "SD3ControlNetModel", "CLIPTextModelWithProjection", "AutoencoderKL"}
    frozen = {(name, dtype, dev) for name, dtype, dev, trainable in calls if not trainable}
    assert frozen and all(d == torch.bfloat16 and dev == torch.device("cpu") for _, d, dev in frozen), frozen
    # the trained student keeps float32 weights (its optimizer's); only it is trainable here
    assert {(n, d) for n, d, _, trainable in calls if trainable} == {("SD3ControlNetModel", torch.float32)}
    lat = load_file(str(next((ws / "data/encoded/labelled").glob("*.safetensors"))))["latents"]
    assert lat.dtype == torch.bfloat16  # encoded by the bf16 VAE, stored as computed


def test_default_policy_changes_no_output(micro_world, workspace_factory):
    """Float32 on the CPU: the encode stage writes what the plain loaders and one batch of 256 wrote (the
    micro world's shards, made before any policy), and training on the lazily read shards ends with the
    same weights as training on the split held in memory."""
    from pipeline.distill import trainer
    from stages import distill, encode

    ws = workspace_factory("default", {})
    with contextlib.chdir(ws):
        assert encode.main([]) == 0 and distill.main(["stage1"]) == 0
    for split in ("labelled", "unlabelled", "val", "test"):
        ids, got = load_split(ws / "data/encoded", split)
        ref_ids, ref = load_split(micro_world["encoded"], split)
        assert ids == ref_ids and all(torch.equal(got[k], ref[k]) for k in ref), split

    eager = []

    def in_memory(encoded_dir, stage, prompt, trajectories=None, condition="inpaint"):  # the old storage: the whole split as tensors
        from pipeline.training import TensorData

        _, t = load_split(encoded_dir, trainer.SPLIT_OF[stage], trainer.shard_keys(prompt, condition=condition))
        eager.append(stage)
        return TensorData(trainer.batch_from(t, prompt, condition))

    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(ws):
        mp.setattr(trainer, "stage_data", in_memory)
        trainer.distill(micro_config(), "stage1", foundation=Path("models/backbone"), teacher=Path("models/teacher"),
                        encoded=Path("data/encoded"), out=Path("eager"), checkpoints=Path("ck_eager"), live=None)
    assert eager == ["stage1"]
    lazy = load_file(str(ws / "models/student_stage1/diffusion_pytorch_model.safetensors"))
    ref = load_file(str(ws / "eager/diffusion_pytorch_model.safetensors"))
    assert lazy.keys() == ref.keys() and all(torch.equal(lazy[k], ref[k]) for k in ref)


def test_sampling_micro_batches_change_memory_not_noise(micro_world):
    from pipeline.evaluation.evaluate import TEACHER, evaluate_models
    from pipeline.data.images import load_manifest

    df = load_manifest(micro_world["scenes"] / "manifest.parquet")
    df = df[df["split"] == "test"].head(4)
    outs = {}
    for micro in (4, 1):
        cfg = micro_config(runtime={"sample_batch_size": micro}, evaluate={"num_samples": 4})
        ev = evaluate_models(cfg, runtime(cfg).load_foundation(micro_world["foundation"]),
                             {TEACHER: micro_world["teacher"]}, df)
        outs[micro] = ev[TEACHER].samples
    assert len(outs[1]) == 4
    torch.testing.assert_close(outs[1], outs[4], rtol=0, atol=1e-5)  # batched matmuls differ in the last bits


def test_lazy_split_gathers_the_rows_of_the_whole_split(micro_world, tmp_path):
    """EncodedSplit reads exactly the rows load_split holds, in batch order, across shards; its digest
    names the files' bytes."""
    split = EncodedSplit(micro_world["encoded"], "labelled")
    ids, full_split = load_split(micro_world["encoded"], "labelled")
    assert split.ids == ids
    idx = torch.tensor([5, 0, 5, len(ids) - 1])
    got = split.gather(idx)
    assert all(torch.equal(got[k], full_split[k][idx]) for k in full_split)
    import shutil

    shutil.copytree(micro_world["encoded"] / "labelled", tmp_path / "labelled")
    assert EncodedSplit(tmp_path, "labelled").digest() == split.digest()
    shard = next((tmp_path / "labelled").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's last row
    shard.write_bytes(bytes(data))
    assert EncodedSplit(tmp_path, "labelled").digest() != split.digest()


def test_memory_benchmark_measures_each_run_in_its_own_process(workspace_factory):
    import json

    from pipeline.config import load
    from stages import memory_benchmark

    ws = workspace_factory("memory", {"runtime": {"encode_batch_size": 4},
                                      "memory_benchmark": {"rows": 8, "factor": 4, "steps": 1, "batch_size": 2}})
    with contextlib.chdir(ws):
        assert memory_benchmark.main([]) == 0
        m = json.loads(Path("metrics/memory_benchmark.json").read_text())
    assert m["rows"] == [8, 32] and m["bounded"] and m["max_ratio"] == load(ws / "params.yaml").memory_benchmark.max_ratio
    for arm in ("encode", "stage1", "eager_load"):
        assert m[arm]["8"]["peak_rss_mib"] > 100 and m[arm]["ratio"] > 0  # a torch process, measured
    assert m["shard_mib"]["32"] > 3 * m["shard_mib"]["8"]
