"""Append-only JSONL caption cache: key -> {local, global}. Flushed per batch, so a killed run resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
        with self.path.open("a") as f:
            if cut:
                f.write("\n")
            for rec in records:
                f.write(json.dumps(rec) + "\n")
                self.entries[rec["key"]] = rec

