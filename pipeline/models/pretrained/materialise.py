"""Materialise checked pretrained models as the foundation stages' outputs: the files a model folder needs
(``ALLOW_PATTERNS``), linked or copied into models/vae, models/backbone, models/teacher in the standard
diffusers layouts, with ``SOURCE.json`` (repo, requested and resolved revision, path) beside them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pipeline.config import Config
from pipeline.models.pretrained.check import _json, preflight
from pipeline.models.pretrained.resolve import ALLOW_PATTERNS, ModelError


def _link_tree(src: Path, dst: Path, how: str, info: dict) -> None:
    """Mirror ``src`` into a fresh ``dst`` (a real folder, written atomically with ``info`` as SOURCE.json):
    per-file symlinks to the resolved blobs, hard links, or copies. Only the files a model folder needs
    (ALLOW_PATTERNS) are mirrored."""
    import fnmatch

    from pipeline.atomic import write_dir

    with write_dir(dst) as tmp:
        files = [f for f in sorted(src.rglob("*"))
                 if not f.is_dir() and any(fnmatch.fnmatch(f.name, p) for p in ALLOW_PATTERNS)]
        if not files:
            raise ModelError(f"{src}: no model files to materialise")
        for f in files:
            out = tmp / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            real = f.resolve()
            if how == "symlink":
                out.symlink_to(real)
            elif how == "hardlink":
                try:
                    os.link(real, out)
                except OSError:
                    shutil.copy2(real, out)
            else:
                shutil.copy2(real, out)
        (tmp / "SOURCE.json").write_text(json.dumps(info, indent=2))


def materialise(cfg: Config, what: Literal["vae", "backbone", "teacher"], out: Path) -> dict:
    """Resolve + check the pretrained models, then write ``out`` (models/vae, models/backbone or
    models/teacher) and ``out/SOURCE.json``. Returns a small metrics dict for the stage."""
    w = cfg.world
    world = preflight(cfg, captioner=(what == "vae"))  # the first foundation stage checks the captioner too
    r = world.teacher if what == "teacher" else world.foundation
    src = r.path / "vae" if what == "vae" else r.path
    _link_tree(src, Path(out), w.link, {**r.source(), "component": what, "link": w.link})
    metrics = {"source": "pretrained", "repo": r.ref.repo, "revision": r.ref.revision,
               "resolved_commit": r.commit, "resolved_from": r.how}
    if what == "vae":
        vae = _json(r, "vae/config.json")
        metrics.update(shift_factor=vae["shift_factor"], scaling_factor=vae["scaling_factor"])
        if world.captioner is not None:
            metrics["captioner"] = world.captioner.source()
    elif what == "backbone":
        metrics.update(num_layers=world.transformer_config["num_layers"],
                       joint_attention_dim=world.transformer_config["joint_attention_dim"])
    else:
        metrics.update(num_layers=world.teacher_config["num_layers"])
    return metrics
