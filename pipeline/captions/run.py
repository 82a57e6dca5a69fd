"""caption stage logic: triplet manifest -> captions.parquet (id, split, local_prompt, global_prompt,
caption_source) for every split, unlabelled included."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.captions.annotations import add_noise, annotate
from pipeline.config import CaptionConfig
from pipeline.data.images import load_manifest
from pipeline.data.triplets import in_shard

COLUMNS = ["id", "split", "local_prompt", "global_prompt", "caption_source"]


def caption_rows(rows: list[dict], cfg: CaptionConfig, progress: bool = True) -> pd.DataFrame:
    out = []
    if cfg.backend == "qwen2_5_vl":
        from pipeline.captions.cache import CaptionCache
        from pipeline.captions.qwen import QwenCaptioner

        captioner = QwenCaptioner(cfg.qwen)
        cache = CaptionCache(Path(cfg.qwen.cache_dir) / "qwen2_5_vl.jsonl")
        for r, (loc, glo) in zip(rows, captioner.caption(rows, cache, progress)):
            out.append([r["id"], r["split"], loc, glo, "qwen2_5_vl"])
        return pd.DataFrame(out, columns=COLUMNS)
    for r in tqdm(rows, desc="captions", disable=not progress):
        loc, glo, source = annotate(r)
        if cfg.backend == "caption_noise":
            loc, noisy = add_noise(r["id"], loc, cfg.noise_fraction, cfg.noise_seed)
            source = "caption_noise" if noisy else source
        out.append([r["id"], r["split"], loc, glo, source])
    return pd.DataFrame(out, columns=COLUMNS)


def caption_manifest(manifest: str | Path, cfg: CaptionConfig, out: str | Path,
                     shard: tuple[int, int] = (0, 1), progress: bool = True) -> pd.DataFrame:
    """Caption every row of a triplet manifest (or one shard of it, by id hash); writes `out` atomically,
    rows ordered by id."""
    Path(cfg.qwen.cache_dir).mkdir(parents=True, exist_ok=True)  # a DVC `persist` out: exists for every backend
    df = load_manifest(manifest)
    rows = [r for r in df.to_dict("records") if in_shard(r["id"], shard)]
    # rows ordered by id: the shards' outputs, concatenated and ordered by id (pipeline.flows.merge_shards),
    # equal the unsharded output
    result = caption_rows(rows, cfg, progress).sort_values("id", kind="stable").reset_index(drop=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    result.to_parquet(tmp, index=False)
    tmp.replace(out)
    return result
