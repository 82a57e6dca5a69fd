"""Shard folders and the flows' Dask task runner.

- :func:`merge_shards`: the folders that a stage's ``--shard i/N`` runs wrote (build_triplets, caption,
  encode; run by hand, e.g. one job per machine, each into ``<out>.shards/shard-i``: :func:`shard_dir`)
  joined into the stage's output, equal to the unsharded one.
- :func:`dask_task_runner`: prefect-dask's DaskTaskRunner on the cluster at ``flows.dask_address``
  (:mod:`.concurrent`, :mod:`.cluster`).

One stage on several devices or machines is params ``launch`` (pipeline/launch.py): its ranks split the
rows, each on its own device, and rank 0 writes the output (pipeline/distributed.py). The flows no longer
run shards of a stage as processes of their own (``flows.sharded`` is retired: every shard took cuda:0).
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path
from typing import Iterable

from pipeline.atomic import MARKER, write_dir


def shard_dir(out: str | Path, index: int) -> Path:
    """Where shard ``index`` of a stage's output ``out`` is written: ``<out>.shards/shard-<index>``."""
    return Path(f"{out}.shards") / f"shard-{index}"


def merge_shards(shard_dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Union of the shard folders into ``out``: distinct files are copied; a file name present in several
    shards is concatenated when it is a table (.parquet, .csv, .jsonl) and is an error otherwise. Parquet
    tables with an ``id`` column are ordered by id (the order the sharded stages write unsharded). Files
    identical in every shard are kept once; ``out`` is written atomically (pipeline.atomic)."""
    out = Path(out)
    seen: dict[Path, list[Path]] = collections.defaultdict(list)
    for d in shard_dirs:
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file() and p.name != MARKER):
            seen[f.relative_to(d)].append(f)
    with write_dir(out) as tmp:
        written = [_merge_one(rel, files, tmp) for rel, files in sorted(seen.items())]
    return [out / w.relative_to(tmp) for w in written]


def _merge_one(rel: Path, files: list[Path], root: Path) -> Path:
    import pandas as pd

    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if len(files) == 1 or all(f.read_bytes() == files[0].read_bytes() for f in files[1:]):
        shutil.copy2(files[0], dest)
    elif rel.suffix == ".parquet":
        parts = [pd.read_parquet(f) for f in files]
        table = pd.concat(parts, ignore_index=True)
        if all("id" in p.columns for p in parts):   # keyed tables: rows ordered by id, as unsharded
            table = table.sort_values("id", kind="stable").reset_index(drop=True)
        table.to_parquet(dest, index=False)
    elif rel.suffix in {".jsonl", ".csv"}:
        with dest.open("w") as fh:
            for i, f in enumerate(files):
                lines = f.read_text().splitlines(keepends=True)
                fh.writelines(lines[1:] if rel.suffix == ".csv" and i else lines)
    else:
        raise ValueError(f"merge: {rel} is written by {len(files)} shards with different contents and is not "
                         "a table")
    return dest


def dask_task_runner(address: str):
    """prefect-dask's DaskTaskRunner on the dask.distributed scheduler at ``address``."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
