"""Several processes, one result: the facts of a launched job and the rule by which the inference stages
(encode, caption, trajectories, evaluate, the ablation runs' evaluation) share their rows and merge what
they wrote, so that N processes write the files one process writes.

- :func:`world`: rank, world size and local rank as the launcher (``torchrun`` / ``accelerate launch``, one
  process per device) sets them in RANK, WORLD_SIZE, LOCAL_RANK; one process (0, 1, 0) when not launched.
  :func:`connect` brings the process group up, only when launched, through accelerate's ``PartialState``
  (gloo for the CPU, nccl for CUDA, each process on cuda:LOCAL_RANK): the state the training Loop's
  Accelerator then shares. One process touches no process group and no part: it runs as it always ran.
- The split (:meth:`World.rows`): a stage's rows are cut into the micro-batches one process makes of them;
  each rank takes a contiguous run of whole micro-batches, by accelerate's ``split_between_processes`` rule
  applied to the batches (the first B mod N ranks take one batch more). Whole batches keep each row in the
  batch it has with one process, so its outputs are the same bits (batched kernels sum in an order that
  depends on the batch); contiguous runs, concatenated in rank order, are the rows in their order. Callers
  keep a row's GLOBAL index (its noise seed, its trajectory steps).
- Parts (:func:`parts`): rank r writes only under ``.parts/<label>-<token>/rank-<r>/`` (one token per job,
  rank 0's); :meth:`Parts.gather` is the barrier after which rank 0 reads every part in rank order and
  writes the final output itself (pipeline.atomic); on leaving the block rank 0 removes the job's folder.
  No other rank writes an output. Merges: tensors and rows through :meth:`Parts.save` / :func:`load_parts`,
  per-row files (PNGs) through :func:`copy_files`, safetensors shards through
  pipeline.data.shards.concat_shards (streamed, tensor by tensor).

The part folders live in the workspace (stages run at its root), so several machines need it on a shared
disk, as they need the DVC workspace. A job killed midway leaves its ``.parts/<label>-<token>`` folder
behind (never an output); nothing reads it again.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import torch

PARTS = Path(".parts")   # relative to the workspace root, like pipeline.paths
# A barrier waits for the slowest rank (one micro-batch more) and for rank 0's merge; nccl's default
# (10 min) is shorter than merging an SD3-size split's shards.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that merges and writes the outputs."""
        return self.rank == 0

    def rows(self, n: int, batch: int) -> slice:
        """This rank's share of ``n`` rows processed ``batch`` at a time: a contiguous run of whole
        micro-batches (accelerate's split_between_processes rule over the micro-batches). One process: all."""
        per, extra = divmod(-(-n // batch), self.size)
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (self.rank < extra)
        return slice(min(first * batch, n), min(last * batch, n))


def world() -> World:
    """The launcher's facts from the environment; one process when it was not launched."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def connect(device: torch.device | str) -> World:
    """:func:`world`, with the process group up when launched: accelerate's PartialState for ``device``'s
    kind (cpu: gloo; cuda: nccl, this process on cuda:LOCAL_RANK). Idempotent; nothing with one process."""
    w = world()
    if w.size > 1:
        from accelerate import PartialState
        from accelerate.utils import InitProcessGroupKwargs

        state = PartialState(cpu=torch.device(device).type != "cuda",
                             **InitProcessGroupKwargs(timeout=TIMEOUT).to_kwargs())
        if state.num_processes != w.size:
            raise RuntimeError(f"WORLD_SIZE={w.size}, but the process group has {state.num_processes} processes")
    return w


def barrier() -> None:
    """Every rank waits here for the others (nothing with one process)."""
    if world().size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@dataclass(frozen=True)
class Parts:
    """One job's part folders: ``mine`` is the only folder this rank writes."""

    world: World
    root: Path

    def of(self, rank: int) -> Path:
        return self.root / f"rank-{rank:05d}"

    @property
    def mine(self) -> Path:
        return self.of(self.world.rank)

    def save(self, name: str, payload) -> None:
        """This rank's ``payload`` (tensors, numbers, strings, in dicts and lists) as ``mine/<name>.pt``."""
        with open(self.mine / f"{name}.pt", "wb") as f:
            torch.save(payload, f)

    def gather(self) -> list[Path] | None:
        """The barrier after every rank wrote its part: rank 0 gets the part folders in rank order (the rows
        in their order); the other ranks get None and write nothing more of this job."""
        barrier()
        return [self.of(r) for r in range(self.world.size)] if self.world.main else None


@contextmanager
def parts(label: str, w: World) -> Iterator[Parts | None]:
    """The job's parts under ``.parts/<label>-<token>`` (None with one process: no part, no barrier). Rank 0
    makes the folder and tells the others its token; each rank makes its own part. When the block ends
    without an error, rank 0 removes the folder (its merge is done by then)."""
    if w.size == 1:
        yield None
        return
    root = [None]
    if w.main:
        root[0] = str(PARTS / f"{label}-{uuid.uuid4().hex[:12]}")
        Path(root[0]).mkdir(parents=True)
    torch.distributed.broadcast_object_list(root, src=0)
    job = Parts(w, Path(root[0]))
    job.mine.mkdir()
    yield job
    if w.main:
        shutil.rmtree(job.root)
        try:
            PARTS.rmdir()   # the last job out removes the scratch folder
        except OSError:
            pass


def load_parts(dirs: Iterable[Path], name: str) -> list:
    """Every rank's ``name`` payload (:meth:`Parts.save`), in rank order; ranks that saved none are skipped."""
    return [torch.load(d / f"{name}.pt", weights_only=True) for d in dirs if (d / f"{name}.pt").is_file()]


def copy_files(dirs: Iterable[Path], out: Path) -> list[str]:
    """Per-row files (a folder of PNGs): every part's files copied into ``out`` (rank 0's write_dir temp).
    Ranks hold distinct rows, so a name in two parts is an error, never an overwrite."""
    names: list[str] = []
    for d in dirs:
        for f in sorted(d.iterdir()) if d.is_dir() else ():
            if (out / f.name).exists():
                raise ValueError(f"{f.name}: written by two ranks ({d.parent})")
            shutil.copyfile(f, out / f.name)
            names.append(f.name)
    return names
