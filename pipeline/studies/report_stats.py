"""The studies' per-image statistics, for their report modules only (stage studies_report): no run stage
imports this module, so a change here reruns the report alone.

A per-image table is an evaluation's CSV (metrics/studies/per_image/...: one row per test image, column
``id``). A run's seeds are averaged per image; a metric is then stated as its mean with a BCa 95% CI over
images (pipeline.evaluation.stats.paired_difference from 0), and two tables are compared image by image."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.evaluation.stats import paired_difference


def read_table(path: Path, keys: Sequence[str], *, finite: bool = False) -> pd.DataFrame:
    """``path``'s columns ``keys`` (float64) indexed by image id. Raises ValueError when a column is missing
    or, with ``finite``, holds a NaN or an infinity."""
    df = pd.read_csv(path)
    missing = [k for k in ("id", *keys) if k not in df]
    if missing:
        raise ValueError(f"{path}: per-image table lacks columns {missing}")
    t = df.set_index("id")[list(keys)].astype(np.float64)
    bad = [k for k in keys if finite and not np.isfinite(t[k]).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad}")
    return t


def seed_average(paths: Mapping[int, Path],
                 read: Callable[[Path], pd.DataFrame]) -> tuple[pd.DataFrame | None, list[int]]:
    """(the per-image mean of the seeds' tables that exist, read by ``read``; those seeds), or (None, []).
    Raises ValueError when a seed's table holds other test images than the first one's."""
    tables, found = [], []
    for s, p in paths.items():
        if Path(p).exists():
            tables.append(read(Path(p)))
            found.append(int(s))
    if not tables:
        return None, []
    for t, s in zip(tables[1:], found[1:]):
        if not t.index.equals(tables[0].index):
            raise ValueError(f"{paths[s]}: other test images than {Path(paths[found[0]]).name}")
    return sum(tables) / len(tables), found


def mean_ci(values) -> dict:
    """The mean of the finite per-image values with its BCa 95% CI (a paired difference from 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return paired_difference(v, np.zeros_like(v))


def paired(a: pd.DataFrame, b: pd.DataFrame, key: str, what: str = "") -> dict:
    """The paired per-image difference ``a[key] - b[key]``, image by image (ids matched, not positions).
    Raises ValueError naming ``what`` when the two tables hold other test images."""
    if set(a.index) != set(b.index):
        raise ValueError(f"{what + ': ' if what else ''}paired comparison of different test images")
    return paired_difference(a[key].to_numpy(), b.loc[a.index, key].to_numpy())
