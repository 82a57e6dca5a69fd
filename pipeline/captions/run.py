"""caption stage logic: triplet manifest -> captions.parquet (id, split, local_prompt, global_prompt,
caption_source) for every split, unlabelled included.

The unlabelled split is captioned by `caption.unlabelled_backend` (pseudo_labeller or qwen2_5_vl: a model
that sees only the image and mask, as stage 2 of the method assumes); every other split by `caption.backend`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import pandas as pd
from tqdm import tqdm

from pipeline import paths
from pipeline.captions.annotations import add_noise, annotate
from pipeline.config import CaptionConfig
from pipeline.data.images import load_manifest
from pipeline.data.triplets import in_shard

COLUMNS = ["id", "split", "local_prompt", "global_prompt", "caption_source"]
UNLABELLED = "unlabelled"


class Captioner(Protocol):
    """One backend: (local, global, caption_source) for each row, in order."""

    def __call__(self, rows: list[dict], progress: bool) -> list[tuple[str | None, str | None, str]]: ...


def _annotations(cfg: CaptionConfig, noisy: bool) -> Captioner:
    def run(rows, progress):
        out = []
        for r in tqdm(rows, desc="captions", disable=not progress):
            loc, glo, source = annotate(r)
            if noisy:
                loc, changed = add_noise(r["id"], loc, cfg.noise_fraction, cfg.noise_seed)
                source = "caption_noise" if changed else source
            out.append((loc, glo, source))
        return out
    return run


def _model(name: str, captioner, cache) -> Captioner:
    return lambda rows, progress: [(loc, glo, name) for loc, glo in captioner.caption(rows, cache, progress)]


def captioner_for(name: str, cfg: CaptionConfig, pseudo_labeller: str | Path = paths.PSEUDO_LABELLER) -> Captioner:
    """The backend `name` (annotations | caption_noise | qwen2_5_vl | pseudo_labeller); models load here."""
    if name in ("annotations", "caption_noise"):
        return _annotations(cfg, noisy=name == "caption_noise")
    if name == "qwen2_5_vl":
        from pipeline.captions.cache import CaptionCache
        from pipeline.captions.qwen import QwenCaptioner

        cache = CaptionCache(Path(cfg.qwen.cache_dir) / "qwen2_5_vl.jsonl")
        return _model(name, QwenCaptioner(cfg.qwen), cache)
    if name == "pseudo_labeller":
        from pipeline.captions.pseudo_labeller import PseudoLabellerCaptioner

        return _model(name, PseudoLabellerCaptioner(pseudo_labeller, cfg.pseudo_labeller), None)
    raise ValueError(f"caption backend {name!r}: unknown")


def caption_rows(rows: list[dict], cfg: CaptionConfig, progress: bool = True,
                 pseudo_labeller: str | Path = paths.PSEUDO_LABELLER) -> pd.DataFrame:
    """Unlabelled rows by cfg.unlabelled_backend, the others by cfg.backend; a backend loads only when it has
    rows, and once (qwen2_5_vl for both is one model)."""
    unlabelled = [r["split"] == UNLABELLED for r in rows]
    if cfg.unlabelled_backend not in ("pseudo_labeller", "qwen2_5_vl"):  # the schema says so too: never ground truth
        raise ValueError(f"caption.unlabelled_backend: {cfg.unlabelled_backend!r} may not caption the unlabelled split")
    results: list = [None] * len(rows)
    loaded: dict[str, Captioner] = {}
    for name, wanted in ((cfg.backend, False), (cfg.unlabelled_backend, True)):
        idx = [i for i, u in enumerate(unlabelled) if u == wanted]
        if not idx:
            continue
        if name not in loaded:
            loaded[name] = captioner_for(name, cfg, pseudo_labeller)
        for i, res in zip(idx, loaded[name]([rows[i] for i in idx], progress)):
            results[i] = res
    out = [[r["id"], r["split"], *res] for r, res in zip(rows, results)]
    return pd.DataFrame(out, columns=COLUMNS)


def caption_manifest(manifest: str | Path, cfg: CaptionConfig, out: str | Path,
                     shard: tuple[int, int] = (0, 1), progress: bool = True,
                     pseudo_labeller: str | Path = paths.PSEUDO_LABELLER) -> pd.DataFrame:
    """Caption every row of a triplet manifest (or one shard of it, by id hash); writes `out` atomically,
    rows ordered by id. `pseudo_labeller`: the model folder the pseudo_labeller backend loads."""
    Path(cfg.qwen.cache_dir).mkdir(parents=True, exist_ok=True)  # a DVC `persist` out: exists for every backend
    df = load_manifest(manifest)
    rows = [r for r in df.to_dict("records") if in_shard(r["id"], shard)]
    # rows ordered by id: the shards' outputs, concatenated and ordered by id (pipeline.flows.merge_shards),
    # equal the unsharded output
    result = caption_rows(rows, cfg, progress, pseudo_labeller).sort_values("id", kind="stable").reset_index(drop=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    result.to_parquet(tmp, index=False)
    tmp.replace(out)
    return result
