"""One training loop for every model we train (VAE, backbone, teacher, students).

accelerate for devices, mixed precision, gradient accumulation and multi-process runs; AdamW with linear
warm-up and clipping; optional EMA (diffusers' EMAModel); dvclive per-term logging; atomic checkpoints with
resume.

Determinism: an optimizer step s trains on a global batch of ``batch_size x gradient_accumulation_steps``
samples drawn by a generator seeded by (seed, s), cut into micro-batches; micro-batch j draws its noise
from a generator seeded by (seed, s, j). Which process or accumulation round handles micro-batch j does not
change what it draws, so a run resumed from a checkpoint equals the uninterrupted run (on CPU bit for bit),
and a 2-process run equals a 1-process run with 2 accumulation rounds up to float summation order.

Resume: checkpoints carry a key of everything they were made from (params, data, initial weights, frozen
models, code) except the number of steps, and a run resumes only from checkpoints with its own key: the
newest readable one whose step is at most its own total. Prefix rule: a longer run with otherwise the same
key continues a shorter one's checkpoints, and a shorter one resumes a longer one's checkpoint at or below
its total (those above belong to the longer run and are left alone). Sound because nothing a step does
depends on the total: the lr schedule is warm-up then constant (no decay to the run's end), EMA warm-up
counts steps from the start, and step s's batch and noise are drawn from (seed, s) alone, so the first N
steps of any longer run are the N-step run. ``Loop.prefixes`` widens this to other runs' checkpoint folders
(a prefix pool): one with this run's key is copied in (never moved) when it is further along than this
run's own checkpoints, so variants that share a prefix train it once (pipeline.distill.ablation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline.config import TrainLoop
from pipeline.threads import follow as follow_threads

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

_PARENT = os.getppid()  # at import: if it differs later, the parent died before die_with_parent() ran


class NonFiniteLoss(RuntimeError):
    pass


class CorruptCheckpoint(RuntimeError):
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


def code_digest(modules: tuple[str, ...] = ()) -> str:
    """The digest (pipeline.closure.files_digest: normalised source, so comments and docstrings do not
    count) of every project module (pipeline.*, stages.*) this process has loaded, or, given ``modules``,
    of their import closures: DVC reruns a stage when its code changes, and a fixed loss or model must then
    not resume the old code's checkpoints. The closure does not depend on what else the process loaded, so
    two stages that train the same way (distill_stage1 and the ablation runs) compute the same key and can
    share checkpoints."""
    from pipeline.closure import files_digest, import_closure

    root = Path(__file__).resolve().parent.parent
    files = {(root / f).resolve() for m in modules for f in import_closure(m, root)}
    for module in [] if modules else list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and Path(f).suffix == ".py":
            p = Path(f).resolve()
            if p.is_relative_to(root / "pipeline") or p.is_relative_to(root / "stages"):
                files.add(p)
    return files_digest(files, root)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies, so that killing `dvc` (or
    a launcher) never leaves a training process racing a rerun on the same checkpoint folder."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()})", file=sys.stderr)
    elif os.getppid() != _PARENT:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


@dataclass
class LoopResult:
    """Figures of the training that produced the weights (over all resumed sessions, as stored in the last
    checkpoint): seconds spent training and samples per second over them, the last step's loss terms."""

    steps: int
    seconds: float
    samples_per_second: float
    last: dict[str, float] = field(default_factory=dict)
    main: bool = True  # this is the main process: the only one that should write outputs
    prefix_steps: int = 0  # steps of the weights copied from a prefix root (Loop.prefixes); steps - this: trained here


class Data(Protocol):
    """Training rows as Loop reads them: a batch is gathered per micro-batch (so a dataset on disk need not
    fit in memory), and ``digest`` names the data in the checkpoint key."""

    def __len__(self) -> int: ...
    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def digest(self) -> str: ...


class TensorData:
    """Rows of in-memory tensors (the tiny world's foundation stages)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"training tensors differ in length: {lengths}")
        self.tensors, self.n = tensors, next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.tensors.items()):
            _hash_tensor(h, f"data/{name}", t)
        return h.hexdigest()


@dataclass
class _Session:
    """One Loop.run, set up (Loop._prepare): the accelerator, the prepared model (wrapped under several
    processes) and optimizer, the lr schedule, the trainable parameters, the EMA (None without one), the
    number of training rows and the samples per micro-batch on each process."""

    acc: Accelerator
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    ema: EMAModel | None
    n: int
    micro: int


@dataclass
class _Clock:
    """The training time of the weights: this session's, since it started at step ``start``, plus
    ``before``, the sessions' before it (the resumed checkpoint's record)."""

    start: int
    per_step: int  # global samples per optimizer step
    before: float
    t0: float = field(default_factory=time.perf_counter)

    def rate(self, done: int) -> float:
        """This session's samples per second up to step ``done``."""
        return (done - self.start) * self.per_step / max(time.perf_counter() - self.t0, 1e-9)

    def record(self, done: int, last: dict[str, float], info: dict) -> dict:
        """Step ``done``'s DONE record: seconds and samples per second over every session that trained these
        weights (stored so that a rerun that finds the run finished returns them instead of a zero-step
        session's), the last terms, and the prefix the weights came from (kept from ``info``, the last)."""
        seconds = self.before + time.perf_counter() - self.t0
        return {"step": done, "seconds": seconds, "samples_per_s": done * self.per_step / max(seconds, 1e-9),
                "last": last, **{k: info[k] for k in ("prefix_steps", "prefix") if k in info}}


@dataclass
class Loop:
    """``loss_fn(model, batch, generator) -> {"loss": total, <term>: value, ...}``. ``data``: a dict of
    tensors or any ``Data`` (pipeline.distill.trainer reads encoded shards lazily)."""

    name: str
    model: torch.nn.Module
    data: dict[str, torch.Tensor] | Data
    loss_fn: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]]
    train: TrainLoop
    seed: int
    checkpoint_dir: Path
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    live_dir: Path | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = None  # None: no EMA
    log_every: int = 10
    max_steps_this_run: int | None = None  # stop early (for tests that simulate a kill)
    on_start: Callable[[Accelerator], None] | None = None
    # The params the loss depends on beyond ``train`` and this loop's own settings (a string of them).
    fingerprint: str = ""
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    # Models (or tensors) the loss reads but does not train (teacher, backbone, VAE): part of the key.
    frozen: dict[str, torch.nn.Module | torch.Tensor] = field(default_factory=dict)
    # The runtime policy's device (pipeline.runtime): "cpu" trains on the CPU; otherwise accelerate places
    # each process on its accelerator (cuda:i is honoured by a single process).
    device: torch.device | str = "auto"
    # Checkpoint folders of other runs (a prefix pool): before resuming, the newest checkpoint (step <= this
    # run's steps) of one whose FINGERPRINT is this run's key is copied into checkpoint_dir when it is
    # further along than checkpoint_dir's own. The roots are only read.
    prefixes: list[Path] = field(default_factory=list)
    # Modules whose import closures are the code part of the key (code_digest); empty: every project module
    # this process has loaded.
    code: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = TensorData(self.data)

    def run(self) -> LoopResult:
        """Train to ``train.steps`` (at most ``max_steps_this_run`` more steps), from the newest usable
        checkpoint of this run's key (a prefix's when further along); every process runs it. Leaves the trained
        weights (the EMA's, with one) in ``self.model``; returns the figures of the last checkpoint."""
        die_with_parent()
        acc = self._accelerator()
        micro = self._micro_batch(acc.num_processes)
        # Hashed before anything moves or trains the models; only the main process compares keys.
        key = self.key() if acc.is_main_process else ""
        if self.on_start:
            self.on_start(acc)
        self._freeze_unused(acc)
        session = self._prepare(acc, micro)
        start, info = self._resume(session, key)
        total = self.train.steps
        end = total if self.max_steps_this_run is None else min(total, start + self.max_steps_this_run)
        info = self._train(session, start, end, info)
        return self._finish(session, start, info)

    def _accelerator(self) -> Accelerator:
        """accelerate for ``device``: "cpu" (or "auto" without CUDA) trains on the CPU, gloo between several
        processes; "auto" otherwise places each process on its accelerator; cuda:i is honoured by a single
        process (under a launcher, each process takes its own)."""
        cpu = str(self.device) == "cpu"
        if not cpu and str(self.device) != "auto" and "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("ACCELERATE_TORCH_DEVICE", str(self.device))  # accelerate's device override
        return Accelerator(gradient_accumulation_steps=self.gradient_accumulation_steps,
                           mixed_precision=self.mixed_precision,
                           cpu=cpu or (str(self.device) == "auto" and not torch.cuda.is_available()))

    def _micro_batch(self, procs: int) -> int:
        """Samples per micro-batch on each of ``procs`` processes: the batch size splits evenly over them."""
        micro = self.train.batch_size // procs
        if micro < 1 or self.train.batch_size % procs:
            raise ValueError(f"{self.name}: batch_size {self.train.batch_size} does not split over "
                             f"{procs} processes")
        return micro

    def _prepare(self, acc: Accelerator, micro: int) -> _Session:
        """The global seed, then the optimizer over the trainable parameters (after _freeze_unused), the lr
        schedule and the EMA, with the model prepared by accelerate and every state that a checkpoint
        holds registered. Raises ValueError when nothing is trainable."""
        set_seed(self.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.name}: the model has no trainable parameters")
        opt = make_optimizer(self.optimizer, params, self.train.lr, self.train.weight_decay)
        warm = max(1, self.train.warmup_steps)
        # Warm-up then constant, never a function of the total: the prefix rule (module docstring) rests on it.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        # The scheduler is not prepared: accelerate would step it once per process per call; ours counts
        # optimizer steps whatever the number of processes (the batch is global, split across them).
        model, opt = acc.prepare(self.model, opt)
        acc.register_for_checkpointing(sched)
        ema = None
        if self.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(params, decay=self.ema_decay, use_ema_warmup=True)
            acc.register_for_checkpointing(ema)
        return _Session(acc, model, opt, sched, params, ema, len(self.data), micro)

    def _resume(self, s: _Session, key: str) -> tuple[int, dict]:
        """-> (step to start from, the DONE record of the checkpoint resumed; 0, {} if none). The main
        process claims the checkpoint folder (_claim) and offers it a prefix (_take_prefix); then every
        process loads the newest checkpoint of step <= ``train.steps`` (_load)."""
        acc, root, total = s.acc, self.checkpoint_dir, self.train.steps
        if acc.is_main_process:
            own, discarded = _claim(root, key, total)
            taken = bool(self.prefixes) and _take_prefix(acc, root, key, self.prefixes, total, self.name, own)
            if discarded and not taken:  # a prefix taken in their place is no fresh start
                acc.print(f"{root}: checkpoints were made from other params, data or models; starting afresh")
        acc.wait_for_everyone()
        start, info = _load(acc, root, total)
        if s.ema:
            s.ema.to(acc.device)  # accelerate loads custom states onto the CPU
        return start, info

    def _train(self, s: _Session, start: int, end: int, info: dict) -> dict:
        """Steps ``start`` .. ``end`` - 1, each followed by the EMA's step and the executor's thread count;
        logged to dvclive every ``log_every`` steps and at ``end``, checkpointed every ``checkpoint_every``
        steps and at ``end``. ``info``: the resumed checkpoint's DONE record. Returns the last one saved
        (``info`` when none was)."""
        live = _live(self.live_dir, start, s.acc) if start < end else None
        bar = tqdm(range(start, end), desc=self.name, initial=start, total=self.train.steps,
                   disable=not s.acc.is_local_main_process)
        clock = _Clock(start, self._global_batch, info.get("seconds", 0.0))
        s.model.train()
        for step in bar:
            terms = self._optimizer_step(s, step)
            if s.ema:
                s.ema.step(s.params)
            follow_threads()  # the concurrent executor may lend this process idle threads (pipeline.threads)
            done = step + 1
            last = {k: float(v.detach()) for k, v in terms.items()}
            if live and (done % self.log_every == 0 or done == end):
                self._log(live, done, last, s.sched, clock)
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if done % self.checkpoint_every == 0 or done == end:
                info = clock.record(done, last, info)
                _save(s.acc, self.checkpoint_dir, info, self.keep_checkpoints)
        if live:
            live.end()
        return info

    @property
    def _global_batch(self) -> int:
        """Samples per optimizer step, over every process and accumulation round."""
        return self.train.batch_size * self.gradient_accumulation_steps

    def _optimizer_step(self, s: _Session, step: int) -> dict[str, torch.Tensor]:
        """Optimizer step ``step`` on this process: its micro-batches of the step's global batch
        (batch_indices), micro-batch j drawing its noise from (seed, step, 2 + j) whichever process or
        accumulation round trains it, each through train_step. Returns the last micro-batch's terms; raises
        NonFiniteLoss naming the step."""
        acc, procs = s.acc, s.acc.num_processes
        order = batch_indices(s.n, self._global_batch, self.seed, step)
        for k in range(self.gradient_accumulation_steps):
            j = k * procs + acc.process_index  # this micro-batch's place in the step's global batch
            idx = order[j * s.micro:(j + 1) * s.micro]
            batch = {name: v.to(acc.device) for name, v in self.data.batch(idx).items()}
            gen = step_generator(self.seed, step, stream=2 + j)
            try:
                terms = train_step(acc, s.model, s.opt, s.params, self.loss_fn, batch, gen, self.train.max_grad_norm,
                                   s.sched)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"{self.name}: non-finite loss at step {step} ({exc}); stopped. The last "
                                    f"good checkpoint is kept in {self.checkpoint_dir}") from None
        return terms

    def _log(self, live, done: int, last: dict[str, float], sched, clock: _Clock) -> None:
        """Step ``done``'s loss terms, lr and this session's samples per second, under this loop's name."""
        live.step = done
        for k, v in last.items():
            live.log_metric(f"{self.name}/{k}", v)
        live.log_metric(f"{self.name}/lr", sched.get_last_lr()[0])
        live.log_metric(f"{self.name}/samples_per_s", clock.rate(done))

    def _finish(self, s: _Session, start: int, info: dict) -> LoopResult:
        """Once every process is done: the trained weights, unwrapped (the EMA's, with one), into
        ``self.model``; the figures of ``info``, the last checkpoint's record (none: ``start`` steps)."""
        s.acc.wait_for_everyone()
        final = s.acc.unwrap_model(s.model)
        if s.ema:
            s.ema.copy_to(s.params)
        self.model = final
        return LoopResult(info.get("step", start), info.get("seconds", 0.0), info.get("samples_per_s", 0.0),
                          info.get("last", {}), s.acc.is_main_process, info.get("prefix_steps", 0))

    def key(self) -> str:
        """What the checkpoints are made from: the loop's params except the number of steps (the prefix rule
        of the module docstring: a step's result does not depend on the total, so a longer run continues a
        shorter one's checkpoints), the project code that runs it, the training data, the model's initial
        weights and the frozen models it reads."""
        h = hashlib.sha256()
        settings = dict(extra=self.fingerprint, train=self.train.model_dump(mode="json", exclude={"steps"}),
                        seed=self.seed,
                        accum=self.gradient_accumulation_steps, precision=self.mixed_precision,
                        ema=self.ema_decay, optimizer=self.optimizer)
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(f"code|{code_digest(self.code)}|data|{self.data.digest()}|".encode())
        groups = {"init": self.model.state_dict()}
        for name, m in self.frozen.items():
            groups[f"frozen.{name}"] = m.state_dict() if isinstance(m, torch.nn.Module) else {"": m}
        for group in sorted(groups):
            for name, t in sorted(groups[group].items()):
                _hash_tensor(h, f"{group}/{name}", t)
        return h.hexdigest()

    def _freeze_unused(self, acc: Accelerator) -> None:
        """Freeze the trainable parameters that get no gradient. DDP needs a gradient for every parameter it
        syncs, at every step; some never get one (in a ControlNet's last block, attn.to_add_out, ff_context
        and the like only produce the text stream nobody reads). One backward on one sample finds them.
        This changes no result (AdamW skips a parameter without a gradient) and costs one small step, where
        DDP's find_unused_parameters would search the autograd graph at every step."""
        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            return
        self.model.to(acc.device)
        batch = {k: v.to(acc.device) for k, v in self.data.batch(torch.arange(1)).items()}
        with acc.autocast():
            loss = self.loss_fn(self.model, batch, step_generator(self.seed, 0, stream=1))["loss"]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        unused = [k for (k, p), g in zip(named, grads) if g is None]
        for (k, p), g in zip(named, grads):
            if g is None:
                p.requires_grad_(False)
        if unused:
            acc.print(f"{self.name}: {len(unused)} parameters get no gradient and are frozen: {', '.join(unused)}")


def train_step(acc: Accelerator, model, opt, params, loss_fn, batch: dict, generator: torch.Generator,
               max_grad_norm: float, sched=None) -> dict[str, torch.Tensor]:
    """One micro-batch, as Loop trains and the benchmarks time it (one copy, so they cannot drift): the loss
    under accelerate's autocast, a finite-loss check before anything changes, backward, then, once the
    gradients are synchronised (the last micro-batch of an accumulation), clipping, the optimizer step and
    the lr step. Raises NonFiniteLoss with the terms. Returns the terms."""
    with acc.accumulate(model), acc.autocast():
        terms = loss_fn(model, batch, generator)
        if not torch.isfinite(terms["loss"]).all():
            raise NonFiniteLoss({k: float(v) for k, v in terms.items()})
        acc.backward(terms["loss"])
        if acc.sync_gradients:
            acc.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if acc.sync_gradients and sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return terms


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


def _hash_tensor(h, name: str, t: torch.Tensor, chunk_bytes: int = 64 << 20) -> None:
    """Name, dtype, shape and raw bytes, read in chunks of rows: memory does not grow with the tensor (the
    training data can be tens of GB), and no float conversion can make two different tensors agree."""
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel() == 0:
        return
    t = t.reshape(1) if t.dim() == 0 else t
    rows = max(1, chunk_bytes // (t[0].numel() * t.element_size()))
    for i in range(0, len(t), rows):
        h.update(t[i:i + rows].cpu().contiguous().view(torch.uint8).numpy())


_STEP_DIR = re.compile(r"step-(\d{8})")


def _step(ck: Path) -> int:
    return int(ck.name[5:])


def _checkpoints(root: Path, upto: int | None = None) -> list[Path]:
    """Complete checkpoints (DONE written), oldest first, of step <= ``upto`` if given (later ones belong to
    a longer run); set-aside ones (step-N.corrupt) are not."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "DONE").exists()
             and (upto is None or _step(p) <= upto)]
    return sorted(found, key=_step)


def _problem(ck: Path) -> str | None:
    """Why ``ck`` cannot be resumed, or None. Reads the DONE mark and every safetensors header: cheap, and a
    truncated or garbage weights file fails here, before anything is loaded."""
    from safetensors import safe_open

    try:
        step = json.loads((ck / "DONE").read_text())["step"]
        if step != _step(ck):
            return f"its DONE mark says step {step}"
        for f in sorted(ck.glob("*.safetensors")):
            with safe_open(str(f), "pt"):
                pass
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        return f"{type(e).__name__}: {e}"
    return None


def _set_aside(ck: Path, why: str) -> Path:
    """Rename a broken checkpoint out of the resume path; keep it for inspection."""
    dest = ck.with_name(f"{ck.name}.corrupt")
    i = 1
    while dest.exists():
        i += 1
        dest = ck.with_name(f"{ck.name}.corrupt-{i}")
    os.replace(ck, dest)
    print(f"warning: checkpoint {ck} is unreadable ({why}); set aside as {dest.name}", file=sys.stderr)
    return dest


def _keyed(root: Path, key: str) -> bool:
    """``root``'s FINGERPRINT is ``key``: its checkpoints were made from what this run is made from."""
    mark = root / "FINGERPRINT"
    return mark.exists() and mark.read_text() == key


def _usable(root: Path, key: str, upto: int) -> Path | None:
    """The newest readable checkpoint of step <= ``upto`` in ``root`` if its FINGERPRINT is ``key``. Only
    reads (a prefix root is never changed)."""
    if not _keyed(root, key):
        return None
    return next((ck for ck in reversed(_checkpoints(root, upto)) if _problem(ck) is None), None)


def _claim(root: Path, key: str, upto: int) -> tuple[Path | None, bool]:
    """Main process only. Make ``root`` the checkpoint folder of ``key`` and find what a run of ``upto``
    steps resumes: -> (the newest readable checkpoint of step <= ``upto``, None if none; whether another
    key's checkpoints were removed). A folder whose FINGERPRINT is not ``key`` (or that has none) is emptied
    first: nothing made from other params, data, models or code is resumed. Unreadable checkpoints newer
    than the one returned are set aside (_set_aside); those of step > ``upto`` belong to a longer run and are
    neither read nor touched."""
    discarded = False
    if root.exists() and not _keyed(root, key):
        discarded = bool(_checkpoints(root))
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "FINGERPRINT").write_text(key)
    for ck in reversed(_checkpoints(root, upto)):
        why = _problem(ck)
        if why is None:
            return ck, discarded
        _set_aside(ck, why)
    return None, discarded


def _take_prefix(acc: Accelerator, root: Path, key: str, prefixes: list[Path], total: int, name: str,
                 own: Path | None) -> bool:
    """Main process only, on ``root`` claimed by _claim (``own``: the checkpoint it found). Copy into
    ``root`` the newest checkpoint (step <= total) of a prefix root whose FINGERPRINT is ``key`` when it is
    further along than ``own``; roots with another key (or none) are ignored. Returns whether one was taken."""
    best: Path | None = None
    for p in map(Path, prefixes):
        if not p.exists():
            acc.print(f"{name}: prefix {p}: absent; ignored")
            continue
        ck = _usable(p, key, total)
        if ck is None:
            acc.print(f"{name}: prefix {p}: another key or no checkpoint up to step {total}; ignored")
        elif best is None or _step(ck) > _step(best):
            best = ck
    if best is None or (own is not None and _step(own) >= _step(best)):
        return False
    info = _copy_checkpoint(best, root)
    acc.print(f"{name}: took prefix {best} (step {info['step']} of {total})")
    return True


def _copy_checkpoint(ck: Path, root: Path) -> dict:
    """Copy prefix checkpoint ``ck`` into ``root`` under its own name -> its DONE record as copied: the
    prefix's seconds (the cost of those weights) with the prefix noted (``prefix_steps``: the steps the
    run that takes it does not train). Copied to a temporary folder then renamed: nothing partial; ``ck`` is
    only read."""
    final = root / ck.name
    tmp = root / f".tmp-prefix-{ck.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ck, tmp)
    info = json.loads((tmp / "DONE").read_text())
    info.update(prefix=str(ck.parent), prefix_steps=info["step"])
    (tmp / "DONE").write_text(json.dumps(info))
    if final.exists():  # not a usable checkpoint (else it would be the claimed one): keep it for inspection
        _set_aside(final, "replaced by a prefix's checkpoint")
    os.replace(tmp, final)
    return info


def _load(acc: Accelerator, root: Path, upto: int) -> tuple[int, dict]:
    """Every process, once the main one has claimed ``root`` (_claim): load the newest checkpoint of step
    <= ``upto`` -> (its step, its DONE record); (0, {}) if none. One that passed _claim's header checks but
    fails to load (say, a corrupt optimizer state) may be half loaded: it is set aside and CorruptCheckpoint
    raised."""
    ckpts = _checkpoints(root, upto)
    if not ckpts:
        return 0, {}
    try:
        acc.load_state(str(ckpts[-1]))
    except Exception as e:
        where = _set_aside(ckpts[-1], repr(e)) if acc.is_main_process else ckpts[-1]
        raise CorruptCheckpoint(f"checkpoint {ckpts[-1]} could not be loaded ({e}); set aside as {where}. "
                                f"Rerun to resume from the previous checkpoint, or afresh if none") from e
    info = json.loads((ckpts[-1] / "DONE").read_text())
    acc.print(f"resumed from {ckpts[-1]} (step {info['step']})")
    return info["step"], info


def _save(acc: Accelerator, root: Path, info: dict, keep: int) -> None:
    """Write to a temporary folder, mark it complete, rename: a killed save leaves no half checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{info['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()  # every process has written its part (its RNG states) before the rename
    if acc.is_main_process:
        (tmp / "DONE").write_text(json.dumps(info))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(root, info["step"])[:-keep]:  # a longer run's later ones are kept
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
    """save_pretrained into a temporary sibling swapped in for ``out``; refuses to replace a folder this
    project did not write (pipeline.atomic.write_dir)."""
    from pipeline.atomic import write_dir

    with write_dir(out) as tmp:
        model.save_pretrained(tmp)
