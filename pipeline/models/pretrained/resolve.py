"""Find a pretrained model's folder: ``local_dir`` (a folder in the diffusers / transformers layout), then
the hub cache (``huggingface_hub.snapshot_download(local_files_only=True)``; ``world.cache_dir`` or
HF_HUB_CACHE / HF_HOME), then -- only with ``world.allow_download: true`` -- a download. Nothing here
passes ``trust_remote_code``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SHA, ConfigError, ModelRef


# Files a diffusers / transformers model folder needs (the hub repos also hold images and single-file
# checkpoints that we never read).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


class ModelError(ConfigError):
    """A pretrained model that is missing or does not match what the params expect."""


@dataclass(frozen=True)
class Resolved:
    name: str               # foundation | teacher | captioner
    ref: ModelRef
    path: Path
    how: str                # local_dir | hub_cache | download
    commit: str | None      # the snapshot's commit when resolved from the hub cache

    def describe(self) -> str:
        rev = f"@{self.ref.revision}" if self.ref.revision else ""
        return f"{self.name} ({self.ref.repo}{rev}) at {self.path}"

    def source(self) -> dict:
        return {"name": self.name, "repo": self.ref.repo, "revision": self.ref.revision,
                "resolved_commit": self.commit, "path": str(self.path), "resolved_from": self.how}


def _hub_cache(cache_dir: str | None) -> str | None:
    return os.path.expanduser(cache_dir) if cache_dir else None


def resolve(name: str, ref: ModelRef, cache_dir: str | None = None, allow_download: bool = False) -> Resolved:
    """The folder holding ``ref``: local_dir, else the hub cache, else (if allowed) a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    tried = []
    if ref.local_dir:
        p = Path(ref.local_dir).expanduser()
        if p.is_dir() and any(p.iterdir()):
            return Resolved(name, ref, p.resolve(), "local_dir", None)
        tried.append(f"local_dir {p} (missing or empty)")
    # A plain path given as the repo (e.g. caption.qwen.model: /models/qwen) is a local folder.
    if Path(ref.repo).expanduser().is_dir():
        return Resolved(name, ref, Path(ref.repo).expanduser().resolve(), "local_dir", None)
    cache = _hub_cache(cache_dir)
    kw = dict(repo_id=ref.repo, revision=ref.revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    try:
        p = Path(snapshot_download(local_files_only=True, **kw))
        return Resolved(name, ref, p, "hub_cache", p.name if SHA.match(p.name) else None)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        from huggingface_hub import constants

        tried.append(f"hub cache {cache or constants.HF_HUB_CACHE} ({type(exc).__name__})")
    if allow_download:
        p = Path(snapshot_download(**kw))
        return Resolved(name, ref, p, "download", p.name if SHA.match(p.name) else None)
    rev = f" --revision {ref.revision}" if ref.revision else ""
    raise ModelError(
        f"{name}: model {ref.repo!r}{'@' + ref.revision if ref.revision else ''} not found; tried "
        + "; ".join(tried)
        + f". Fetch it on a machine with network (`huggingface-cli download {ref.repo}{rev}`) into the hub "
        f"cache or a folder named by world.{name}.local_dir, or set world.allow_download: true."
    )
