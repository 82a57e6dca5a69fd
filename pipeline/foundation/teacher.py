"""Train the 23-layer SD3 ControlNet (the teacher) on the frozen backbone, with the stock pipeline's
control input for params ``condition`` (pipeline.models.condition.prepare_control: inpaint's masked image
+ mask, or edges' edge map) and the 1:1 layer-to-block mapping the alimama teacher was trained with. The
teacher's loss is SD3's plain flow-matching MSE under either condition."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.foundation.data import TRAIN_SPLITS, encode_in_batches, pixels, scenes
from pipeline.models import condition as conditions
from pipeline.models import flow
from pipeline.models.controlled import Controlled
from pipeline.models.mapping import TEACHER_CONVENTION
from pipeline.models.student import controlnet_from_backbone
from pipeline.models.world import drop_prompts, encode_prompts, load_foundation
from pipeline.runtime import dtype_for
from pipeline.training import Loop, save_atomic


def train_teacher(cfg: Config, scenes_dir: Path, foundation_dir: Path, out: Path, checkpoints: Path,
                  live: Path | None) -> dict:
    """Train into ``out`` -> its metrics. Launched on several processes, every rank trains (DDP) and rank 0
    alone saves and returns the metrics; the others return {}."""
    pipe = load_foundation(foundation_dir)
    df = scenes(scenes_dir, TRAIN_SPLITS)
    images, masks = pixels(df, cfg.data.image_size)
    enc = encode_in_batches(pipe.vae, images, masks, condition=cfg.condition)
    embeds, pooled = encode_prompts(pipe, list(df["local_prompt"]), cfg.text.max_sequence_length)
    e0, p0 = encode_prompts(pipe, [""], cfg.text.max_sequence_length)
    empty = {"prompt_embeds": e0[0], "pooled_prompt_embeds": p0[0]}
    data = {"latents": enc["latents"], "control": enc["control"],
            "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    torch.manual_seed(cfg.seed)
    teacher = controlnet_from_backbone(pipe.transformer, cfg.teacher.num_layers, cfg.condition)
    ctrl = Controlled(pipe.transformer, teacher, TEACHER_CONVENTION)
    train_sched = flow.training_scheduler(cfg.scheduler)

    def loss_fn(model, batch, gen):
        x0 = batch["latents"]
        s = flow.add_noise(x0, train_sched, cfg.scheduler, gen)
        pe, pp = drop_prompts(batch, cfg.teacher.prompt_dropout, gen, empty)
        res = ctrl.control(s.noisy, s.timesteps, pe, pp, batch["control"], controlnet=model)
        pred = ctrl.denoise(s.noisy, s.timesteps, pe, pp, res)
        return {"loss": flow.flow_loss(pred, flow.target(s, x0), s.weighting)}

    loop = Loop("teacher", teacher, data, loss_fn, cfg.teacher.train, cfg.seed, checkpoints,
                checkpoint_every=cfg.distill.checkpoint_every, keep_checkpoints=1, live_dir=live, fingerprint=f"{cfg.seed}{cfg.scheduler}{cfg.teacher.prompt_dropout}",
                # the frozen backbone follows the teacher, in the runtime policy's dtype there
                on_start=lambda acc: pipe.transformer.to(acc.device, dtype_for(cfg, acc.device)),
                frozen={"backbone": pipe.transformer, "vae": pipe.vae, **empty}, device=cfg.runtime.device)
    result = loop.run()
    if not result.main:  # several processes trained it (DDP): rank 0 alone saves
        return {}
    save_atomic(loop.model.eval(), out)
    return {"teacher_train_seconds": result.seconds, "teacher_final_loss": result.last.get("loss"),
            "teacher_samples_per_s": result.samples_per_second}
