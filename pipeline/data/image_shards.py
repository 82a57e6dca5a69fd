"""Images, masks and instance maps stored as PNG bytes in parquet shard files, not as loose PNGs.

A folder written by ShardWriter holds ``shards/part-00000.parquet``, ``shards/part-00001.parquet``, ...
(columns id (string), image, mask, instances (binary; instances nullable)), so it has a handful of files
whatever the dataset size. One stored image is named by a reference ``<shard file>#<column>/<row>``, e.g.
``shards/part-00003.parquet#mask/17``; manifests keep references in their image / mask / instances columns,
relative to the manifest's folder like file paths (images.load_manifest resolves both alike), and
images.open_image reads either.

Memory stays bounded: the writer holds one row group (ROW_GROUP_ROWS rows) and the reader decodes one row
group of one column at a time, keeping the last few in a small per-process cache (no open files are kept,
so forked workers are safe), so that reading consecutive rows decodes each row group once.
"""

from __future__ import annotations

import io
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SHARD_DIR = "shards"
ROWS_PER_SHARD = 256     # at SD3 size (~1.5 MB a PNG) a shard is ~0.5 GB
ROW_GROUP_ROWS = 32      # the unit of reading and of the writer's buffer
COLUMNS = ("image", "mask", "instances")
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("mask", pa.binary()),
                    ("instances", pa.binary())])
CACHE_GROUPS = 4         # (file, row group, column) entries kept decoded per process

_REF = re.compile(r"^(?P<path>.+\.parquet)#(?P<column>image|mask|instances)/(?P<row>\d+)$")


class ShardRefError(FileNotFoundError):
    """A reference whose shard file, column or row does not exist (or holds no image)."""


def is_ref(s) -> bool:
    """Whether ``s`` is a shard reference (``<file>.parquet#<column>/<row>``) rather than a file path."""
    return isinstance(s, (str, os.PathLike)) and _REF.match(str(s)) is not None


def make_ref(shard: str, column: str, row: int) -> str:
    return f"{shard}#{column}/{row}"


def parse_ref(ref) -> tuple[str, str, int]:
    m = _REF.match(str(ref))
    if m is None:
        raise ValueError(f"{ref!r}: not a shard reference (<file>.parquet#<column>/<row>)")
    return m["path"], m["column"], int(m["row"])


def png_bytes(img, mode: str | None = None) -> bytes:
    """PNG bytes of an array (uint8, or bool: True -> 255) or PIL image, fast compression as before."""
    if isinstance(img, np.ndarray):
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        img = Image.fromarray(img, mode)
    elif mode is not None and img.mode != mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardWriter:
    """Writes rows of PNG bytes into ``root/shards/<prefix>-%05d.parquet``, at most ``rows_per_shard`` rows a
    file, in row groups of ``row_group_rows``; holds one row group in memory. ``add`` returns the rows'
    references relative to ``root``. Use as a context manager (or call close())."""

    def __init__(self, root: str | Path, rows_per_shard: int = ROWS_PER_SHARD,
                 row_group_rows: int = ROW_GROUP_ROWS, prefix: str = "part"):
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be >= 1")
        self.root = Path(root)
        self.rows_per_shard, self.row_group_rows, self.prefix = rows_per_shard, row_group_rows, prefix
        self.shards: list[str] = []  # relative names of the files written
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0          # rows in the current shard file
        self._buffer: list[dict] = []

    def add(self, row_id: str, images: dict) -> dict:
        """Store one row (``images``: image, mask, instances -> PNG bytes or None); returns column -> ref."""
        if self._writer is None:
            name = f"{SHARD_DIR}/{self.prefix}-{len(self.shards):05d}.parquet"
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.root / name, SCHEMA)
            self.shards.append(name)
        row = self._rows
        self._buffer.append({"id": str(row_id), **{c: images.get(c) for c in COLUMNS}})
        self._rows += 1
        if len(self._buffer) >= self.row_group_rows:
            self._flush_group()
        if self._rows >= self.rows_per_shard:
            self._close_shard()
        name = self.shards[-1]
        return {c: make_ref(name, c, row) if images.get(c) is not None else None for c in COLUMNS}

    def _flush_group(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self._buffer = []

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._flush_group()
            self._writer.close()
        self._writer, self._rows = None, 0

    def close(self) -> None:
        self._close_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- reading

_groups: OrderedDict = OrderedDict()   # (file stamp, row group, column) -> values, most recent last
_starts: OrderedDict = OrderedDict()   # file stamp -> first row of each row group, plus the total


def _row_starts(path: str, stamp: tuple) -> list[int]:
    """First row of each row group, plus the total, from the file's footer."""
    starts = _starts.get(stamp)
    if starts is None:
        meta = pq.ParquetFile(path).metadata
        starts = [0]
        for i in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(i).num_rows)
        _starts[stamp] = starts
        if len(_starts) > 64:
            _starts.popitem(last=False)
    return starts


def _group(path: str, column: str, row: int) -> tuple[list, int]:
    """(values of ``column`` in the row group holding ``row``, index of ``row`` in it); cached, keyed by the
    file's path, mtime, size and inode so that a rewritten shard is read afresh."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardRefError(f"{path}: shard file not found (row {row}, column {column})") from None
    stamp = (os.path.abspath(path), st.st_mtime_ns, st.st_size, st.st_ino)
    starts = _row_starts(path, stamp)
    if not 0 <= row < starts[-1]:
        raise ShardRefError(f"{path}: no row {row} (the shard has {starts[-1]} rows)")
    rg = int(np.searchsorted(starts, row, side="right")) - 1
    key = (stamp, rg, column)
    values = _groups.get(key)
    if values is None:
        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise ShardRefError(f"{path}: no column {column!r} (row {row})")
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        _groups[key] = values
        if len(_groups) > CACHE_GROUPS:
            _groups.popitem(last=False)
    else:
        _groups.move_to_end(key)
    return values, row - starts[rg]


def read_bytes(ref) -> bytes:
    """The stored PNG bytes of a reference; ShardRefError names the shard file and row when absent."""
    path, column, row = parse_ref(ref)
    values, i = _group(path, column, row)
    if values[i] is None:
        raise ShardRefError(f"{path}: row {row} holds no {column}")
    return values[i]


def ref_exists(ref) -> bool:
    """The shard file exists and holds an image at that row and column."""
    try:
        read_bytes(ref)
    except (ShardRefError, ValueError, OSError):
        return False
    return True


def open_ref(ref) -> Image.Image:
    """Decode one stored image (fully loaded, as images.open_image does for files)."""
    img = Image.open(io.BytesIO(read_bytes(ref)))
    img.load()
    return img
