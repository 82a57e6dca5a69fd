"""Configuration profiles: configs/NAME.yaml deep-merged over params.yaml.

    python -m pipeline.profile show smoke                 # print the merged params
    python -m pipeline.profile use smoke                  # switch this workspace (rewrites params.yaml)
    python -m pipeline.profile workspace smoke .smoke     # a separate workspace with its own outputs
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.atomic import write_file
from pipeline.config import ConfigError, deep_merge, from_dict, load, load_raw, merge_into
from pipeline.paths import RUN_TIME

ROOT = Path(__file__).resolve().parent.parent
# What a workspace needs besides its params: code and pipeline definition, never outputs.
WORKSPACE_FILES = ("pipeline", "stages", "configs", "dvc.yaml", "studies", "pyproject.toml", "prefect.yaml")
DEFAULT = ("default", "params")   # names of the profile params.yaml itself holds
EXTENDS = "extends"               # a profile's key naming the profile it is written over


def profile_path(name: str, root: str | Path = ROOT) -> Path:
    """ROOT/configs/NAME.yaml; a ConfigError listing the known profiles when there is none."""
    configs = Path(root) / "configs"
    path = configs / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in configs.glob("*.yaml"))
        raise ConfigError(f"profile {name!r}: {path} not found; known profiles: {['default', *known]}")
    return path


def profile_overrides(name: str, root: str | Path = ROOT, _seen: tuple[str, ...] = ()) -> dict:
    """configs/NAME.yaml: overrides of params.yaml. A profile whose first key is ``extends: BASE`` is written
    over profile BASE: BASE's overrides with its own deep-merged over them (configs/sd3_local.yaml extends
    sd3, so the two cannot drift apart)."""
    path = profile_path(name, root)
    raw = load_raw(path)
    base = raw.pop(EXTENDS, None)
    if base is None or base in DEFAULT:
        return raw
    if base == name or base in _seen:
        raise ConfigError(f"{path}: {EXTENDS}: {base!r} makes a cycle ({' -> '.join((*_seen, name, base))})")
    return deep_merge(profile_overrides(str(base), root, (*_seen, name)), raw)


def merged(name: str, base: str | Path = ROOT / "params.yaml") -> dict:
    if name in DEFAULT:
        return load_raw(base)
    path = profile_path(name)
    raw = deep_merge(load_raw(base), profile_overrides(name))
    from_dict(raw, f"{path} over {base}")  # validate before anything is written
    return raw


def write_params(raw: dict, path: Path) -> None:
    write_file(path, yaml.safe_dump(raw, sort_keys=False))


def _params_yaml():
    """A round-trip YAML (ruamel, which DVC uses) that writes params as PyYAML, their reader, reads them.

    Unlike dvc.utils.serialize.modify_yaml it keeps quotes (``"no"`` must not become ``no``, a boolean to
    PyYAML), writes floats PyYAML reads as floats (``1.0e-05``, not ``1e-05``) and writes ``null``.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    resolver = yaml.resolver.Resolver()

    class ParamsRepresenter(RoundTripRepresenter):
        def represent_str(self, data):
            if resolver.resolve(yaml.ScalarNode, data, (True, False)) != "tag:yaml.org,2002:str":
                return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')
            return super().represent_str(data)

        def represent_float(self, data):
            value = repr(data).lower()
            if "." not in value and "e" in value:      # 1e-05 is a string to PyYAML, 1.0e-05 a float
                return self.represent_scalar("tag:yaml.org,2002:float", value.replace("e", ".0e", 1))
            return super().represent_float(data)

        def represent_none(self, data):
            return self.represent_scalar("tag:yaml.org,2002:null", "null")

    ParamsRepresenter.add_representer(str, ParamsRepresenter.represent_str)
    ParamsRepresenter.add_representer(float, ParamsRepresenter.represent_float)
    ParamsRepresenter.add_representer(type(None), ParamsRepresenter.represent_none)
    rt = YAML()
    rt.Representer = ParamsRepresenter
    rt.preserve_quotes = True
    rt.width = 110                   # the params files' line length
    rt.default_flow_style = None     # new leaf lists and mappings inline, as yaml.safe_dump writes them
    return rt


def update_params(path: str | Path, override: dict) -> None:
    """Deep-merge ``override`` into the params file ``path`` in place: comments, key order and quotes kept.

    Should the commented file not read back (with PyYAML) as exactly the merge, the merge is written
    without comments instead.
    """
    path = Path(path)
    rt = _params_yaml()
    text = path.read_text() if path.exists() else ""
    doc = rt.load(text) or {}
    merge_into(doc, override)
    out = io.StringIO()
    rt.dump(doc, out)
    new = "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())   # no blanks left by wrapping
    expected = deep_merge(yaml.safe_load(text) or {}, override)
    if yaml.safe_load(new) != expected:
        new = yaml.safe_dump(expected, sort_keys=False)
    write_file(path, new)


def apply_profile(name: str, root: str | Path = ROOT) -> Path:
    """Switch the workspace ``root`` to profile ``name``: ROOT/configs/NAME.yaml deep-merged into
    ROOT/params.yaml in place (comments kept), then validated; ``default`` leaves params.yaml as it is.

    An unknown profile raises ConfigError listing the known ones; so does a merge that does not validate,
    after putting params.yaml back as it was. Returns the params file.
    """
    params = Path(root) / "params.yaml"
    if name in DEFAULT:
        return params
    path = profile_path(name, root)
    before = params.read_text() if params.exists() else None
    update_params(params, profile_overrides(name, root))
    try:
        load(params)
    except ConfigError as exc:
        if before is None:
            params.unlink()
        else:
            write_file(params, before)
        raise ConfigError(f"profile {name!r} ({path}): {exc}") from None
    return params


def make_workspace(name: str, dest: Path, base: Path = ROOT / "params.yaml") -> Path:
    """A DVC workspace in a git repository of its own, holding a copy of the code and the profile's params
    (committed); outputs land there."""
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
    # studies/params.yaml (make studies): configs/studies/NAME.yaml deep-merged over it, when the profile has one
    studies = ROOT / "studies" / "params.yaml"
    override = ROOT / "configs" / "studies" / f"{name}.yaml"
    if studies.exists() and override.exists():
        write_params(deep_merge(yaml.safe_load(studies.read_text()) or {}, yaml.safe_load(override.read_text()) or {}),
                     dest / "studies" / "params.yaml")
    # The profile's last measured stage times: the concurrent flow starts the longest paths first by them
    # (a workspace's own record, written by its runs, takes over).
    record = ROOT / "configs" / "run_time" / f"{name}.json"
    if record.exists() and not (dest / RUN_TIME).exists():
        (dest / RUN_TIME).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record, dest / RUN_TIME)
    # A git repository, so that `dvc exp run`, `dvc metrics diff` and `dvc params diff` work there too.
    git = ["git", "-c", "user.name=refine-control", "-c", "user.email=refine-control@localhost"]
    if not (dest / ".git").exists():
        subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
        shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    if not (dest / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=dest, check=True)
    # DVC's ignores (caches such as __pycache__): code_digests depends on the code folders, and the .pyc
    # files a stage's import writes there must not make it stale
    shutil.copy2(ROOT / ".dvcignore", dest / ".dvcignore")
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=dest).returncode:
        subprocess.run([*git, "commit", "-q", "-m", f"workspace: profile {name}"], cwd=dest, check=True)
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
        apply_profile(args.name, ROOT)
        print(f"params.yaml now holds profile {args.name!r}; run `dvc repro` (git diff params.yaml shows it)")
    else:
        print(make_workspace(args.name, Path(args.dest)))


if __name__ == "__main__":
    main()
