"""Stage-1 training throughput with cached shards vs encoding on the fly, side by side in one run.

Both arms run the same stage-1 step (pipeline.distill.trainer.DistillLoss, a forward/backward through the
student-controlled backbone, the teacher without grad, an AdamW step on the student) on the same batch
indices; they differ only in where the batch comes from:

* ``cached``: rows of the loaded encoded shards (pipeline.data.shards.load_split), as training reads them;
* ``on_the_fly``: the same rows' PNGs read and encoded per step (pipeline.data.encode.encode_rows: VAE
  of the image and of the masked image, the text encoders on the local and global prompts).

One warm-up step per arm, then ``repeats`` rounds that alternate the arms (``steps`` steps each), so that
drift in the machine's load hits both; the rate reported is the median over rounds (samples/s).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from diffusers import SD3ControlNetModel

from pipeline.config import Config, EncodeBenchmarkConfig
from pipeline.data.encode import encode_rows, joined
from pipeline.data.shards import load_split
from pipeline.distill.trainer import SPLIT_OF, DistillLoss, build_student
from pipeline.models import inpaint
from pipeline.models.world import load_foundation
from pipeline.training import batch_indices, step_generator



def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_from(t: dict[str, torch.Tensor], prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Shard tensors (or encode_rows output) -> the stage-1 batch DistillLoss takes (as trainer.stage_data)."""
    p = "" if prompt == "local" else "global_"
    t = {k: v.to(device) for k, v in t.items()}
    return {"latents": t["latents"], "control": inpaint.control_input(t["masked_latents"], t["mask"]),
            "mask": t["mask"], "prompt_embeds": t[f"{p}prompt_embeds"],
            "pooled_prompt_embeds": t[f"{p}pooled_prompt_embeds"]}


def run_benchmark(cfg: Config, bcfg: EncodeBenchmarkConfig, *, foundation: Path, teacher: Path, encoded: Path,
                  triplets: Path, captions: Path, rows: pd.DataFrame | None = None) -> dict:
    """Time stage-1 steps fed from cached shards and from on-the-fly encoding; returns the metrics dict.

    ``rows``: the joined triplets + captions table (default: read from ``triplets`` and ``captions``)."""
    stage = "stage1"
    split = SPLIT_OF[stage]
    stage_cfg = cfg.distill.stage1
    device = _device(bcfg.device)
    pipe = load_foundation(foundation).to(device)
    backbone = pipe.transformer.requires_grad_(False)
    teacher_model = SD3ControlNetModel.from_pretrained(teacher).to(device).eval().requires_grad_(False)
    student = build_student(cfg, backbone, None).to(device).train()
    loss_fn = DistillLoss(cfg, stage, stage_cfg, backbone, teacher_model, student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage_cfg.train.lr, weight_decay=stage_cfg.train.weight_decay)

    t_load = time.perf_counter()
    ids, cached = load_split(encoded, split)
    load_seconds = time.perf_counter() - t_load
    df = joined(triplets, captions) if rows is None else rows
    df = df[df["split"] == split].set_index("id").loc[ids].reset_index()  # the shards' row order
    n = len(ids)
    encode_seconds: list[float] = []

    def cached_batch(idx):
        return _batch_from({k: v[idx] for k, v in cached.items()}, stage_cfg.prompt, device)

    def on_the_fly_batch(idx):
        t0 = time.perf_counter()
        t = encode_rows(pipe, df.iloc[idx.tolist()], cfg.data.image_size, cfg.text.max_sequence_length)
        _sync(device)
        encode_seconds.append(time.perf_counter() - t0)
        return _batch_from(t, stage_cfg.prompt, device)

    def train_step(step: int, make_batch) -> float:
        idx = batch_indices(n, bcfg.batch_size, cfg.seed, step)
        batch = make_batch(idx)
        terms = loss_fn(student, batch, step_generator(cfg.seed, step, stream=2))
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, stage_cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(terms["loss"].detach())

    def timed(make_batch, first_step: int, steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for s in range(first_step, first_step + steps):
            train_step(s, make_batch)
        _sync(device)
        return time.perf_counter() - t0

    arms = {"cached": cached_batch, "on_the_fly": on_the_fly_batch}
    for name, make in arms.items():
        timed(make, 0, bcfg.warmup_steps)
    encode_seconds.clear()
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(bcfg.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]   # alternate which arm goes first
        for name in order:
            # same batch indices for both arms in a round: the same rows, encoded or loaded
            secs = timed(arms[name], bcfg.warmup_steps + r * bcfg.steps, bcfg.steps)
            rates[name].append(bcfg.steps * bcfg.batch_size / max(secs, 1e-9))
    cached_rate = statistics.median(rates["cached"])
    fly_rate = statistics.median(rates["on_the_fly"])
    encode_per_step = statistics.median(encode_seconds) if encode_seconds else None
    return {
        "cached_samples_per_s": cached_rate,
        "on_the_fly_samples_per_s": fly_rate,
        "speedup": cached_rate / fly_rate if fly_rate > 0 else None,
        "batch_size": bcfg.batch_size,
        "steps": bcfg.steps,
        "repeats": bcfg.repeats,
        "warmup_steps": bcfg.warmup_steps,
        "cached_samples_per_s_rounds": rates["cached"],
        "on_the_fly_samples_per_s_rounds": rates["on_the_fly"],
        "on_the_fly_encode_seconds_per_step": encode_per_step,
        "shard_load_seconds": load_seconds,
        "split": split,
        "rows": n,
        "image_size": cfg.data.image_size,
        "student_layers": student.config.num_layers,
        "teacher_layers": teacher_model.config.num_layers,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
