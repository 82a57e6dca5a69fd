"""Train the 24-block SD3Transformer2DModel text-to-image (flow matching, SD3 timestep sampling and
weighting) and save the whole tiny world as an SD3 pipeline folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from pipeline.config import Config
from pipeline.foundation.data import TRAIN_SPLITS, encode_in_batches, pixels, scenes
from pipeline.foundation.text import build_text_components
from pipeline.models import flow
from pipeline.models.world import build_backbone, build_scheduler, drop_prompts, encode_prompts, text_pipeline
from pipeline.training import Loop, save_atomic


def train_backbone(cfg: Config, scenes_dir: Path, vae_dir: Path, out: Path, checkpoints: Path,
                   live: Path | None) -> dict:
    """Train into ``out`` (the whole pipeline folder) -> its metrics. Launched on several processes, every
    rank trains (DDP) and rank 0 alone saves and returns the metrics; the others return {}."""
    df = scenes(scenes_dir, TRAIN_SPLITS)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    comps = build_text_components(cfg, df)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, vae)
    scheduler = build_scheduler(cfg)
    tp = text_pipeline({**comps, "transformer": backbone, "scheduler": scheduler, "vae": vae})
    embeds, pooled = encode_prompts(tp, list(df["global_prompt"]), cfg.text.max_sequence_length)
    e0, p0 = encode_prompts(tp, [""], cfg.text.max_sequence_length)
    empty = {"prompt_embeds": e0[0], "pooled_prompt_embeds": p0[0]}
    images, _ = pixels(df, cfg.data.image_size)
    data = {"latents": encode_in_batches(vae, images)["latents"], "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled}
    train_sched = flow.training_scheduler(cfg.scheduler)

    def loss_fn(model, batch, gen):
        x0 = batch["latents"]
        s = flow.add_noise(x0, train_sched, cfg.scheduler, gen)
        pe, pp = drop_prompts(batch, cfg.backbone.prompt_dropout, gen, empty)
        pred = model(hidden_states=s.noisy, timestep=s.timesteps, encoder_hidden_states=pe,
                     pooled_projections=pp, return_dict=False)[0]
        return {"loss": flow.flow_loss(pred, flow.target(s, x0), s.weighting)}

    loop = Loop("backbone", backbone, data, loss_fn, cfg.backbone.train, cfg.seed, checkpoints,
                checkpoint_every=cfg.distill.checkpoint_every, keep_checkpoints=1, live_dir=live, fingerprint=f"{cfg.seed}{cfg.scheduler}{cfg.backbone.prompt_dropout}",
                frozen={"vae": vae, **empty}, device=cfg.runtime.device)
    result = loop.run()
    if not result.main:  # several processes trained it (DDP): rank 0 alone saves
        return {}
    backbone = loop.model.eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(transformer=backbone, scheduler=scheduler, vae=vae,
                                    text_encoder_3=None, tokenizer_3=None, **comps)
    save_atomic(pipe, out)
    return {"backbone_train_seconds": result.seconds, "backbone_final_loss": result.last.get("loss"),
            "backbone_samples_per_s": result.samples_per_second}
