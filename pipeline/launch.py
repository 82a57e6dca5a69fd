"""The processes of a model stage: how many, and how they start. The stage entry point
(pipeline/entry.py) asks here, so ``dvc repro``, ``make run``, the Prefect flows and a deployment, which all
run a stage's ``cmd`` (``python -m stages.NAME ...``), run the same number of processes.

- ``launch.processes`` per machine x ``launch.machines`` (params.yaml; REFINE_LAUNCH_<KEY> in the environment
  overrides a key, e.g. REFINE_LAUNCH_MACHINE_RANK set per machine). 1 x 1, the default, starts nothing: the
  stage runs in the process that was asked to run it.
- More: the stage's module is run again, same arguments, under torchrun (torch.distributed.run, in this
  process): ``--standalone`` on one machine (a free port, so stages run side by side never collide), else a
  static rendezvous at ``main_address:main_port`` with this machine's ``--node_rank``; the same command is
  started on every machine. ``accelerate launch --cpu`` starts one process on a CPU-only machine, so torchrun
  it is; accelerate inside each rank (pipeline/training.py) reads what torchrun set.
- A rank (a process any launcher started: WORLD_SIZE or LOCAL_RANK in its environment) never launches, so a
  stage started by hand under torchrun or ``accelerate launch`` runs as it is. Its device is the accelerator
  of its LOCAL_RANK (pipeline/device.py).
- Ranks on the CPU share the threads this process was given (OMP_NUM_THREADS, e.g. the concurrent executor's
  share for the stage; else the CPUs it may run on): each gets an equal part of them in every thread pool's
  variable (pipeline.threads), never the whole. Ranks on accelerators keep what torchrun gives them.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping

from pydantic import ValidationError

from pipeline.config import Config, ConfigError, LaunchConfig
from pipeline.threads import THREAD_VARS, share

ENV = "REFINE_LAUNCH_"   # + the key in upper case: REFINE_LAUNCH_PROCESSES overrides launch.processes


def is_rank() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def local_rank() -> int | None:
    """This process's index among the ranks on its machine (its accelerator's index); None outside a launch."""
    value = os.environ.get("LOCAL_RANK")
    return None if value is None else int(value)


def settings(cfg: Config) -> LaunchConfig:
    """``cfg.launch`` with the environment's REFINE_LAUNCH_* overrides; a bad value is a ConfigError naming
    where it came from."""
    env = {key: os.environ[ENV + key.upper()] for key in LaunchConfig.model_fields if ENV + key.upper() in os.environ}
    try:
        return LaunchConfig(**{**cfg.launch.model_dump(), **env})
    except ValidationError as exc:
        where = ", ".join(f"{ENV}{k.upper()}={v}" for k, v in env.items()) or "params.yaml"
        raise ConfigError(f"launch ({where}): " + "; ".join(map(_describe, exc.errors()))) from None


def _describe(err: dict) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    return f"launch.{'.'.join(map(str, err['loc']))}: {msg}" if err["loc"] else msg


def torchrun_args(launch: LaunchConfig, module: str, argv: list[str]) -> list[str]:
    """torchrun's command line for ``python -m module argv`` on every process of ``launch`` (this machine's)."""
    if launch.machines == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={launch.machines}", f"--node_rank={launch.machine_rank}",
                 f"--master_addr={launch.main_address}", f"--master_port={launch.main_port}"]
    return [f"--nproc_per_node={launch.processes}", *where, "-m", module, *argv]


def run_launched(launch: LaunchConfig, module: str, argv: list[str], device: str = "auto") -> int:
    """Run ``python -m module argv`` under torchrun and wait for every rank: 0, or the exit code of the first
    rank that failed (torchrun's own would be 1 whatever the rank said; killed by a signal: 1). ``device``:
    the runtime policy's (``runtime.device``), which decides whether the ranks share this process's threads
    (:func:`rank_threads`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = torchrun_args(launch, module, argv)
    env = rank_threads(launch, on_cpu(device), os.environ)
    where = f"  (CPU: {env['OMP_NUM_THREADS']} threads a rank)" if env else ""
    print(f"launch: torchrun {shlex.join(args)}{where}", file=sys.stderr, flush=True)
    try:
        with _environ(env):   # torchrun starts each rank with this process's environment
            run(parse_args(args))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def on_cpu(device: str) -> bool:
    """Whether ranks of runtime device ``device`` run on the CPU (pipeline.device's rule; a setting it refuses
    counts as not the CPU, and the ranks report the error)."""
    from pipeline.device import resolve_device  # torch: only when a launch starts

    try:
        return resolve_device(device).type == "cpu"
    except (ValueError, RuntimeError):
        return False


def rank_threads(launch: LaunchConfig, cpu: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The thread pools' variables of each rank on this machine: on the CPU, every one (THREAD_VARS) set to
    an equal share of this process's threads (``environ``'s OMP_NUM_THREADS, else the CPUs it may run on)
    among its ``launch.processes`` ranks, so that N ranks never run N times the threads they were given;
    nothing on accelerators."""
    if not cpu:
        return {}
    try:
        threads = int(environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return dict.fromkeys(THREAD_VARS, str(share(threads, launch.processes)))


@contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` set in os.environ for the block, the previous values back after it."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
