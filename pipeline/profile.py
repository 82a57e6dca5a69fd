"""Configuration profiles: configs/NAME.yaml deep-merged over params.yaml.

    python -m pipeline.profile show smoke                 # print the merged params
    python -m pipeline.profile use smoke                  # switch this workspace (rewrites params.yaml)
    python -m pipeline.profile workspace smoke .smoke     # a separate workspace with its own outputs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, deep_merge, from_dict, load_raw

ROOT = Path(__file__).resolve().parent.parent
# What a workspace needs besides its params: code and pipeline definition, never outputs.
WORKSPACE_FILES = ("pipeline", "stages", "configs", "dvc.yaml", "pyproject.toml", "prefect.yaml")


def merged(name: str, base: str | Path = ROOT / "params.yaml") -> dict:
    if name in ("default", "params"):
        return load_raw(base)
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
        raise ConfigError(f"profile {name!r}: {path} not found; known profiles: {['default', *known]}")
    raw = deep_merge(load_raw(base), load_raw(path))
    from_dict(raw, f"{path} over {base}")  # validate before anything is written
    return raw


def write_params(raw: dict, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, path)


def make_workspace(name: str, dest: Path, base: Path = ROOT / "params.yaml") -> Path:
    """A DVC workspace (no SCM) holding a copy of the code and the profile's params; outputs land there."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for item in WORKSPACE_FILES:
        src = ROOT / item
        if not src.exists():
            continue
        target = dest / item
        if src.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    write_params(merged(name, base), dest / "params.yaml")
    if not (dest / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=dest, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=dest, check=True)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["show", "use", "workspace"])
    ap.add_argument("name")
    ap.add_argument("dest", nargs="?", default=".smoke")
    args = ap.parse_args(argv)
    if args.action == "show":
        print(yaml.safe_dump(merged(args.name), sort_keys=False))
    elif args.action == "use":
        write_params(merged(args.name), ROOT / "params.yaml")
        print(f"params.yaml now holds profile {args.name!r}; run `dvc repro` (git diff params.yaml shows it)")
    else:
        print(make_workspace(args.name, Path(args.dest)))


if __name__ == "__main__":
    main()
