"""One training loop for every model we train (VAE, backbone, teacher, students).

accelerate for devices, mixed precision, gradient accumulation and multi-process runs; AdamW with linear
warm-up and clipping; optional EMA; dvclive per-term logging; atomic checkpoints with resume.

Determinism: the batch indices and the noise of step s come from generators seeded by (seed, s), so
a run resumed from a checkpoint draws exactly what the uninterrupted run drew: on CPU their final
weights are equal. accelerate's saved RNG states are restored as well, for anything else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline.config import TrainLoop


class NonFiniteLoss(RuntimeError):
    pass


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch for ``step``: epochs of seeded permutations, so the data position is a
    function of the step alone."""
    if n == 0:
        raise ValueError("training data is empty")
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
    idx = perm[k * batch_size:(k + 1) * batch_size]
    if len(idx) < batch_size:  # fewer samples than one batch: wrap around
        idx = perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return idx


@dataclass
class LoopResult:
    steps: int
    seconds: float
    samples_per_second: float
    last: dict[str, float] = field(default_factory=dict)


@dataclass
class Loop:
    """``loss_fn(model, batch, generator) -> {"loss": total, <term>: value, ...}``."""

    name: str
    model: torch.nn.Module
    data: dict[str, torch.Tensor]
    loss_fn: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]]
    train: TrainLoop
    seed: int
    checkpoint_dir: Path
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    live_dir: Path | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = None
    log_every: int = 10
    max_steps_this_run: int | None = None  # stop early (for tests that simulate a kill)
    on_start: Callable[[Accelerator], None] | None = None
    # The params the loss depends on beyond ``train``; with the data and the initial weights, what the
    # checkpoints were made from: checkpoints made from anything else are discarded, not resumed.
    fingerprint: str = ""
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)

    def run(self) -> LoopResult:
        acc = Accelerator(
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            mixed_precision=self.mixed_precision,
            cpu=not torch.cuda.is_available(),
        )
        set_seed(self.seed)
        n = _length(self.data)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.name}: the model has no trainable parameters")
        opt = make_optimizer(self.optimizer, params, self.train.lr, self.train.weight_decay)
        warm = max(1, self.train.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        # The scheduler is not prepared: accelerate would step it once per process per call; ours counts
        # optimizer steps whatever the number of processes (the batch is global, split across them).
        model, opt = acc.prepare(self.model, opt)
        acc.register_for_checkpointing(sched)
        ema = _Ema(acc.unwrap_model(model), self.ema_decay) if self.ema_decay else None
        if ema:
            acc.register_for_checkpointing(ema)
        if self.on_start:
            self.on_start(acc)

        key = _fingerprint(self.fingerprint, self.train, {**self.data, **acc.unwrap_model(model).state_dict()})
        start = _resume(acc, self.checkpoint_dir, key)
        total = self.train.steps
        live = _live(self.live_dir, start, acc)
        end = total if self.max_steps_this_run is None else min(total, start + self.max_steps_this_run)
        micro = self.train.batch_size // acc.num_processes
        if micro < 1 or self.train.batch_size % acc.num_processes:
            raise ValueError(f"{self.name}: batch_size {self.train.batch_size} does not split over "
                             f"{acc.num_processes} processes")
        bar = tqdm(range(start, end), desc=self.name, initial=start, total=total,
                   disable=not acc.is_local_main_process)
        t0, last = time.perf_counter(), {}
        model.train()
        for step in bar:
            for k in range(self.gradient_accumulation_steps):
                idx = batch_indices(n, self.train.batch_size, self.seed, step * self.gradient_accumulation_steps + k)
                idx = idx[acc.process_index * micro:(acc.process_index + 1) * micro]
                batch = {key: v[idx].to(acc.device) for key, v in self.data.items()}
                gen = step_generator(self.seed, step * self.gradient_accumulation_steps + k,
                                     stream=2 + acc.process_index)
                with acc.accumulate(model), acc.autocast():
                    terms = self.loss_fn(model, batch, gen)
                    loss = terms["loss"]
                    if not torch.isfinite(loss).all():
                        bad = {k: float(v) for k, v in terms.items()}
                        raise NonFiniteLoss(
                            f"{self.name}: non-finite loss at step {step} ({bad}); stopped. The last good "
                            f"checkpoint is kept in {self.checkpoint_dir}"
                        )
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, self.train.max_grad_norm)
                    opt.step()
                    if acc.sync_gradients:
                        sched.step()
                    opt.zero_grad(set_to_none=True)
            if ema:
                ema.update(acc.unwrap_model(model))
            done = step + 1
            last = {k: float(v.detach()) for k, v in terms.items()}
            if live and (done % self.log_every == 0 or done == end):
                live.step = done
                for k, v in last.items():
                    live.log_metric(f"{self.name}/{k}", v)
                live.log_metric(f"{self.name}/lr", sched.get_last_lr()[0])
                elapsed = time.perf_counter() - t0
                live.log_metric(f"{self.name}/samples_per_s", (done - start) * self.train.batch_size
                                * self.gradient_accumulation_steps / max(elapsed, 1e-9))
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if done % self.checkpoint_every == 0 or done == end:
                _save(acc, self.checkpoint_dir, done, self.keep_checkpoints)
        seconds = time.perf_counter() - t0
        if live:
            live.end()
        acc.wait_for_everyone()
        final = acc.unwrap_model(model)
        if ema:
            ema.copy_to(final)
        self.model = final
        ran = end - start
        return LoopResult(end, seconds, ran * self.train.batch_size * self.gradient_accumulation_steps
                          / max(seconds, 1e-9), last)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("distill.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes; "
                               "a CUDA GPU); or set distill.optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, adamw8bit")


def _length(data: dict[str, torch.Tensor]) -> int:
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"training tensors differ in length: {lengths}")
    return next(iter(lengths.values()))


class _Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)

    def copy_to(self, model):
        model.load_state_dict(self.shadow, strict=False)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        self.shadow = {k: v.clone() for k, v in state.items()}


def _checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "DONE").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _fingerprint(extra: str, train: TrainLoop, tensors: dict[str, torch.Tensor]) -> str:
    """Params, training data and initial weights, summarised; checkpoints resume only under the same."""
    import hashlib

    h = hashlib.sha256(extra.encode())
    h.update(train.model_dump_json(exclude={"steps"}).encode())  # more steps may continue a run
    for k in sorted(tensors):
        v = tensors[k].detach()
        h.update(f"{k}{tuple(v.shape)}{float(v.double().sum()):.10e}{float(v.double().abs().sum()):.10e}".encode())
    return h.hexdigest()


def _resume(acc: Accelerator, root: Path, key: str) -> int:
    mark = root / "FINGERPRINT"
    if acc.is_main_process and root.exists() and (not mark.exists() or mark.read_text() != key):
        if _checkpoints(root):
            acc.print(f"{root}: checkpoints were made from other params or data; starting afresh")
        shutil.rmtree(root)
    acc.wait_for_everyone()
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        mark.write_text(key)
    ckpts = _checkpoints(root)
    if not ckpts:
        return 0
    acc.load_state(str(ckpts[-1]))
    step = json.loads((ckpts[-1] / "DONE").read_text())["step"]
    acc.print(f"resumed from {ckpts[-1]} (step {step})")
    return step


def _save(acc: Accelerator, root: Path, step: int, keep: int) -> None:
    """Write to a temporary folder, mark it complete, rename: a killed save leaves no half checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if acc.is_main_process:
        (tmp / "DONE").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _live(live_dir: Path | None, start: int, acc: Accelerator):
    if live_dir is None or not acc.is_main_process:
        return None
    from dvclive import Live

    live = Live(str(live_dir), resume=start > 0, dvcyaml=None, save_dvc_exp=False, report=None)
    live.step = start
    return live


def save_atomic(model, out: Path) -> None:
    """save_pretrained into a temporary sibling, then rename over ``out`` (as checkpoints are written)."""
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
