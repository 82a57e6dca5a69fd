"""Shared fixtures: a micro tiny-world workspace built by the real stage functions (seconds, not minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_IGNORE_ISATTY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The micro models gain nothing from a second thread, and two torch processes each spinning two threads on
# two cores slow each other down many times over (tests beside a training run, or beside each other).
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))

MICRO = {
    "seed": 0,
    "data": {"image_size": 16, "splits": {"labelled": 12, "unlabelled": 12, "val": 4, "test": 6, "world": 24},
             "max_objects": 2},
    "text": {"vocab_size": 400, "tokenizer_max_length": 24, "max_sequence_length": 2, "hidden_size": 16,
             "projection_dim": 16, "num_hidden_layers": 1},
    "vae": {"block_out_channels": [16, 16], "train": {"steps": 2, "batch_size": 4, "lr": 1e-3}},
    "backbone": {"num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 8,
                 "train": {"steps": 2, "batch_size": 4, "lr": 1e-3}},
    "teacher": {"num_layers": 5, "train": {"steps": 2, "batch_size": 4, "lr": 1e-3}},
    "distill": {"student_layers": 3, "checkpoint_every": 2, "keep_checkpoints": 2,
                "stage1": {"train": {"steps": 4, "batch_size": 4, "lr": 1e-3}},
                "stage2": {"train": {"steps": 2, "batch_size": 4, "lr": 1e-3}, "loss": {"task": 0.0}}},
    "evaluate": {"num_images": 4, "num_inference_steps": 2},
    # params are validated with every ablation variant merged in: the depth variants must fit 6 blocks
    "ablations": {"variants": {v: {"overrides": {"distill": {"student_layers": 3}}} for v in ("layers_10", "layers_15")}},
}


def micro_config(**overrides):
    from pipeline.config import deep_merge
    from tests.params import config

    return config(deep_merge(MICRO, overrides))


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> dict:
    """scenes, VAE, foundation (SD3 pipeline folder), a teacher whose control projections carry weights,
    and encoded shards: every path the distillation stages read, under one temporary root."""
    from pipeline.data.encode import encode_dataset
    from pipeline.data.images import load_manifest
    from pipeline.data.synthetic import generate_scenes
    from pipeline.foundation.backbone import train_backbone
    from pipeline.foundation.teacher import train_teacher
    from pipeline.foundation.vae import train_vae
    from pipeline.models.world import load_foundation

    root = tmp_path_factory.mktemp("micro")
    cfg = micro_config()
    from tests.params import full

    (root / "params.yaml").write_text(yaml.safe_dump(full(MICRO)))
    p = {k: root / v for k, v in dict(scenes="data/scenes", vae="models/vae", foundation="models/foundation",
                                      teacher="models/teacher", encoded="data/encoded").items()}
    generate_scenes(cfg.data, cfg.seed, p["scenes"], progress=False)
    train_vae(cfg, p["scenes"], p["vae"], root / "ck/vae", None)
    train_backbone(cfg, p["scenes"], p["vae"], p["foundation"], root / "ck/backbone", None)
    train_teacher(cfg, p["scenes"], p["foundation"], p["teacher"], root / "ck/teacher", None)
    # Two training steps leave the teacher's zero-initialised projections nearly zero: give them weights,
    # so that distillation has residuals to match.
    from diffusers import SD3ControlNetModel

    teacher = SD3ControlNetModel.from_pretrained(p["teacher"])
    torch.manual_seed(1)
    with torch.no_grad():
        for blk in teacher.controlnet_blocks:
            blk.weight.normal_(0, 0.05)
        for prm in teacher.pos_embed_input.parameters():
            prm.normal_(0, 0.05)
    teacher.save_pretrained(p["teacher"])
    pipe = load_foundation(p["foundation"])
    encode_dataset(pipe, load_manifest(p["scenes"] / "manifest.parquet"), p["encoded"], cfg.data.image_size,
                   cfg.text.max_sequence_length)
    return {"root": root, "cfg": cfg, **p}
