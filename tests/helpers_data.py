"""Shared tiny data builders for the data-stage tests (scenes -> triplets -> captions)."""

from pathlib import Path

from pipeline.captions.config import CaptionConfig, QwenConfig
from pipeline.captions.run import caption_manifest
from pipeline.config import from_dict
from pipeline.data.synthetic import generate_scenes
from pipeline.data.triplets import TripletsConfig, build_triplets, load_input

TINY = {"data": {"splits": {"labelled": 8, "unlabelled": 6, "val": 3, "test": 3}, "random_mask_fraction": 0.5}}


def build_tiny(root: Path):
    cfg = from_dict(TINY)
    generate_scenes(cfg.data, cfg.seed, root / "scenes", progress=False)
    rows = load_input(TripletsConfig(), root / "scenes" / "manifest.parquet")
    build_triplets(rows, TripletsConfig(), cfg.data.image_size, root / "triplets", progress=False)
    ccfg = CaptionConfig(qwen=QwenConfig(cache_dir=str(root / "caption_cache")))
    caption_manifest(root / "triplets" / "manifest.parquet", ccfg, root / "captions" / "captions.parquet",
                     progress=False)
    return cfg
