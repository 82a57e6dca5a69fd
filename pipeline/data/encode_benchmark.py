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


STAGE = "stage1"


def run_benchmark(cfg: Config, bcfg: EncodeBenchmarkConfig, *, foundation: Path, teacher: Path, encoded: Path,
                  triplets: Path, captions: Path, rows: pd.DataFrame | None = None) -> dict:
    """Time stage-1 steps fed from cached shards and from on-the-fly encoding; returns the metrics dict.

    ``rows``: the joined triplets + captions table (default: read from ``triplets`` and ``captions``)."""
    split = SPLIT_OF[STAGE]
    rt = runtime(cfg)  # device and the frozen models' dtype; T5 included: the on-the-fly arm embeds prompts
    if rt.device.type == "cuda" and rt.device.index is not None:
        torch.cuda.set_device(rt.device)  # accelerate trains on the current CUDA device
    acc = Accelerator(mixed_precision=cfg.distill.accelerate_precision, cpu=rt.device.type == "cpu")
    pipe = rt.load_foundation(foundation)  # its VAE and text encoders serve the on-the-fly arm
    step = _Stage1Step(cfg, acc, pipe, rt.load_controlnet(teacher))
    with stopwatch() as load:
        cached = stage_data(encoded, STAGE, cfg.distill.stage1.prompt, condition=cfg.condition)
    df = joined(triplets, captions) if rows is None else rows
    df = df[df["split"] == split].set_index("id").loc[cached.split.ids].reset_index()  # the shards' row order
    feeds = _Feeds(cfg, pipe, cached, df, acc.device)
    rates = _rates(step, feeds, len(cached), bcfg)
    cached_rate = statistics.median(rates["cached"])
    fly_rate = statistics.median(rates["on_the_fly"])
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
        "on_the_fly_encode_seconds_per_step": statistics.median(feeds.encode_seconds) if feeds.encode_seconds else None,
        "shard_open_seconds": load.seconds,  # the split's index; rows are read per batch (in the timings)
        "split": split,
        "rows": len(cached),
        "image_size": cfg.data.image_size,
        "student_layers": step.student.config.num_layers,
        "teacher_layers": step.teacher.config.num_layers,
        "device": str(acc.device),
        "torch_threads": torch.get_num_threads(),
    }


class _Stage1Step:
    """The stage-1 training step as the trainer's Loop runs it: the student and DistillLoss
    (pipeline.distill.trainer.student_and_loss) with the frozen models placed as in training, the configured
    optimizer, prepared by accelerate."""

    def __init__(self, cfg: Config, acc: Accelerator, pipe, teacher):
        self.cfg, self.acc, self.teacher, self.train = cfg, acc, teacher, cfg.distill.stage1.train
        backbone = pipe.transformer
        empty = empty_prompt(pipe, cfg.text.max_sequence_length) if cfg.distill.prompt_dropout > 0 else None
        self.student, self.loss_fn = student_and_loss(cfg, STAGE, backbone, teacher, empty=empty)
        place_frozen(cfg, acc.device, backbone, teacher)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.model, self.opt = acc.prepare(self.student, make_optimizer(cfg.distill.optimizer, self.params,
                                                                        self.train.lr, self.train.weight_decay))
        self.model.train()

    def timed(self, make_batch, n: int, batch_size: int, first_step: int, steps: int) -> float:
        """Seconds of ``steps`` training steps from ``first_step`` (pipeline.training.train_step, as Loop runs
        them), step s on ``make_batch`` of its batch indices (batch_indices over ``n`` rows) with its noise
        (step_generator stream 2: a one-process run's first micro-batch)."""
        with stopwatch(self.acc.device) as t:
            for s in range(first_step, first_step + steps):
                batch = make_batch(batch_indices(n, batch_size, self.cfg.seed, s))
                train_step(self.acc, self.model, self.opt, self.params, self.loss_fn, batch,
                           step_generator(self.cfg.seed, s, stream=2), self.train.max_grad_norm)
        return t.seconds


class _Feeds:
    """Where a step's batch comes from, per arm: ``cached`` reads the rows from the encoded shards, as training
    reads them; ``on_the_fly`` reads the same rows' PNGs (``df``: in the shards' order) and encodes them,
    each encode's seconds appended to ``encode_seconds``."""

    def __init__(self, cfg: Config, pipe, cached, df: pd.DataFrame, device):
        self.cfg, self.pipe, self.cached, self.df, self.device = cfg, pipe, cached, df, device
        self.encode_seconds: list[float] = []

    def arms(self) -> dict:
        """Each arm's batch maker, by name, in the order a first round runs them."""
        return {"cached": self.cached_batch, "on_the_fly": self.on_the_fly_batch}

    def cached_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.cached.batch(idx).items()}

    def on_the_fly_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with stopwatch(self.device) as t:
            rows_t = encode_rows(self.pipe, self.df.iloc[idx.tolist()], cfg.data.image_size,
                                 cfg.text.max_sequence_length, cfg.condition)
        self.encode_seconds.append(t.seconds)
        return batch_from({k: v.to(self.device) for k, v in rows_t.items()}, cfg.distill.stage1.prompt,
                          cfg.condition)


def _rates(step: _Stage1Step, feeds: _Feeds, n: int, bcfg: EncodeBenchmarkConfig) -> dict[str, list[float]]:
    """One warm-up pass per arm (``warmup_steps`` steps; its encode times dropped), then ``repeats`` rounds
    that alternate which arm goes first, both arms on the same batch indices in a round (the same rows,
    encoded or loaded) -> each arm's samples per second per round."""
    arms = feeds.arms()
    for name, make in arms.items():
        step.timed(make, n, bcfg.batch_size, 0, bcfg.warmup_steps)
    feeds.encode_seconds.clear()
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(bcfg.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            secs = step.timed(arms[name], n, bcfg.batch_size, bcfg.warmup_steps + r * bcfg.steps, bcfg.steps)
            rates[name].append(bcfg.steps * bcfg.batch_size / max(secs, 1e-9))
    return rates
