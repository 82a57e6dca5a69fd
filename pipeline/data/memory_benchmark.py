"""Peak host memory (RSS) of ``encode`` and of stage-1 distillation at N and factor x N rows: evidence that
memory is bounded by design (encode writes each micro-batch into its shard as it goes; training reads the
rows of one batch from the shards), not by the size of the data.

Each run is a child process of its own (``python -m pipeline.data.memory_benchmark child ...``) whose peak
RSS is ``ru_maxrss`` as ``os.wait4`` reports it for that child alone (``RUSAGE_CHILDREN`` would be the
largest of all children). The rows are the labelled triplets with their captions, repeated under new ids up
to N. Stage 1 is ``pipeline.distill.trainer.distill`` with ``memory_benchmark.steps`` steps at
``memory_benchmark.batch_size``; encode uses ``runtime.encode_batch_size``. A contrast arm loads the same
shards whole (``load_split``, as training did before) to show the growth the benchmark would catch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("encode", "stage1", "eager_load")
BOUNDED = ("encode", "stage1")  # the arms held to memory_benchmark.max_ratio


def _child(args) -> None:
    from pipeline.config import deep_merge, from_dict, load, load_raw

    cfg = load(args.params)
    work = Path(args.work)
    if args.arm == "encode":
        import numpy as np

        from pipeline.data.encode import encode_dataset, joined
        from pipeline.runtime import runtime

        base = joined(Path(args.triplets), Path(args.captions))
        base = base[base["split"] == "labelled"].reset_index(drop=True)
        rows = base.iloc[np.arange(args.rows) % len(base)].assign(
            id=[f"mem-{i:08d}" for i in range(args.rows)], split="labelled")
        rt = runtime(cfg)
        encode_dataset(rt.load_foundation(args.foundation), rows, work / "encoded", cfg.data.image_size,
                       cfg.text.max_sequence_length, batch=rt.encode_batch_size, condition=cfg.condition)
    elif args.arm == "stage1":
        from pipeline.distill.trainer import distill

        mb = cfg.memory_benchmark
        train = {"steps": mb.steps, "batch_size": mb.batch_size, "warmup_steps": 0}
        cfg = from_dict(deep_merge(load_raw(args.params), {"distill": {"stage1": {"train": train}}}), args.params)
        distill(cfg, "stage1", foundation=Path(args.foundation), teacher=Path(args.teacher),
                encoded=work / "encoded", out=work / "student", checkpoints=work / "ck", live=None)
    else:
        from pipeline.data.shards import load_split

        load_split(work / "encoded", "labelled")


def _run_child(arm: str, rows: int, work: Path, paths: dict, params: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline.data.memory_benchmark", "child", arm, "--rows", str(rows),
           "--work", str(work), "--params", params, *(f"--{k}={v}" for k, v in paths.items())]
    root = str(Path(__file__).resolve().parents[2])  # the children run this same code, wherever the cwd is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    if proc.returncode != 0:
        raise RuntimeError(f"memory_benchmark: the {arm} run at {rows} rows failed (exit {proc.returncode})")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t0}  # ru_maxrss: KiB


def run_memory_benchmark(cfg, *, triplets: Path, captions: Path, foundation: Path, teacher: Path,
                         params: str = "params.yaml", work_root: str | None = None) -> dict:
    """Every arm at N and factor x N rows; the figures and ratios (factor x N over N) as a dict."""
    mb = cfg.memory_benchmark
    paths = {"triplets": triplets, "captions": captions, "foundation": foundation, "teacher": teacher}
    sizes = (mb.rows, mb.factor * mb.rows)
    out: dict = {"rows": list(sizes), "factor": mb.factor, "encode_batch_size": cfg.runtime.encode_batch_size,
                 "stage1_steps": mb.steps, "stage1_batch_size": mb.batch_size, "max_ratio": mb.max_ratio,
                 "method": "ru_maxrss of each run's own child process (os.wait4)"}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"memory-benchmark-{n}-", dir=work_root))
        try:
            for arm in ARMS:  # encode first: the other two read its shards
                out.setdefault(arm, {})[str(n)] = _run_child(arm, n, work, paths, params)
                print(f"memory_benchmark: {arm} at {n} rows: {out[arm][str(n)]['peak_rss_mib']:.0f} MiB peak RSS")
            out["shard_mib"] = out.get("shard_mib", {}) | {
                str(n): sum(f.stat().st_size for f in (work / "encoded").rglob("*")) / 2**20}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for arm in ARMS:
        a, b = (out[arm][str(n)]["peak_rss_mib"] for n in sizes)
        out[arm]["ratio"] = b / a
    out["bounded"] = all(out[arm]["ratio"] <= mb.max_ratio for arm in BOUNDED)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child", help="one measured run (used by run_memory_benchmark)")
    c.add_argument("arm", choices=ARMS)
    c.add_argument("--rows", type=int, required=True)
    for k in ("work", "params", "triplets", "captions", "foundation", "teacher"):
        c.add_argument(f"--{k}", required=True)
    _child(ap.parse_args(argv))


if __name__ == "__main__":
    main()
