"""The three data gates: triplet manifest, captions, encoded shards (params section `gates`)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import pandas as pd
from pipeline import paths
from pipeline.config import GatesConfig

from pipeline.data.images import image_bytes, image_exists, load_manifest
from pipeline.data.shards import tensor_keys
from pipeline.config import SPLITS
from pipeline.validation.gx import Check, run_gate




CAPTION_OK = "ok"


def caption_problem(text) -> str:
    """``CAPTION_OK``, or why ``text`` is not a prompt a text encoder should get. A prompt is printable text
    in any script -- letters with accents or umlauts, digits, quotes, ``?``, ``!``, symbols, single spaces --
    as a VLM writes it; it may not be blank, nor hold a control or format character (line breaks and tabs
    included), a surrogate, a private-use or unassigned code point, or U+FFFD (bytes that did not decode).
    Length bounds are a separate check (gates.caption_min_chars / caption_max_chars); a missing prompt
    (None/NaN) is the not-null checks' business and passes here."""
    if text is None or (isinstance(text, float) and text != text):
        return CAPTION_OK
    if not isinstance(text, str):
        return f"not text: {type(text).__name__}"
    if not text.strip():
        return "blank"
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "\ufffd":
            return "U+FFFD replacement character (undecodable bytes)"
        if cat.startswith("C") or cat in ("Zl", "Zp"):
            return f"{unicodedata.name(ch, 'control character')} (U+{ord(ch):04X}, category {cat})"
    return CAPTION_OK


def _sha(path: str) -> str | None:
    """sha1 of the stored bytes (a file's, or the PNG a shard reference names); None when absent."""
    return hashlib.sha1(image_bytes(path)).hexdigest() if image_exists(path) else None


def triplets_gate(manifest: str | Path, cfg: GatesConfig, image_size: int, out_dir: str | Path = paths.GATES) -> dict:
    df = load_manifest(manifest)
    df["image_exists"] = [isinstance(p, str) and image_exists(p) for p in df["image"]]  # file or shard reference
    df["mask_exists"] = [isinstance(p, str) and image_exists(p) for p in df["mask"]]
    df["image_sha1"] = [_sha(p) if isinstance(p, str) else None for p in df["image"]]
    df["splits_sharing_image"] = df.groupby("image_sha1")["split"].transform("nunique").fillna(1).astype(int)
    df["unlabelled_without_prompt"] = (df["split"] != "unlabelled") | df["local_prompt"].isna()
    c = "triplets"
    checks = [Check(c, "ExpectColumnValuesToNotBeNull", {"column": k}, "non-null paths and keys")
              for k in ("id", "split", "image", "mask")]
    checks += [
        Check(c, "ExpectColumnValuesToBeUnique", {"column": "id"}, "unique ids"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}, "known splits"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "splits_sharing_image", "value_set": [1]},
              "disjoint splits: an image (by content) in one split only"),
        Check(c, "ExpectColumnValuesToBeBetween", {"column": "mask_fraction", "min_value": cfg.mask_fraction_min,
                                                   "max_value": cfg.mask_fraction_max}, "mask fraction bounds"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "width", "value_set": [image_size]}, "image size"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "height", "value_set": [image_size]}, "image size"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "image_exists", "value_set": [True]}, "image file exists"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "mask_exists", "value_set": [True]}, "mask file exists"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "unlabelled_without_prompt", "value_set": [True]},
              "the unlabelled pool carries no local prompt"),
        Check(c, "ExpectTableRowCountToBeBetween", {"min_value": 1}, "not empty"),
    ]
    return run_gate("triplets", {c: df}, checks, out_dir)


def captions_gate(captions: str | Path, manifest: str | Path, cfg: GatesConfig,
                  out_dir: str | Path = paths.GATES) -> dict:
    cap = pd.read_parquet(captions)
    man = load_manifest(manifest, resolve=False)
    cap["in_manifest"] = cap["id"].isin(set(man["id"]))
    cap["local_differs_from_global"] = cap["global_prompt"].isna() | (cap["local_prompt"] != cap["global_prompt"])
    # stage 2's premise: unlabelled prompts come from a model that saw only image and mask, never ground truth
    cap["unlabelled_not_from_ground_truth"] = (cap["split"] != "unlabelled") | \
        ~cap["caption_source"].isin(["annotations", "caption_noise", "manifest"])
    for col in ("local_prompt", "global_prompt"):
        cap[f"{col}_check"] = cap[col].map(caption_problem)
    c = "captions"
    checks = [
        Check(c, "ExpectTableRowCountToEqual", {"value": len(man)}, "one caption per manifest row"),
        Check(c, "ExpectColumnValuesToBeUnique", {"column": "id"}, "unique ids"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "in_manifest", "value_set": [True]}, "ids from the manifest"),
        Check(c, "ExpectColumnValuesToNotBeNull", {"column": "local_prompt"}, "every row has a local prompt"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "local_differs_from_global", "value_set": [True]},
              "local prompt differs from global prompt"),
        Check(c, "ExpectColumnValuesToBeInSet", {"column": "unlabelled_not_from_ground_truth", "value_set": [True]},
              "unlabelled rows captioned by a model (caption_source not annotations/caption_noise/manifest)"),
    ]
    for col in ("local_prompt", "global_prompt"):
        checks += [
            Check(c, "ExpectColumnValueLengthsToBeBetween",
                  {"column": col, "min_value": cfg.caption_min_chars, "max_value": cfg.caption_max_chars},
                  "length bounds (chars)"),
            Check(c, "ExpectColumnValuesToBeInSet", {"column": f"{col}_check", "value_set": [CAPTION_OK]},
                  "printable text: no control characters, line breaks or undecodable bytes; not blank"),
        ]
    if cfg.require_global:
        checks.append(Check(c, "ExpectColumnValuesToNotBeNull", {"column": "global_prompt"}, "global prompt"))
    return run_gate("captions", {c: cap}, checks, out_dir)


def _check_shapes(t: dict, latent_channels: int) -> list[str]:
    """Shapes of one shard's tensors (the control's: masked_latents + mask under inpaint, control_latents
    under edges, pipeline.models.condition.shard_keys; the latents' shape for both)."""
    n = t["latents"].shape[0]
    lat = tuple(t["latents"].shape)
    problems = []
    if len(lat) != 4 or lat[1] != latent_channels:
        problems.append(f"latents {lat} not (N,{latent_channels},h,w)")
    for k in ("masked_latents", "control_latents"):
        if k in t and tuple(t[k].shape) != lat:
            problems.append(f"{k} {tuple(t[k].shape)} != latents {lat}")
    if len(lat) == 4 and "mask" in t and tuple(t["mask"].shape) != (n, 1, *lat[2:]):
        problems.append(f"mask {tuple(t['mask'].shape)} not (N,1,h,w) = {(n, 1, *lat[2:])}")
    for p in ("", "global_"):
        e, pooled = t[f"{p}prompt_embeds"], t[f"{p}pooled_prompt_embeds"]
        if e.ndim != 3 or pooled.ndim != 2:
            problems.append(f"{p}prompt_embeds {tuple(e.shape)} not (N,T,D) or {p}pooled_prompt_embeds "
                            f"{tuple(pooled.shape)} not (N,P)")
    if t["global_prompt_embeds"].shape[1:] != t["prompt_embeds"].shape[1:]:
        problems.append("global_prompt_embeds and prompt_embeds differ in shape")
    wrong_n = {k: v.shape[0] for k, v in t.items() if v.shape[0] != n}
    if wrong_n:
        problems.append(f"tensors disagree on N (latents {n}): {wrong_n}")
    return problems


def inspect_shards(encoded: str | Path, manifest: pd.DataFrame, latent_channels: int, condition: str = "inpaint"):
    """Per-shard and per-split check frames for the encoded data, in the format of pipeline.data.shards:
    <split>/shard-XXXXX-of-YYYYY.safetensors with the row ids in the sibling .parquet of the same name.
    Every split of the manifest is expected; a split folder the manifest lacks fails too."""
    from safetensors import safe_open

    keys = tensor_keys(condition)
    encoded = Path(encoded)
    if not encoded.is_dir():
        raise FileNotFoundError(f"{encoded}: no encoded data (run the encode stage)")
    on_disk = {p.name for p in encoded.iterdir() if p.is_dir() and not p.name.startswith(".")}
    shard_rows, split_rows = [], []
    for split in sorted(on_disk | set(manifest["split"].dropna())):
        split_dir = encoded / split
        total, dims, ids, of = 0, set(), [], set()
        for shard in sorted(split_dir.glob("shard-*.safetensors")):
            row = {"split": split, "shard": shard.name, "rows": 0, "id_rows": 0, "all_finite": True,
                   "shapes_ok": True, "ids_match_rows": True, "detail": ""}
            m = re.fullmatch(r"shard-(\d+)-of-(\d+)\.safetensors", shard.name)
            if m:
                of.add(int(m.group(2)))
            problems = [] if m else ["name is not shard-XXXXX-of-YYYYY.safetensors"]
            index = shard.with_suffix(".parquet")
            try:
                shard_ids = list(pd.read_parquet(index)["id"])
            except Exception as exc:  # noqa: BLE001 - missing or unreadable id file
                shard_ids = []
                row["ids_match_rows"] = False
                problems.append(f"ids: {index.name} unreadable ({type(exc).__name__}: {exc})")
            ids += shard_ids
            try:
                with safe_open(str(shard), "pt") as f:
                    t = {k: f.get_tensor(k) for k in keys if k in f.keys()}
            except Exception as exc:  # noqa: BLE001
                row.update(all_finite=False, shapes_ok=False, ids_match_rows=False,
                           detail="; ".join(problems + [f"unreadable: {exc}"]))
                shard_rows.append(row)
                continue
            missing = [k for k in keys if k not in t]
            if missing:
                row.update(shapes_ok=False, ids_match_rows=False)
                problems.append(f"missing tensors {missing}")
            else:
                n = t["latents"].shape[0]
                shape_problems = _check_shapes(t, latent_channels)
                dims.add(tuple(tuple(v.shape[1:]) for v in t.values()))
                bad = [k for k, v in t.items() if v.is_floating_point() and not bool(v.isfinite().all())]
                if row["ids_match_rows"] and len(shard_ids) != n:
                    row["ids_match_rows"] = False
                    problems.append(f"{index.name} lists {len(shard_ids)} ids for {n} tensor rows")
                problems += shape_problems + ([f"non-finite: {bad}"] if bad else [])
                row.update(rows=n, all_finite=not bad, shapes_ok=not shape_problems)
                total += n
            row.update(id_rows=len(shard_ids), detail="; ".join(problems))
            shard_rows.append(row)
        want = list(manifest.loc[manifest["split"] == split, "id"])
        split_rows.append({"split": split, "encoded_rows": total, "id_rows": len(ids), "manifest_rows": len(want),
                           "count_matches_manifest": total == len(ids) == len(want),
                           "ids_match_manifest": sorted(ids) == sorted(want),
                           "unique_ids": len(set(ids)) == len(ids),
                           "one_shard_count": len(of) <= 1,
                           "dims_consistent": len(dims) <= 1,
                           "shard_counts": ",".join(str(x) for x in sorted(of))})
    return pd.DataFrame(shard_rows), pd.DataFrame(split_rows)


def latent_channels(foundation: str | Path) -> int:
    """The channels the shards' latents must have: those of the VAE that encoded them, the foundation's
    (``<foundation>/vae/config.json``), not a number of our own."""
    return int(json.loads((Path(foundation) / "vae" / "config.json").read_text())["latent_channels"])


def encoded_gate(encoded: str | Path, manifest: str | Path, cfg: GatesConfig,
                 out_dir: str | Path = paths.GATES, foundation: str | Path = paths.BACKBONE,
                 condition: str = "inpaint") -> dict:
    shards, splits = inspect_shards(encoded, load_manifest(manifest, resolve=False), latent_channels(foundation),
                                    condition)
    checks = [
        Check("shards", "ExpectTableRowCountToBeBetween", {"min_value": 1}, "at least one shard"),
        Check("shards", "ExpectColumnValuesToBeInSet", {"column": "all_finite", "value_set": [True]}, "finite values"),
        Check("shards", "ExpectColumnValuesToBeInSet", {"column": "shapes_ok", "value_set": [True]}, "tensor shapes"),
        Check("shards", "ExpectColumnValuesToBeInSet", {"column": "ids_match_rows", "value_set": [True]},
              "each shard's .parquet lists one id per tensor row"),
        Check("splits", "ExpectColumnValuesToBeInSet", {"column": "count_matches_manifest", "value_set": [True]},
              "rows in shards == ids in the shards' .parquet == manifest rows, per split"),
        Check("splits", "ExpectColumnValuesToBeInSet", {"column": "ids_match_manifest", "value_set": [True]},
              "shard ids == manifest ids"),
        Check("splits", "ExpectColumnValuesToBeInSet", {"column": "unique_ids", "value_set": [True]},
              "no id in two shards"),
        Check("splits", "ExpectColumnValuesToBeInSet", {"column": "one_shard_count", "value_set": [True]},
              "all shards of a split from one --shard i/N run (no stale shards of another N)"),
        Check("splits", "ExpectColumnValuesToBeInSet", {"column": "dims_consistent", "value_set": [True]},
              "same dims in every shard"),
    ]
    if shards.empty:
        shards = pd.DataFrame(columns=["split", "shard", "rows", "id_rows", "all_finite", "shapes_ok",
                                       "ids_match_rows", "detail"])
    return run_gate("encoded", {"shards": shards, "splits": splits}, checks, out_dir)
