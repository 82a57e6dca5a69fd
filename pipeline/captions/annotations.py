"""`annotations` and `caption_noise` backends: prompts from scene records (pipeline.data.prompts)."""

from __future__ import annotations

import json
import zlib

import numpy as np

from pipeline.config import COLORS, SHAPES
from pipeline.data import prompts
from pipeline.data.images import load_mask, open_image


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v).strip() != ""


def annotate(row: dict) -> tuple[str | None, str | None, str]:
    """(local, global, source) of one triplet row. Rows with an objects record are written by the shared
    prompt writer; rows without one keep the manifest's own prompts (source 'manifest')."""
    if _present(row.get("objects")):
        objects = json.loads(row["objects"])
        bg = row.get("background") or "plain"
        idx = row.get("object_index")
        if idx is not None and int(idx) >= 0:
            local = prompts.local_prompt(objects, bg, [int(idx)])
        elif _present(row.get("instances")):
            inst = np.asarray(open_image(row["instances"]).convert("L"))
            local = prompts.local_prompt_for_mask(objects, bg, inst, load_mask(row["mask"]))
        else:
            local = row.get("local_prompt") if _present(row.get("local_prompt")) else None
        return local, prompts.global_prompt(objects, bg), "annotations"
    local = row.get("local_prompt") if _present(row.get("local_prompt")) else None
    glob = row.get("global_prompt") if _present(row.get("global_prompt")) else None
    return local, glob, "manifest"


def wrong_prompt(true: str | None, rng: np.random.Generator) -> str:
    """A local prompt that differs from `true`: a random colour and shape."""
    for _ in range(100):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        cand = prompts.local_prompt([{"color": color, "shape": shape}], "plain", [0])
        if cand != true:
            return cand
    raise RuntimeError("could not draw a wrong prompt")


def add_noise(row_id: str, local: str | None, fraction: float, seed: int) -> tuple[str | None, bool]:
    """Replace the local prompt with a wrong one with probability `fraction` (seeded by id: shard-stable)."""
    rng = np.random.default_rng([seed, zlib.crc32(row_id.encode())])
    if local is not None and rng.random() < fraction:
        return wrong_prompt(local, rng), True
    return local, False
