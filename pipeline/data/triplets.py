"""build_triplets: synthetic scenes or a user dataset -> a checked, resized triplet manifest plus files.

Inputs (params section `triplets`, see TripletsConfig): the synthetic scenes manifest (default), a user
manifest (CSV / parquet / JSONL: image, mask?, prompt?, split?, id?, global_prompt?, objects?; paths
relative to the manifest), or image and mask folders (masks matched by file stem).
Masks are binarised with pixel > 127 = hole (images.MASK_THRESHOLD). Rows without a mask get a
generated one (stroke / box, seeded by row id, so shards agree with the unsharded run).
Output: OUT/manifest.parquet (OUTPUT_COLUMNS), OUT/images/<id>.png, OUT/masks/<id>.png,
OUT/instances/<id>.png (synthetic only), OUT/rejects.csv (on_bad=skip).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.config import TripletsConfig
from pipeline.data.images import MASK_THRESHOLD
from pipeline.data.synthetic import SPLITS, atomic_dir, commit_dir, random_mask

OUTPUT_COLUMNS = [
    "id", "split", "image", "mask", "instances", "local_prompt", "global_prompt", "objects", "background",
    "mask_kind", "object_index", "width", "height", "mask_fraction", "source",
]
REJECT_COLUMNS = ["row", "id", "file", "kind", "reason"]



class BadRowsError(RuntimeError):
    """on_bad=fail and some rows are bad; the message lists the first ones (file and reason)."""


@dataclass
class Bad(Exception):
    file: str
    reason: str
    kind: str  # missing_file | unreadable | size_mismatch | empty_mask | full_mask | duplicate_id | unknown_split


# ---------------------------------------------------------------- reading inputs

def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False).replace({"": None})
    elif suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    else:
        raise ValueError(f"{path}: unknown manifest format {suffix!r} (csv, parquet, jsonl)")
    if "image" not in df.columns:
        raise ValueError(f"{path}: manifest has no 'image' column (columns: {list(df.columns)})")
    return df


def _val(row, col):
    v = row.get(col)
    if v is None or (np.ndim(v) == 0 and pd.isna(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _resolve(base: Path, p) -> str | None:
    if p is None:
        return None
    p = Path(str(p))
    return str(p if p.is_absolute() else base / p)


def normalise(df: pd.DataFrame, base: Path, source: str, default_split: str) -> pd.DataFrame:
    """Any input table -> columns id, split, image, mask, instances, local_prompt, global_prompt,
    objects, background, mask_kind, source (paths resolved against `base`)."""
    rows = []
    for _, r in df.iterrows():
        image = _resolve(base, _val(r, "image"))
        rid = _val(r, "id") or (Path(str(_val(r, "image") or "")).stem)
        rows.append({
            "id": re.sub(r"[^A-Za-z0-9_.-]", "_", str(rid)),
            "split": _val(r, "split") or default_split,
            "image": image,
            "mask": _resolve(base, _val(r, "mask")),
            "instances": _resolve(base, _val(r, "instances")),
            "local_prompt": _val(r, "local_prompt") or _val(r, "prompt"),
            "global_prompt": _val(r, "global_prompt"),
            "objects": _val(r, "objects") if _val(r, "objects") is None or isinstance(_val(r, "objects"), str)
            else json.dumps(_val(r, "objects")),
            "background": _val(r, "background"),
            "mask_kind": _val(r, "mask_kind") or ("given" if _val(r, "mask") else None),
            "object_index": int(_val(r, "object_index")) if _val(r, "object_index") is not None else -1,
            "source": source,
        })
    return pd.DataFrame(rows, columns=[c for c in OUTPUT_COLUMNS if c not in ("width", "height", "mask_fraction")])


def from_folders(image_dir: str | Path, mask_dir: str | Path | None) -> pd.DataFrame:
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
    images = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in exts)
    masks = {}
    if mask_dir is not None:
        masks = {p.stem: str(p) for p in Path(mask_dir).iterdir() if p.suffix.lower() in exts}
    return pd.DataFrame({"image": [str(p) for p in images], "mask": [masks.get(p.stem) for p in images]})


def load_input(cfg: TripletsConfig, scenes_manifest: str | Path) -> pd.DataFrame:
    if cfg.source == "synthetic":
        path = Path(scenes_manifest)
        return normalise(read_table(path), path.parent, "synthetic", cfg.default_split)
    if cfg.source == "manifest":
        if not cfg.manifest:
            raise ValueError("triplets.manifest: required when triplets.source is 'manifest'")
        path = Path(cfg.manifest)
        return normalise(read_table(path), path.parent, path.name, cfg.default_split)
    if not cfg.image_dir:
        raise ValueError("triplets.image_dir: required when triplets.source is 'folders'")
    return normalise(from_folders(cfg.image_dir, cfg.mask_dir), Path("."), "folders", cfg.default_split)


# ---------------------------------------------------------------- per-row processing

def _open(path: str | None, what: str, mode: str) -> Image.Image:
    if path is None or not Path(path).is_file():
        raise Bad(str(path), f"missing file ({what})", "missing_file")
    try:
        img = Image.open(path)
        img.load()  # full decode: catches truncated files
        return img.convert(mode)
    except Exception as exc:  # noqa: BLE001 - any decoder error is a bad row
        raise Bad(path, f"unreadable {what}: {type(exc).__name__}: {exc}", "unreadable")


def crop_box(w: int, h: int, mode: str) -> tuple[int, int, int, int]:
    if mode == "stretch":
        return 0, 0, w, h
    s = min(w, h)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return x0, y0, x0 + s, y0 + s


def row_rng(seed: int, row_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(row_id.encode())])


def _check_hole(hole: np.ndarray, file: str, when: str = "") -> None:
    if not hole.any():
        raise Bad(file, f"mask empty{when}", "empty_mask")
    if hole.all():
        raise Bad(file, f"mask covers everything{when}", "full_mask")


def process_row(row: dict, cfg: TripletsConfig, size: int, out: Path) -> dict:
    """Check, resize and write one row; raises Bad(file, reason)."""
    if row["split"] not in SPLITS:
        raise Bad(str(row["image"]), f"unknown split {row['split']!r} (allowed: {list(SPLITS)})", "unknown_split")
    img = _open(row["image"], "image", "RGB")
    orig = img.size
    box = crop_box(*img.size, cfg.resize)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    kind = row["mask_kind"]
    if row["mask"] is not None:
        m = _open(row["mask"], "mask", "L")
        if m.size != orig:
            raise Bad(row["mask"], f"mask size {m.size[0]}x{m.size[1]} differs from image {orig[0]}x{orig[1]}",
                      "size_mismatch")
        _check_hole(np.asarray(m) > MASK_THRESHOLD, row["mask"])
        hole = np.asarray(m.resize((size, size), Image.NEAREST, box=box)) > MASK_THRESHOLD
        _check_hole(hole, row["mask"], " after resize/crop")
    else:
        rng = row_rng(cfg.mask_seed, row["id"])
        kind = cfg.mask_kinds[int(rng.integers(len(cfg.mask_kinds)))]
        hole, kind = random_mask(size, rng, kind)
    rel = {k: f"{k}s/{row['id']}.png" for k in ("image", "mask")}
    img.save(out / rel["image"], compress_level=1)
    Image.fromarray(hole.astype(np.uint8) * 255, "L").save(out / rel["mask"], compress_level=1)
    instances = None
    if row["instances"] is not None:
        inst = _open(row["instances"], "instances", "L").resize((size, size), Image.NEAREST, box=box)
        instances = f"instances/{row['id']}.png"
        inst.save(out / instances, compress_level=1)
    unlabelled = row["split"] == "unlabelled"  # the stage-2 pool carries no prompts
    return {**row, **rel, "instances": instances, "mask_kind": kind,
            "object_index": row["object_index"] if row["mask"] is not None else -1,
            "local_prompt": None if unlabelled else row["local_prompt"],
            "global_prompt": None if unlabelled else row["global_prompt"],
            "width": size, "height": size, "mask_fraction": float(hole.mean())}


# ---------------------------------------------------------------- the build

def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard: expected i/N with 0 <= i < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(row_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic shard membership by id hash (independent of row order)."""
    i, n = shard
    return n == 1 or zlib.crc32(row_id.encode()) % n == i


def build_triplets(rows: pd.DataFrame, cfg: TripletsConfig, size: int, out: str | Path,
                   shard: tuple[int, int] = (0, 1), progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Write the triplet folder atomically; returns (manifest, metrics). Raises BadRowsError (on_bad=fail)."""
    out = Path(out)
    seen: dict[str, int] = {}
    dup_of = {}
    for i, rid in enumerate(rows["id"]):  # duplicates are judged on the whole input, before sharding
        if rid in seen:
            dup_of[i] = seen[rid]
        else:
            seen[rid] = i
    tmp = atomic_dir(out)
    try:
        for d in ("images", "masks", "instances"):
            (tmp / d).mkdir()
        good, bad = [], []
        records = [{k: _val(r, k) for k in r} for r in rows.to_dict("records")]  # NaN -> None
        todo = [(i, r) for i, r in enumerate(records) if in_shard(r["id"], shard)]
        for i, r in tqdm(todo, desc=f"triplets {shard[0]}/{shard[1]}", disable=not progress):
            try:
                if i in dup_of:
                    raise Bad(str(r["image"]), f"duplicate id {r['id']!r} (first at row {dup_of[i]})",
                              "duplicate_id")
                good.append(process_row(r, cfg, size, tmp))
            except Bad as b:
                bad.append({"row": i, "id": r["id"], "file": b.file, "reason": b.reason, "kind": b.kind})
        rejects = pd.DataFrame(bad, columns=REJECT_COLUMNS)
        if bad and cfg.on_bad == "fail":
            lines = [f"  row {b['row']} ({b['id']}): {b['file']}: {b['reason']}" for b in bad[:cfg.report_rows]]
            more = f"\n  ... and {len(bad) - cfg.report_rows} more" if len(bad) > cfg.report_rows else ""
            raise BadRowsError(f"{len(bad)} bad row(s) of {len(todo)} (triplets.on_bad=fail; "
                               f"set it to skip to drop them):\n" + "\n".join(lines) + more)
        df = pd.DataFrame(good, columns=OUTPUT_COLUMNS)
        df["object_index"] = df["object_index"].astype("int64")  # -1: not an object mask
        df["width"] = df["width"].astype("int64")
        df["height"] = df["height"].astype("int64")
        df.to_parquet(tmp / "manifest.parquet", index=False)
        rejects.to_csv(tmp / "rejects.csv", index=False)
        metrics = {
            "rows": len(todo), "written": len(df), "rejected": len(bad),
            "rejected_by_kind": {k: int(v) for k, v in rejects["kind"].value_counts().sort_index().items()},
            "splits": {k: int(v) for k, v in df["split"].value_counts().sort_index().items()},
            "shard": f"{shard[0]}/{shard[1]}",
        }
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return df, metrics


def merge_shards(dirs: list[str | Path]) -> pd.DataFrame:
    """Union of shard manifests (paths made relative to the cwd), sorted by id."""
    from pipeline.data.images import load_manifest
    return pd.concat([load_manifest(Path(d) / "manifest.parquet") for d in dirs]).sort_values("id") \
        .reset_index(drop=True)
