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

from pipeline import distributed, paths
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


PSEUDO_LABELLER_BATCH = 256   # rows per pseudo-labeller forward


def rows_per_call(name: str, cfg: CaptionConfig) -> int:
    """Rows backend ``name`` takes per model call (1: row by row): the unit in which the processes of a
    launched run share its rows, so that each row is captioned in the batch it has with one process."""
    return {"qwen2_5_vl": cfg.qwen.batch_size, "pseudo_labeller": PSEUDO_LABELLER_BATCH}.get(name, 1)


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

        return _model(name, PseudoLabellerCaptioner(pseudo_labeller, cfg.pseudo_labeller, PSEUDO_LABELLER_BATCH), None)
    raise ValueError(f"caption backend {name!r}: unknown")


def caption_rows(rows: list[dict], cfg: CaptionConfig, progress: bool = True,
                 pseudo_labeller: str | Path = paths.PSEUDO_LABELLER) -> pd.DataFrame | None:
    """Unlabelled rows by cfg.unlabelled_backend, the others by cfg.backend; a backend loads only when it has
    rows, and once (qwen2_5_vl for both is one model).

    Launched on several processes (pipeline.distributed), each captions a contiguous run of each backend's
    batches (rows_per_call); rank 0 returns the frame of every row, the other ranks None."""
    unlabelled = [r["split"] == UNLABELLED for r in rows]
    if cfg.unlabelled_backend not in ("pseudo_labeller", "qwen2_5_vl"):  # the schema says so too: never ground truth
        raise ValueError(f"caption.unlabelled_backend: {cfg.unlabelled_backend!r} may not caption the unlabelled split")
    # Only files cross between the processes (the parts); gloo's barrier serves whatever device the models use.
    w = distributed.connect("cpu")
    results: dict[int, tuple] = {}
    loaded: dict[str, Captioner] = {}
    for name, wanted in ((cfg.backend, False), (cfg.unlabelled_backend, True)):
        idx = [i for i, u in enumerate(unlabelled) if u == wanted]
        idx = idx[w.rows(len(idx), rows_per_call(name, cfg))]
        if not idx:
            continue
        if name not in loaded:
            loaded[name] = captioner_for(name, cfg, pseudo_labeller)
        for i, res in zip(idx, loaded[name]([rows[i] for i in idx], progress)):
            results[i] = res
    results = _merged(results, w)
    if results is None:
        return None
    out = [[r["id"], r["split"], *results[i]] for i, r in enumerate(rows)]
    return pd.DataFrame(out, columns=COLUMNS)


def _merged(results: dict[int, tuple], w: distributed.World) -> dict[int, tuple] | None:
    """Every rank's captions (row position -> result) on rank 0, None on the others; one process: its own."""
    with distributed.parts("caption", w) as job:
        if job is None:
            return results
        job.save("captions", [[i, *res] for i, res in results.items()])
        dirs = job.gather()
        return None if dirs is None else {i: tuple(res) for part in distributed.load_parts(dirs, "captions")
                                          for i, *res in part}


def caption_manifest(manifest: str | Path, cfg: CaptionConfig, out: str | Path,
                     shard: tuple[int, int] = (0, 1), progress: bool = True,
                     pseudo_labeller: str | Path = paths.PSEUDO_LABELLER) -> pd.DataFrame | None:
    """Caption every row of a triplet manifest (or one shard of it, by id hash); writes `out` atomically,
    rows ordered by id. `pseudo_labeller`: the model folder the pseudo_labeller backend loads. Launched on
    several processes, rank 0 writes `out` and returns the frame; the other ranks return None."""
    if distributed.world().main:
        Path(cfg.qwen.cache_dir).mkdir(parents=True, exist_ok=True)  # a DVC `persist` out: exists for every backend
    df = load_manifest(manifest)
    rows = [r for r in df.to_dict("records") if in_shard(r["id"], shard)]
    result = caption_rows(rows, cfg, progress, pseudo_labeller)
    if result is None:
        return None
    # rows ordered by id: the shards' outputs, concatenated and ordered by id (pipeline.flows.merge_shards),
    # equal the unsharded output
    result = result.sort_values("id", kind="stable").reset_index(drop=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    result.to_parquet(tmp, index=False)
    tmp.replace(out)
    return result
