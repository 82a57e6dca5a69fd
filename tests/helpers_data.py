"""Shared tiny data builders for the data-stage tests (scenes -> triplets -> captions)."""

from pathlib import Path

from pipeline.captions.run import caption_manifest
from tests.params import config
from pipeline.data.synthetic import generate_scenes
from pipeline.data.triplets import build_triplets, load_input

TINY = {"data": {"splits": {"labelled": 8, "unlabelled": 6, "val": 3, "test": 3}, "random_mask_fraction": 0.5}}


def build_tiny(root: Path):
    cfg = config({**TINY, "caption": {"qwen": {"cache_dir": str(root / "caption_cache")}}})
    generate_scenes(cfg.data, cfg.seed, root / "scenes", progress=False)
    rows = load_input(cfg.triplets, root / "scenes" / "manifest.parquet")
    build_triplets(rows, cfg.triplets, cfg.data.image_size, root / "triplets", progress=False)
    caption_manifest(root / "triplets" / "manifest.parquet", cfg.caption, root / "captions" / "captions.parquet",
                     progress=False)
    return cfg
