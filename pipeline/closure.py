"""The project files a module's import can execute, read from the source (no import): dvc.yaml's code deps
(pipeline.dvcgen) and the code part of a training run's checkpoint key (pipeline.training.code_digest)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages")


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, root: Path) -> set[Path]:
    """Project files that ``path`` imports (anywhere in it, lazy imports included) and their packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                pkg = path.relative_to(root).with_suffix("").parts[:-node.level]
                mod = ".".join([*pkg, *([mod] if mod else [])])
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    found = set()
    for name in names:
        if name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way (their __init__ runs) and the module
            f = _module_file(".".join(parts[:i]), root)
            if f is not None:
                found.add(f)
    return found


def import_closure(module: str, root: Path = ROOT) -> list[str]:
    """Every project file that importing ``module`` (e.g. ``stages.encode``) can execute, sorted."""
    start = _module_file(module, root)
    if start is None:
        raise ValueError(f"{module}: no such module under {root}")
    seen, todo = {start}, [start]
    while todo:
        for f in _imports(todo.pop(), root):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return sorted(p.relative_to(root).as_posix() for p in seen)
