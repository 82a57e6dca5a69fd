"""build_triplets: synthetic scenes or a user dataset -> a checked, resized triplet manifest plus files.

Inputs (params section `triplets`, see TripletsConfig): the synthetic scenes manifest (default), a user
manifest (CSV / parquet / JSONL: image, mask?, prompt?, split?, id?, global_prompt?, objects?; paths
relative to the manifest; without an id column the id is the image path relative to the manifest, minus
its suffix), or image and mask folders (masks matched by file stem). Splits: labelled, unlabelled, val,
test (train and validation / valid accepted). Images and masks are read by images.to_rgb / to_mask.
Masks are binarised with pixel > 127 = hole (images.MASK_THRESHOLD). Rows without a mask get a
generated one (stroke / box, seeded by row id, so shards agree with the unsharded run).
Input image / mask / instances columns may hold file paths or shard references (the scenes' own).
Output: OUT/manifest.parquet (OUTPUT_COLUMNS), OUT/shards/*.parquet (pipeline.data.image_shards: per row the
image, mask and instances (synthetic only) PNGs; the manifest's image / mask / instances columns hold
references into them), OUT/rejects.csv (on_bad=skip).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import write_dir
from pipeline.config import TripletsConfig
from pipeline.data.image_shards import ShardWriter, png_bytes
from pipeline.data.images import MASK_THRESHOLD, PixelError, image_exists, open_image, to_mask, to_rgb
from pipeline.config import SPLITS, WORLD_SPLIT
from pipeline.data.synthetic import random_mask

OUTPUT_COLUMNS = [
    "id", "split", "image", "mask", "instances", "local_prompt", "global_prompt", "objects", "background",
    "mask_kind", "object_index", "width", "height", "mask_fraction", "source",
]
REJECT_COLUMNS = ["row", "id", "file", "kind", "reason"]
SPLIT_ALIASES = {"train": "labelled", "validation": "val", "valid": "val"}
ALLOWED_SPLITS = f"{', '.join(SPLITS)}; also train = labelled, validation or valid = val"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}



class BadRowsError(RuntimeError):
    """on_bad=fail and some rows are bad; the message lists the first ones (file and reason)."""


class ManifestError(ValueError):
    """The input as a whole is unusable (unreadable, empty, no image column); the message names the file."""


@dataclass
class Bad(Exception):
    file: str
    reason: str
    kind: str  # missing_file | unreadable | alpha_mask | size_mismatch | empty_mask | full_mask | duplicate_id
    #            | unknown_split


# ---------------------------------------------------------------- reading inputs

def read_table(path: str | Path) -> pd.DataFrame:
    """A manifest as a table; ManifestError (naming the file and why) when it cannot be one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    readers = {
        ".csv": lambda: pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8").replace({"": None}),
        ".parquet": lambda: pd.read_parquet(path), ".pq": lambda: pd.read_parquet(path),
        ".jsonl": lambda: pd.read_json(path, lines=True, dtype=False, encoding="utf-8"),
        ".json": lambda: pd.read_json(path, dtype=False, encoding="utf-8"),
    }
    if suffix not in readers:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r} (csv, parquet, jsonl)")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder, not a manifest file")
    if path.stat().st_size == 0:
        raise ManifestError(f"{path}: empty file (0 bytes); a manifest needs a header and a row per image")
    try:
        df = readers[suffix]()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                            "save it as UTF-8") from exc
    except Exception as exc:  # noqa: BLE001 - every reader error means the same: this file is not a manifest
        raise ManifestError(f"{path}: cannot read it as {suffix[1:]}: {type(exc).__name__}: {exc}") from exc
    if "image" not in df.columns:
        raise ManifestError(f"{path}: manifest has no 'image' column (columns: {list(df.columns)})")
    if df.empty:
        raise ManifestError(f"{path}: manifest has no rows (only a header), nothing to build")
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


def path_id(image, base: Path) -> str:
    """Id of a row without one: the image path relative to the manifest minus its suffix, so that a/x.png
    and b/x.png stay apart. An absolute path outside the manifest's folder keeps all its folders."""
    if not image:
        return ""
    p = Path(str(image))
    if p.is_absolute():
        try:
            p = p.relative_to(os.path.abspath(base))
        except ValueError:
            pass
    return "/".join(q for q in p.with_suffix("").parts if q not in (p.anchor, ".", ".."))


def clean_id(rid) -> str:
    # ids name output files: only safe characters, and no leading dot (hidden file, "..")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(rid)).lstrip(".") or "_"


def canonical_split(name) -> str:
    """labelled / unlabelled / val / test, also from train, validation, valid (any case); else unchanged."""
    s = SPLIT_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    return s if s in SPLITS else str(name)


def normalise(df: pd.DataFrame, base: Path, source: str, default_split: str) -> pd.DataFrame:
    """Any input table -> columns id, split, image, mask, instances, local_prompt, global_prompt,
    objects, background, mask_kind, source (paths resolved against `base`)."""
    rows = []
    for _, r in df.iterrows():
        image = _resolve(base, _val(r, "image"))
        rows.append({
            "id": clean_id(_val(r, "id") or path_id(_val(r, "image"), base)),
            "split": canonical_split(_val(r, "split") or default_split),
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
    """Images of one folder (not recursive), masks matched by stem; id = stem (the path in the folder)."""
    for d in (image_dir, mask_dir):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{d}: folder not found")
    images = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise ManifestError(f"{image_dir}: no images in the folder ({', '.join(sorted(IMAGE_EXTS))})")
    masks = {}
    if mask_dir is not None:
        masks = {p.stem: str(p) for p in Path(mask_dir).iterdir() if p.suffix.lower() in IMAGE_EXTS}
    return pd.DataFrame({"id": [p.stem for p in images], "image": [str(p) for p in images],
                         "mask": [masks.get(p.stem) for p in images]})


def load_input(cfg: TripletsConfig, scenes_manifest: str | Path) -> pd.DataFrame:
    if cfg.source == "synthetic":
        path = Path(scenes_manifest)
        scenes = read_table(path)  # the world split trains the tiny world only: never a triplet
        return normalise(scenes[scenes["split"] != WORLD_SPLIT], path.parent, "synthetic", cfg.default_split)
    if cfg.source == "manifest":
        if not cfg.manifest:
            raise ValueError("triplets.manifest: required when triplets.source is 'manifest'")
        path = Path(cfg.manifest)
        return normalise(read_table(path), path.parent, path.name, cfg.default_split)
    if not cfg.image_dir:
        raise ValueError("triplets.image_dir: required when triplets.source is 'folders'")
    return normalise(from_folders(cfg.image_dir, cfg.mask_dir), Path("."), "folders", cfg.default_split)


# ---------------------------------------------------------------- per-row processing

def _open(path: str | None, what: str, convert) -> Image.Image:
    """Decode ``path`` fully (truncated files fail) and ``convert`` it (images.to_rgb / to_mask)."""
    if path is None or not image_exists(path):
        raise Bad(str(path), f"missing file ({what})", "missing_file")
    try:
        return convert(open_image(path))
    except PixelError as exc:
        raise Bad(path, f"{what}: {exc}", exc.kind)
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


def process_row(row: dict, cfg: TripletsConfig, size: int, shards: ShardWriter) -> dict:
    """Check, resize and write one row; raises Bad(file, reason) before writing anything."""
    if row["split"] not in SPLITS:
        raise Bad(str(row["image"]), f"unknown split {row['split']!r} (allowed: {ALLOWED_SPLITS})", "unknown_split")
    img = _open(row["image"], "image", to_rgb)
    orig = img.size
    box = crop_box(*img.size, cfg.resize)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    kind = row["mask_kind"]
    if row["mask"] is not None:
        m = _open(row["mask"], "mask", to_mask)
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
    inst = None
    if row["instances"] is not None:
        inst = _open(row["instances"], "instances", lambda i: i.convert("L"))
        inst = png_bytes(inst.resize((size, size), Image.NEAREST, box=box))
    refs = shards.add(row["id"], {"image": png_bytes(img), "mask": png_bytes(hole, "L"), "instances": inst})
    unlabelled = row["split"] == "unlabelled"  # the stage-2 pool carries no prompts
    return {**row, **refs, "mask_kind": kind,
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
    """Write the triplet folder atomically; returns (manifest, metrics). Raises BadRowsError (on_bad=fail),
    NotOurOutputError (``out`` holds files this project did not write)."""
    out = Path(out)
    seen: dict[str, int] = {}
    dup_of = {}
    for i, rid in enumerate(rows["id"]):  # duplicates are judged on the whole input, before sharding
        if rid in seen:
            dup_of[i] = seen[rid]
        else:
            seen[rid] = i
    with write_dir(out) as tmp:  # refuses an --out holding files we did not write; nothing partial on error
        good, bad = [], []
        records = [{k: _val(r, k) for k in r} for r in rows.to_dict("records")]  # NaN -> None
        todo = [(i, r) for i, r in enumerate(records) if in_shard(r["id"], shard)]
        # shard files named per --shard run, so that merging shard folders file by file never collides
        prefix = "part" if shard[1] == 1 else f"part-{shard[0]}of{shard[1]}"
        with ShardWriter(tmp, prefix=prefix) as shards:
            for i, r in tqdm(todo, desc=f"triplets {shard[0]}/{shard[1]}", disable=not progress):
                try:
                    if i in dup_of:
                        raise Bad(str(r["image"]), f"duplicate id {r['id']!r} (first at row {dup_of[i]})",
                                  "duplicate_id")
                    good.append(process_row(r, cfg, size, shards))
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
    return df, metrics


def merge_shards(dirs: list[str | Path]) -> pd.DataFrame:
    """Union of shard manifests (paths made relative to the cwd), sorted by id."""
    from pipeline.data.images import load_manifest
    return pd.concat([load_manifest(Path(d) / "manifest.parquet") for d in dirs]).sort_values("id") \
        .reset_index(drop=True)
