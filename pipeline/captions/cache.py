"""Append-only JSONL caption cache: key -> {local, global}. Flushed per batch, so a killed run resumes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of the PNG a shard reference names (images.image_bytes)."""
    from pipeline.data.images import image_bytes
    return hashlib.sha256(image_bytes(path)).hexdigest()


def cache_key(image: str | Path, mask: str | Path, model: str, template: dict) -> str:
    """Keyed by image bytes + mask bytes + model + template (and generation settings in `template`)."""
    payload = json.dumps([file_hash(image), file_hash(mask), model, template], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class CaptionCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by a killed run
        self.hits = 0

    def get(self, key: str) -> dict | None:
        rec = self.entries.get(key)
        self.hits += rec is not None
        return rec

    def put_many(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        data = ("\n" if cut else "") + "".join(json.dumps(rec) + "\n" for rec in records)
        # one O_APPEND write: shards captioning in parallel (``--shard i/N``) share the cache file, and a
        # single append of whole lines does not interleave with theirs
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        for rec in records:
            self.entries[rec["key"]] = rec

