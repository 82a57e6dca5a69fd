"""Encoded shards: what training reads instead of running the VAE and text encoders per step.

data/encoded/<split>/shard-<i>-of-<N>.safetensors holds, per row: ``latents`` (the image, 16 x h x w),
``masked_latents`` (the image with its hole set to -1, encoded), ``mask`` (1 x h x w, 1 = hole) under
condition inpaint, or ``control_latents`` (the encoded edge map) under condition edges
(pipeline.models.condition.shard_keys),
``prompt_embeds`` / ``pooled_prompt_embeds`` (the local prompt) and ``global_prompt_embeds`` /
``global_pooled_prompt_embeds``, exactly as the stock SD3 pipeline's encode_prompt computes them. Row ids
are in the sibling ``.parquet`` of the same name. A split's rows are ordered by id across all its shards,
so N shards read exactly as one.

Memory does not grow with the data: ``write_shard_stream`` writes a shard from micro-batches as they are
encoded (each batch's rows straight to their offsets in the file), and ``EncodedSplit`` reads the rows of
one batch from the files that hold them. At SD3 size a row is ~6 MB (prompt_embeds alone 333 x 4096
floats), so a split held in RAM would be hundreds of GB. ``concat_shards`` joins the shards that several
processes wrote of consecutive rows (pipeline.distributed) into the file one process writes, streamed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from pipeline.atomic import write_file



def tensor_keys(condition: str = "inpaint") -> tuple[str, ...]:
    """Every tensor a shard holds under ``condition`` (the control's keys: pipeline.models.condition)."""
    from pipeline.models.condition import shard_keys

    return ("latents", *shard_keys(condition), "prompt_embeds", "pooled_prompt_embeds",
            "global_prompt_embeds", "global_pooled_prompt_embeds")


TENSOR_KEYS = tensor_keys("inpaint")
_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


Rows = dict[str, tuple[torch.dtype, tuple[int, ...]]]   # a shard's tensors: key -> (dtype, one row's shape)


def _layout(rows: Rows, n: int) -> tuple[bytes, dict[str, int], dict[str, int]]:
    """The safetensors file of ``n`` rows of ``rows`` (key -> (dtype, per-row shape), in file order): its
    first bytes (header length + header), each key's data start (from the end of those bytes) and bytes a row."""
    row_bytes = {k: int(np.prod(s, dtype=np.int64)) * torch.empty((), dtype=d).element_size()
                 for k, (d, s) in rows.items()}
    header, start, end = {}, {}, 0
    for k, (d, s) in rows.items():
        header[k] = {"dtype": _ST_DTYPE[d], "shape": [n, *s], "data_offsets": [end, end + n * row_bytes[k]]}
        start[k] = end
        end += n * row_bytes[k]
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head, start, row_bytes


def _write_ids(split_dir: Path, name: str, ids: list[str]) -> None:
    write_file(split_dir / f"{name}.parquet", lambda tmp: pd.DataFrame({"id": ids}).to_parquet(tmp, index=False))


def write_shard_stream(split_dir: Path, index: int, count: int, ids: list[str],
                       batches: Iterable[dict[str, torch.Tensor]]) -> Path:
    """Write one shard (safetensors + ids) from ``batches`` of rows, in ``ids`` order, holding one batch
    at a time: the header is laid out from the first batch's per-row shapes and ``len(ids)``, then each
    batch's rows go to their offsets. The file is a standard safetensors file (safe_open/load_file read it)."""
    split_dir = Path(split_dir)
    name = shard_name(index, count)
    n = len(ids)

    def write(tmp: Path) -> None:
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError(f"{split_dir}/{name}: no rows to write")
        rows = {k: (v.dtype, tuple(v.shape[1:])) for k, v in first.items()}
        head, start, row_bytes = _layout(rows, n)
        base, done = len(head), 0
        with open(tmp, "wb") as f:
            f.write(head)
            f.truncate(base + sum(n * b for b in row_bytes.values()))
            for batch in itertools.chain([first], it):
                sizes = {len(v) for v in batch.values()}
                got = {k: (v.dtype, tuple(v.shape[1:])) for k, v in batch.items()}
                m = max(sizes)
                if got != rows or len(sizes) != 1 or done + m > n:
                    raise ValueError(f"{split_dir}/{name}: a batch of tensors {got} ({sizes} rows) does not "
                                     f"match the shard's {rows} for {n} ids after {done} rows")
                for k, v in batch.items():
                    f.seek(base + start[k] + done * row_bytes[k])
                    f.write(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
                done += m
        if done != n:
            raise ValueError(f"{split_dir}/{name}: {done} tensor rows for {n} ids")

    split_dir.mkdir(parents=True, exist_ok=True)
    write_file(split_dir / f"{name}.safetensors", write)
    _write_ids(split_dir, name, ids)
    return split_dir / f"{name}.safetensors"


def _read_layout(path: Path) -> tuple[int, Rows, dict[str, int], int]:
    """(header bytes, key -> (dtype, per-row shape) in file order, key -> data start, rows) of a shard file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    rows = {k: (_TORCH_DTYPE[header[k]["dtype"]], tuple(header[k]["shape"][1:])) for k in keys}
    n = {header[k]["shape"][0] for k in keys}
    if len(n) != 1:
        raise ValueError(f"{path}: tensors of {sorted(n)} rows")
    return 8 + size, rows, {k: header[k]["data_offsets"][0] for k in keys}, n.pop()


def concat_shards(part_dirs: Sequence[Path], split_dir: Path, index: int, count: int,
                  chunk: int = 1 << 26) -> Path | None:
    """Shard ``index`` of ``count`` of a split, written into ``split_dir`` as the rows of the same shard in
    ``part_dirs`` (pipeline.distributed: the ranks' parts, in rank order; a part without the file holds no
    rows), concatenated: the same bytes write_shard_stream writes for all the rows at once. Streamed key
    by key, ``chunk`` bytes at a time: memory holds no tensor. None when no part holds a row."""
    name = shard_name(index, count)
    files = [Path(d) / f"{name}.safetensors" for d in part_dirs if (Path(d) / f"{name}.safetensors").is_file()]
    if not files:
        return None
    layouts = [_read_layout(f) for f in files]
    rows = layouts[0][1]
    if any(lay[1] != rows for lay in layouts):
        raise ValueError(f"{split_dir}/{name}: parts hold different tensors {[lay[1] for lay in layouts]}")
    ids = [i for f in files for i in pd.read_parquet(f.with_suffix(".parquet"))["id"]]
    if len(ids) != sum(lay[3] for lay in layouts):
        raise ValueError(f"{split_dir}/{name}: {len(ids)} ids for {sum(lay[3] for lay in layouts)} tensor rows")
    head, start, row_bytes = _layout(rows, len(ids))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(head)
            for k in rows:
                for f, (base, _, part_start, n) in zip(files, layouts):
                    with open(f, "rb") as src:
                        src.seek(base + part_start[k])
                        left = n * row_bytes[k]
                        while left:
                            data = src.read(min(chunk, left))
                            if not data:
                                raise ValueError(f"{f}: cut short")
                            out.write(data)
                            left -= len(data)

    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    write_file(split_dir / f"{name}.safetensors", write)
    _write_ids(split_dir, name, ids)
    return split_dir / f"{name}.safetensors"


def write_shard(split_dir: Path, index: int, count: int, ids: list[str], tensors: dict[str, torch.Tensor]) -> Path:
    """One shard from tensors already in memory (tests, small tools)."""
    return write_shard_stream(split_dir, index, count, ids, [tensors])


class EncodedSplit:
    """One split's shards, read lazily: ``gather(idx)`` reads only the rows of ``idx`` (in that order) from
    the files that hold them. Row i is the i-th id in sorted order, whatever the number of shards.
    ``keys``: the tensors read (default: all)."""

    def __init__(self, encoded_dir: str | Path, split: str, keys: tuple[str, ...] | None = None):
        self.dir = Path(encoded_dir) / split
        self.files = sorted(self.dir.glob("shard-*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{self.dir}: no encoded shards (run the encode stage)")
        ids, where = [], []
        for i, f in enumerate(self.files):
            fids = list(pd.read_parquet(f.with_suffix(".parquet"))["id"])
            with safe_open(str(f), "pt") as h:
                present = set(h.keys())
                rows = {h.get_slice(k).get_shape()[0] for k in present}
            if rows and rows != {len(fids)}:
                raise ValueError(f"{f}: tensors have {sorted(rows)} rows for {len(fids)} ids")
            self.keys = tuple(keys) if keys is not None else tuple(sorted(present))
            missing = [k for k in self.keys if k not in present]
            if missing:
                raise KeyError(f"{self.dir}: shards lack tensors {missing}")
            ids += fids
            where += [(i, r) for r in range(len(fids))]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.dir}: duplicate ids across shards")
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self.ids = [ids[i] for i in order]
        self._where = [where[i] for i in order]  # sorted position -> (file, row)

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, idx) -> dict[str, torch.Tensor]:
        """Rows ``idx`` (positions in id order) of every key, stacked in ``idx`` order. Consecutive rows of a
        file are read as one slice; each file is opened only for the call, so nothing stays mapped."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()
        by_file: dict[int, list[int]] = {}
        for i in idx:
            f, r = self._where[i]
            by_file.setdefault(f, []).append(r)
        got: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for f, rows in by_file.items():
            rows = sorted(set(rows))
            with safe_open(str(self.files[f]), "pt") as h:
                slices = {k: h.get_slice(k) for k in self.keys}
                for _, run in itertools.groupby(enumerate(rows), key=lambda t: t[1] - t[0]):
                    run = [r for _, r in run]
                    part = {k: s[run[0]:run[-1] + 1] for k, s in slices.items()}
                    for j, r in enumerate(run):
                        got[(f, r)] = {k: v[j] for k, v in part.items()}
        return {k: torch.stack([got[self._where[i]][k] for i in idx]) for k in self.keys}

    def digest(self) -> str:
        """sha256 over every shard's safetensors and id files (names and bytes, read in chunks): what a
        training checkpoint's key records for its data."""
        h = hashlib.sha256()
        for f in self.files:
            for part in (f, f.with_suffix(".parquet")):
                with open(part, "rb") as fh:
                    h.update(f"{part.name}|{hashlib.file_digest(fh, 'sha256').hexdigest()}|".encode())
        return h.hexdigest()


def load_split(encoded_dir: str | Path, split: str, keys: tuple[str, ...] | None = None) -> tuple[list[str], dict]:
    """(ids, tensors) of a whole split in memory, ordered by id: for tests and small tools. Training reads
    ``EncodedSplit`` per batch instead."""
    s = EncodedSplit(encoded_dir, split, keys)
    return s.ids, s.gather(torch.arange(len(s)))
