"""Small JSON metric files (DVC metrics, tracked by git): written atomically, read back by the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.atomic import write_file


def write_json(path: str | Path, data: dict) -> None:
    write_file(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _clean(x):
    """JSON has no NaN/Inf: a value that could not be computed is written as null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_csv(path: str | Path, df) -> None:
    """A per-item metrics table (pandas), 6 significant digits: enough for paired statistics, diffable."""
    write_file(path, df.to_csv(index=False, float_format="%.6g"))
