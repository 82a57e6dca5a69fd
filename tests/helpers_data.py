"""Shared tiny data builders for the data-stage tests (scenes -> triplets -> pseudo-labeller -> captions)."""

from pathlib import Path

from pipeline.captions.run import caption_manifest
from tests.params import config
from pipeline.data.synthetic import generate_scenes
from pipeline.data.triplets import build_triplets, load_input

TINY = {"data": {"splits": {"labelled": 8, "unlabelled": 6, "val": 3, "test": 3}, "random_mask_fraction": 0.5}}
# a one-epoch pseudo-labeller: the unlabelled split's captions need a model; its accuracy is not tested here
TINY_LABELLER = {"epochs": 1, "batch_size": 8, "min_exact_match": None}


def build_pseudo_labeller(cfg, manifest: Path, out: Path) -> Path:
    from pipeline.captions.pseudo_labeller import build

    build(cfg, manifest, out, out.parent / f"{out.name}.json", progress=False)
    return out


def build_tiny(root: Path):
    cfg = config({**TINY, "caption": {"qwen": {"cache_dir": str(root / "caption_cache")},
                                      "pseudo_labeller": TINY_LABELLER}})
    generate_scenes(cfg.data, cfg.seed, root / "scenes", progress=False)
    rows = load_input(cfg.triplets, root / "scenes" / "manifest.parquet")
    build_triplets(rows, cfg.triplets, cfg.data.image_size, root / "triplets", progress=False)
    labeller = build_pseudo_labeller(cfg, root / "triplets" / "manifest.parquet", root / "pseudo_labeller")
    caption_manifest(root / "triplets" / "manifest.parquet", cfg.caption, root / "captions" / "captions.parquet",
                     progress=False, pseudo_labeller=labeller)
    return cfg
