"""Encoded shards: what training reads instead of running the VAE and text encoders per step.

data/encoded/<split>/shard-<i>-of-<N>.safetensors holds, per row: ``latents`` (the image, 16 x h x w),
``masked_latents`` (the image with its hole set to -1, encoded), ``mask`` (1 x h x w, 1 = hole),
``prompt_embeds`` / ``pooled_prompt_embeds`` (the local prompt) and ``global_prompt_embeds`` /
``global_pooled_prompt_embeds``, exactly as the stock SD3 pipeline's encode_prompt computes them. Row ids
are in the sibling ``.parquet`` of the same name. Loading concatenates all shards ordered by id, so N
shards load exactly as one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import write_file

TENSOR_KEYS = ("latents", "masked_latents", "mask", "prompt_embeds", "pooled_prompt_embeds",
               "global_prompt_embeds", "global_pooled_prompt_embeds")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def write_shard(split_dir: Path, index: int, count: int, ids: list[str], tensors: dict[str, torch.Tensor]) -> Path:
    split_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(index, count)
    for k, v in tensors.items():
        if len(v) != len(ids):
            raise ValueError(f"{split_dir}/{name}: tensor {k} has {len(v)} rows for {len(ids)} ids")
    write_file(split_dir / f"{name}.safetensors",
               lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    write_file(split_dir / f"{name}.parquet", lambda tmp: pd.DataFrame({"id": ids}).to_parquet(tmp, index=False))
    return split_dir / f"{name}.safetensors"


def load_split(encoded_dir: str | Path, split: str, keys: tuple[str, ...] | None = None) -> tuple[list[str], dict]:
    """(ids, tensors) of one split, ordered by id. ``keys`` selects tensors (others are not returned)."""
    split_dir = Path(encoded_dir) / split
    files = sorted(split_dir.glob("shard-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no encoded shards (run the encode stage)")
    ids: list[str] = []
    parts: dict[str, list] = {}
    for f in files:
        ids += list(pd.read_parquet(f.with_suffix(".parquet"))["id"])
        for k, v in load_file(str(f)).items():
            if keys is None or k in keys:
                parts.setdefault(k, []).append(v)
    missing = [k for k in (keys or ()) if k not in parts]
    if missing:
        raise KeyError(f"{split_dir}: shards lack tensors {missing}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{split_dir}: duplicate ids across shards")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    idx = torch.tensor(order)
    return [ids[i] for i in order], {k: torch.cat(v)[idx] for k, v in parts.items()}
