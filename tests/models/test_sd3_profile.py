"""The real SD3 profile (issue 7), on CPU: configs/sd3.yaml validates; the pretrained-model loading code
runs end to end on the stand-ins of pipeline.models.standins (the real classes, saved in the real folder
layouts: SD3 pipeline folder with T5, alimama teacher folder, Qwen2.5-VL folder) as configs/sd3_local.yaml
describes them, the whole DAG included (slow); a mismatched or missing model fails with a clear message; the
23-layer teacher is injected 1:1 whatever diffusers is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models import standins
from pipeline.models.standins import build_teacher, hub_cache_layout, transformer_kwargs

from tests.params import REPO as ROOT  # noqa: E402


def sd3_raw(**overrides) -> dict:
    from pipeline.config import deep_merge
    from pipeline.profile import merged

    return deep_merge(merged("sd3"), overrides)


def sd3_cfg(**overrides):
    from pipeline.config import from_dict

    return from_dict(sd3_raw(**overrides), "sd3 test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The stand-ins, written as `python -m pipeline.models.standins DIR` writes them."""
    root = tmp_path_factory.mktemp("sd3local")
    paths = standins.write_standins(root / "standins")
    return {"root": root, "foundation": paths["foundation"], "teacher": paths["teacher"], "qwen": paths["captioner"]}


def local_raw(tiny, **more) -> dict:
    """configs/sd3_local.yaml over params.yaml, its workspace-relative model paths made absolute."""
    from pipeline.config import deep_merge
    from pipeline.profile import merged

    where = {"world": {"foundation": {"local_dir": str(tiny["foundation"])},
                       "teacher": {"local_dir": str(tiny["teacher"])}},
             "caption": {"qwen": {"model": str(tiny["qwen"])}}}
    return deep_merge(deep_merge(merged("sd3_local"), where), more)


def tiny_cfg(tiny, **more):
    from pipeline.config import from_dict

    return from_dict(local_raw(tiny, **more), "sd3_local test")


# ------------------------------------------------------------------------------------------- config


def test_sd3_profile_parses_and_validates():
    cfg = sd3_cfg()
    w = cfg.world
    assert w.source == "pretrained" and w.allow_download is False and w.require_t5
    assert w.foundation.repo == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert w.teacher.repo == "alimama-creative/SD3-Controlnet-Inpainting"
    assert (cfg.data.image_size, cfg.backbone.num_layers, cfg.teacher.num_layers, cfg.distill.student_layers) == \
        (1024, 24, 23, 12)
    assert cfg.text.max_sequence_length == 77          # as alimama trained the teacher (README: pipe(...=77))
    assert cfg.distill.prompt_dropout > 0               # CFG's unconditional branch distilled too
    assert cfg.distill.mixed_precision == "bf16" and cfg.distill.gradient_checkpointing
    cap = cfg.caption
    assert cap.backend == "qwen2_5_vl" and cap.qwen.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert sd3_cfg(data={"image_size": 512}).data.image_size == 512  # the documented option


def test_world_section_errors_name_the_key():
    from pipeline.config import ConfigError
    from pipeline.models.pretrained import world_config

    with pytest.raises(ConfigError, match=r"world\.source"):
        world_config(sd3_cfg(world={"source": "downloaded"}))
    with pytest.raises(ConfigError, match=r"world\.foundation\.revision: 'main' is not a commit sha"):
        world_config(sd3_cfg(world={"require_pinned": True}))
    # the default profile is the embedded world
    from pipeline.config import load
    from pipeline.models.pretrained import is_pretrained

    assert not is_pretrained(load(ROOT / "params.yaml"))


# ----------------------------------------------------------------------------------- resolve + check


def test_preflight_on_local_folders(tiny):
    from pipeline.models.pretrained import preflight

    world = preflight(tiny_cfg(tiny))
    assert world.foundation.how == world.teacher.how == "local_dir"
    assert world.captioner is not None and world.captioner.path == tiny["qwen"].resolve()
    assert world.transformer_config["joint_attention_dim"] == standins.T5_DIM
    assert world.transformer_config["num_layers"] == 24 and world.teacher_config["num_layers"] == 23


def test_sd3_local_is_sd3_with_the_standins():
    """configs/sd3_local.yaml extends sd3: every sd3 setting it does not override is sd3's, and what it
    overrides describes pipeline.models.standins (sizes, folder names), at 64-128 px, bf16 world."""
    from pipeline.config import from_dict
    from pipeline.profile import merged, profile_overrides

    sd3, local = merged("sd3"), merged("sd3_local")
    cfg = from_dict(local, "sd3_local")
    assert (cfg.world.source, cfg.world.dtype, cfg.caption.backend) == ("pretrained", "bfloat16", "qwen2_5_vl")
    assert cfg.world.foundation.repo == sd3["world"]["foundation"]["repo"]           # from sd3, not restated
    assert cfg.world.foundation.local_dir == f"standins/{standins.FOUNDATION_DIR}"
    assert cfg.world.teacher.local_dir == f"standins/{standins.TEACHER_DIR}"
    assert cfg.caption.qwen.model == f"standins/{standins.QWEN_DIR}"
    assert 64 <= cfg.data.image_size == standins.IMAGE_SIZE <= 128
    assert tuple(cfg.vae.block_out_channels) == standins.VAE_CHANNELS
    assert (cfg.backbone.num_layers, cfg.teacher.num_layers, cfg.distill.student_layers) == (24, 23, 12)
    assert (cfg.backbone.num_attention_heads, cfg.backbone.attention_head_dim) == (standins.HEADS, standins.HEAD_DIM)
    assert cfg.text.max_sequence_length == 77 and cfg.distill.prompt_dropout == sd3["distill"]["prompt_dropout"]
    assert "extends" not in profile_overrides("sd3_local") and "extends" not in local


def test_profile_extends_is_checked(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.profile import profile_overrides

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("extends: b\ndata: {image_size: 64}\n")
    (tmp_path / "configs" / "b.yaml").write_text("extends: a\nseed: 1\n")
    (tmp_path / "configs" / "c.yaml").write_text("extends: default\nseed: 2\n")
    (tmp_path / "configs" / "d.yaml").write_text("extends: c\ndata: {image_size: 64}\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        profile_overrides("a", tmp_path)
    assert profile_overrides("d", tmp_path) == {"seed": 2, "data": {"image_size": 64}}
    with pytest.raises(ConfigError, match="known profiles"):
        (tmp_path / "configs" / "e.yaml").write_text("extends: nope\n")
        profile_overrides("e", tmp_path)


def test_resolves_from_the_hub_cache_without_network(tiny, tmp_path, monkeypatch):
    from pipeline.models.pretrained import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    hub_cache_layout(tiny["foundation"], cache, "stabilityai/stable-diffusion-3-medium-diffusers", "a" * 40)
    hub_cache_layout(tiny["teacher"], cache, "alimama-creative/SD3-Controlnet-Inpainting", "b" * 40)
    cfg = tiny_cfg(tiny, world={"foundation": {"local_dir": None}, "teacher": {"local_dir": None},
                                "cache_dir": str(cache)})
    world = preflight(cfg, captioner=False)
    assert world.foundation.how == "hub_cache" and world.foundation.commit == "a" * 40
    assert world.teacher.commit == "b" * 40
    pinned = tiny_cfg(tiny, world={"foundation": {"local_dir": None, "revision": "a" * 40},
                                   "teacher": {"local_dir": None, "revision": "b" * 40},
                                   "cache_dir": str(cache), "require_pinned": True})
    assert preflight(pinned, captioner=False).teacher.path.name == "b" * 40


def test_missing_model_is_a_clear_error(tiny, tmp_path, monkeypatch):
    from pipeline.models.pretrained import ModelError, preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_cfg(tiny, world={"teacher": {"local_dir": str(tmp_path / "nowhere")}, "cache_dir": str(tmp_path / "hub")})
    with pytest.raises(ModelError) as exc:
        preflight(cfg)
    msg = str(exc.value)
    assert "teacher" in msg and "alimama-creative/SD3-Controlnet-Inpainting" in msg and "not found" in msg
    assert str(tmp_path / "nowhere") in msg and "huggingface-cli download" in msg


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


TEACHER_REPO = "teacher (alimama-creative/SD3-Controlnet-Inpainting@main)"
SD3_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"


@pytest.mark.parametrize("model,rel,changes,needle,repo", [
    ("teacher", "config.json", {"num_layers": 12}, "config.json: num_layers is 12, expected 23 (teacher.num_layers)",
     TEACHER_REPO),
    ("teacher", "config.json", {"extra_conditioning_channels": 0}, "extra_conditioning_channels is 0, expected 1",
     TEACHER_REPO),
    ("teacher", "config.json", {"joint_attention_dim": 64}, "joint_attention_dim is 64, expected 32", TEACHER_REPO),
    ("foundation", "vae/config.json", {"shift_factor": None}, "vae/config.json: shift_factor is missing", SD3_REPO),
    ("foundation", "vae/config.json", {"latent_channels": 4}, "latent_channels is 4, expected 16", SD3_REPO),
    ("foundation", "transformer/config.json", {"num_layers": 18},
     "num_layers is 18, expected 24 (backbone.num_layers)", SD3_REPO),
    ("foundation", "text_encoder_3/config.json", {"d_model": 64}, "d_model is 64, expected 32", SD3_REPO),
    ("foundation", "model_index.json", {"text_encoder_3": [None, None]},
     "components ['text_encoder_3'] are missing", SD3_REPO),
])
def test_mismatched_model_names_model_path_and_key(tiny, tmp_path, model, rel, changes, needle, repo):
    from pipeline.models.pretrained import ModelError, preflight

    bad = _copy(tiny[model], tmp_path / model)
    _edit_json(bad / rel, **changes)
    with pytest.raises(ModelError) as exc:
        preflight(tiny_cfg(tiny, world={model: {"local_dir": str(bad)}}))
    msg = str(exc.value)
    assert needle in msg and repo in msg and str(bad) in msg


def test_weights_that_contradict_the_config_are_caught(tiny, tmp_path):
    """A 22-layer teacher's weights under a config that says 23: caught from the safetensors headers."""
    from pipeline.models.pretrained import ModelError, preflight

    bad = build_teacher(tmp_path / "t22", num_layers=22)
    _edit_json(bad / "config.json", num_layers=23)
    with pytest.raises(ModelError, match=r"controlnet_blocks\.22\.weight has shape None"):
        preflight(tiny_cfg(tiny, world={"teacher": {"local_dir": str(bad)}}))


def test_wrong_captioner_folder(tiny):
    from pipeline.models.pretrained import ModelError, preflight

    cfg = tiny_cfg(tiny, caption={"qwen": {"model": str(tiny["teacher"])}})
    with pytest.raises(ModelError, match=r"captioner .*config\.json: model_type is None, expected 'qwen2_5_vl'"):
        preflight(cfg)


# -------------------------------------------------------------------------------------- load + stages


@pytest.mark.slow
def test_load_world_end_to_end_with_t5(tiny):
    """Loads the pipeline (T5 present) and teacher from the checked folders and runs the encode and
    teacher-controlled denoise path the distillation uses, at the profile's max_sequence_length."""
    from pipeline.models.controlled import Controlled
    from pipeline.models.pretrained import load_world
    from pipeline.models.world import empty_prompt, encode_prompts

    cfg = tiny_cfg(tiny)
    pipe, teacher = load_world(cfg, dtype="float32")
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    embeds, pooled = encode_prompts(pipe, ["a red circle", ""], cfg.text.max_sequence_length)
    assert embeds.shape == (2, 77 + 77, 32) and pooled.shape == (2, 32)
    assert embeds[:, 77:].abs().sum() > 0  # real T5 rows, not the zeros SD3 uses without T5
    empty = empty_prompt(pipe, cfg.text.max_sequence_length)  # what prompt dropout substitutes
    _, neg, _, neg_pooled = pipe.encode_prompt(prompt=["a red circle"], prompt_2=None, prompt_3=None,
                                               do_classifier_free_guidance=True, max_sequence_length=77)
    assert torch.equal(empty["prompt_embeds"], neg[0]) and torch.equal(empty["pooled_prompt_embeds"], neg_pooled[0])
    lat = torch.randn(2, 16, 8, 8)
    control = torch.randn(2, 17, 8, 8)
    out, res = Controlled(pipe.transformer, teacher, "one_to_one")(lat, torch.tensor([500.0, 20.0]), embeds,
                                                                    pooled, control)
    assert out.shape == lat.shape and len(res) == 23 and all(r.abs().sum() > 0 for r in res)


def test_foundation_stages_materialise_pretrained_models(tiny, tmp_path, monkeypatch):
    """vae / backbone / teacher link the checked models into models/* instead of training;
    what they write loads with the code the later stages use."""
    from diffusers import AutoencoderKL, SD3ControlNetModel

    from pipeline.models.world import load_foundation
    from stages import backbone, teacher, vae

    cfg_raw = local_raw(tiny)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg_raw))
    monkeypatch.chdir(tmp_path)
    for stage in (vae, backbone, teacher):
        assert stage.main([]) == 0
    vae_m = json.loads(Path("metrics/foundation/vae.json").read_text())
    assert vae_m["source"] == "pretrained" and vae_m["scaling_factor"] == pytest.approx(1.5305)
    assert vae_m["captioner"]["path"] == str(tiny["qwen"].resolve())
    assert json.loads(Path("metrics/foundation/teacher.json").read_text())["num_layers"] == 23
    for name in ("vae", "backbone", "teacher"):  # the stages' persistent outs exist, empty: nothing trained
        assert Path("checkpoints", name).is_dir() and Path("dvclive", name).is_dir()
    src = json.loads(Path("models/backbone/SOURCE.json").read_text())
    assert src["repo"] == "stabilityai/stable-diffusion-3-medium-diffusers" and src["resolved_from"] == "local_dir"
    assert Path("models/backbone/text_encoder_3/config.json").is_symlink()
    assert AutoencoderKL.from_pretrained("models/vae").config.latent_channels == 16
    assert SD3ControlNetModel.from_pretrained("models/teacher").config.num_layers == 23
    pipe = load_foundation(Path("models/backbone"))  # encode / evaluation: T5 loaded as the stock pipeline does
    assert len(pipe.transformer.transformer_blocks) == 24 and pipe.text_encoder_3 is not None
    assert load_foundation(Path("models/backbone"), with_t5=False).text_encoder_3 is None  # distillation


def test_teacher_loads_with_extra_conditioning_channels_passed_explicitly(tiny, tmp_path):
    """world.load_controlnet passes extra_conditioning_channels=1 (as diffusers loads the alimama teacher):
    a config.json without the key still checks (the 17-channel pos_embed_input weight decides) and loads
    as an inpainting ControlNet, not as a 16-channel one."""
    from pipeline.models.pretrained import preflight
    from pipeline.models.world import load_controlnet

    bare = _copy(tiny["teacher"], tmp_path / "teacher")
    _edit_json(bare / "config.json", extra_conditioning_channels=None)
    assert "extra_conditioning_channels" not in json.loads((bare / "config.json").read_text())
    preflight(tiny_cfg(tiny, world={"teacher": {"local_dir": str(bare)}}), captioner=False)
    cn = load_controlnet(bare)
    assert cn.config.extra_conditioning_channels == 1 and cn.pos_embed_input.proj.weight.shape[1] == 17


@pytest.mark.slow
def test_sd3_local_dag_runs_the_pretrained_path_end_to_end(tmp_path):
    """`make smoke-sd3`: a workspace of configs/sd3_local.yaml, its stand-ins written into it, `dvc repro`
    to the report on CPU. The models come from the pretrained path (resolved, checked, materialised with
    SOURCE.json), captions from the Qwen2.5-VL stand-in through Qwen2_5_VLProcessor, prompts with T5."""
    import pandas as pd

    from pipeline.profile import make_workspace

    ws = make_workspace("sd3_local", tmp_path / "ws")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_IGNORE_ISATTY": "1", "TQDM_DISABLE": "1",
           "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    subprocess.run([sys.executable, "-m", "pipeline.models.standins", "standins"], cwd=ws, env=env, check=True,
                   capture_output=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (ws / "reports/report.md").read_text().strip()
    for f in ("metrics/headline.json", "metrics/report.json", "metrics/eval/teacher.json", "metrics/eval/student.json",
              "metrics/distill/stage1.json", "metrics/distill/stage2.json", "metrics/benchmark.json"):
        assert json.loads((ws / f).read_text()), f
    for name, repo in (("vae", "stabilityai/stable-diffusion-3-medium-diffusers"),
                       ("backbone", "stabilityai/stable-diffusion-3-medium-diffusers"),
                       ("teacher", "alimama-creative/SD3-Controlnet-Inpainting")):
        src = json.loads((ws / "models" / name / "SOURCE.json").read_text())
        assert src["repo"] == repo and src["resolved_from"] == "local_dir", src
        assert Path(src["path"]).resolve().parent == (ws / "standins").resolve()
    assert json.loads((ws / "metrics/foundation/vae.json").read_text())["captioner"]["resolved_from"] == "local_dir"
    captions = pd.read_parquet(ws / "data/captions/captions.parquet")
    assert (captions["caption_source"] == "qwen2_5_vl").all()
    assert json.loads((ws / "metrics/gates/captions.json").read_text())["success"]
    from safetensors import safe_open

    shard = next((ws / "data/encoded/labelled").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("prompt_embeds").get_shape()[1:] == [77 + 77, standins.T5_DIM]  # CLIP + T5 at 77


def test_adamw8bit_switch(monkeypatch):
    from pipeline.training import make_optimizer

    assert sd3_cfg(distill={"optimizer": "adamw8bit"}).distill.optimizer == "adamw8bit"
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adamw", params, 1e-3, 0.0), torch.optim.AdamW)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    with pytest.raises(RuntimeError, match="adamw8bit needs bitsandbytes"):
        make_optimizer("adamw8bit", params, 1e-3, 0.0)


# ------------------------------------------------------------------------------------------ injection


def test_teacher_injection_is_the_old_one_to_one_rule_not_the_installed_one():
    """24-block backbone, 23-layer teacher: our injection == block i <- sample i (diffusers < 0.32, how
    alimama trained it; computed by hand with forward hooks), != passing the 23 samples to the installed
    diffusers (>= 0.32: block i <- sample int(i / (24/23)))."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    from pipeline.models.controlled import Controlled

    torch.manual_seed(0)
    kw = transformer_kwargs()
    backbone = SD3Transformer2DModel(num_layers=24, **kw).eval()
    teacher = SD3ControlNetModel(num_layers=23, extra_conditioning_channels=1, **kw).eval()
    with torch.no_grad():
        for blk in teacher.controlnet_blocks:
            blk.weight.normal_(0, 0.5)
        for p in teacher.pos_embed_input.parameters():
            p.normal_(0, 0.5)
    x, t = torch.randn(1, 16, 16, 16), torch.tensor([400.0])
    pe, pp, ctl = torch.randn(1, 10, 32), torch.randn(1, 32), torch.randn(1, 17, 16, 16)
    ctrl = Controlled(backbone, teacher, "one_to_one")
    assert ctrl.mapping == list(range(23)) + [None]
    with torch.no_grad():
        res = ctrl.control(x, t, pe, pp, ctl)
        ours = ctrl.denoise(x, t, pe, pp, res)
        # the old rule by hand: after block i (i < 23) add sample i, through hooks, no diffusers injection
        hooks = [blk.register_forward_hook(lambda m, a, out, i=i: (out[0], out[1] + res[i]))
                 for i, blk in enumerate(backbone.transformer_blocks[:23])]
        by_hand = backbone(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pp,
                           return_dict=False)[0]
        for h in hooks:
            h.remove()
        installed = backbone(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pp,
                             block_controlnet_hidden_states=res, return_dict=False)[0]
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)
    new_rule = [int(i / (24 / 23)) for i in range(23)]
    assert new_rule[:2] == [0, 0] and 22 not in new_rule  # where the rules differ
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__) >= Version("0.32"):
        assert (ours - installed).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ GPU smoke


@pytest.mark.slow
def test_gpu_smoke_dry_run_is_quick_and_clear():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", str(ROOT / "scripts/gpu_smoke.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dry run" in out.stdout and "teacher" in out.stdout and "params" in out.stdout


@pytest.mark.slow
def test_gpu_smoke_benchmark_code_runs_tiny_on_cpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts/gpu_smoke.py")
    gpu_smoke = sys.modules["gpu_smoke"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(gpu_smoke)
    res = gpu_smoke.benchmark(gpu_smoke.tiny_shape(), device="cpu", dtype=torch.float32, batch=1, repeats=1)
    assert {"teacher_controlnet_ms", "student_controlnet_ms", "teacher_step_ms", "student_step_ms",
            "train_step_ms", "train_samples_per_s"} <= set(res)
