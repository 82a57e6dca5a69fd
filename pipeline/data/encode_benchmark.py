"""Stage-1 training throughput with cached shards vs encoding on the fly, side by side in one run.

Both arms run the stage-1 training step itself (pipeline.distill.trainer.DistillLoss through
pipeline.training.train_step, as the trainer's Loop runs it: autocast, backward, clipping, the configured
optimizer; the frozen models placed as in training) on the same batch indices; they differ only in where
the batch comes from:

* ``cached``: rows read from the encoded shards per batch (pipeline.distill.trainer.StageData), as training
  reads them;
* ``on_the_fly``: the same rows' PNGs read and encoded per step (pipeline.data.encode.encode_rows: VAE
  of the image and of the masked image, the text encoders on the local and global prompts).

One warm-up step per arm, then ``repeats`` rounds that alternate the arms (``steps`` steps each), so that
drift in the machine's load hits both; the rate reported is the median over rounds (samples/s).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator

from pipeline.config import Config, EncodeBenchmarkConfig
from pipeline.data.encode import encode_rows, joined
from pipeline.distill.trainer import SPLIT_OF, batch_from, place_frozen, stage_data, student_and_loss
from pipeline.models.world import empty_prompt
from pipeline.runtime import runtime
from pipeline.timing import stopwatch
from pipeline.training import batch_indices, make_optimizer, step_generator, train_step


def run_benchmark(cfg: Config, bcfg: EncodeBenchmarkConfig, *, foundation: Path, teacher: Path, encoded: Path,
                  triplets: Path, captions: Path, rows: pd.DataFrame | None = None) -> dict:
    """Time stage-1 steps fed from cached shards and from on-the-fly encoding; returns the metrics dict.

    ``rows``: the joined triplets + captions table (default: read from ``triplets`` and ``captions``)."""
    stage = "stage1"
    split = SPLIT_OF[stage]
    stage_cfg = cfg.distill.stage1
    rt = runtime(cfg)  # device and the frozen models' dtype; T5 included: the on-the-fly arm embeds prompts
    if rt.device.type == "cuda" and rt.device.index is not None:
        torch.cuda.set_device(rt.device)  # accelerate trains on the current CUDA device
    acc = Accelerator(mixed_precision=cfg.distill.accelerate_precision, cpu=rt.device.type == "cpu")
    device = acc.device
    pipe = rt.load_foundation(foundation)  # its VAE and text encoders serve the on-the-fly arm
    backbone = pipe.transformer
    teacher_model = rt.load_controlnet(teacher)
    empty = empty_prompt(pipe, cfg.text.max_sequence_length) if cfg.distill.prompt_dropout > 0 else None
    student, loss_fn = student_and_loss(cfg, stage, backbone, teacher_model, empty=empty)
    place_frozen(cfg, device, backbone, teacher_model)
    params = [p for p in student.parameters() if p.requires_grad]
    model, opt = acc.prepare(student, make_optimizer(cfg.distill.optimizer, params, stage_cfg.train.lr,
                                                     stage_cfg.train.weight_decay))
    model.train()

    with stopwatch() as load:
        cached = stage_data(encoded, stage, stage_cfg.prompt, condition=cfg.condition)
    df = joined(triplets, captions) if rows is None else rows
    df = df[df["split"] == split].set_index("id").loc[cached.split.ids].reset_index()  # the shards' row order
    n = len(cached)
    encode_seconds: list[float] = []

    def cached_batch(idx):
        return {k: v.to(device) for k, v in cached.batch(idx).items()}

    def on_the_fly_batch(idx):
        with stopwatch(device) as t:
            rows_t = encode_rows(pipe, df.iloc[idx.tolist()], cfg.data.image_size, cfg.text.max_sequence_length,
                                 cfg.condition)
        encode_seconds.append(t.seconds)
        return batch_from({k: v.to(device) for k, v in rows_t.items()}, stage_cfg.prompt, cfg.condition)

    def timed(make_batch, first_step: int, steps: int) -> float:
        """Seconds of ``steps`` training steps (pipeline.training.train_step, as Loop runs them)."""
        with stopwatch(device) as t:
            for s in range(first_step, first_step + steps):
                batch = make_batch(batch_indices(n, bcfg.batch_size, cfg.seed, s))
                train_step(acc, model, opt, params, loss_fn, batch, step_generator(cfg.seed, s, stream=2),
                           stage_cfg.train.max_grad_norm)
        return t.seconds

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
        "shard_open_seconds": load.seconds,  # the split's index; rows are read per batch (in the timings)
        "split": split,
        "rows": n,
        "image_size": cfg.data.image_size,
        "student_layers": student.config.num_layers,
        "teacher_layers": teacher_model.config.num_layers,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
