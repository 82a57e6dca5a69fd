"""The project code a stage runs, read from the source (no import), and its digest.

- ``import_closure(module)``: every project file importing ``module`` can execute (lazy imports included).
- ``closure_digest(module)``: sha256 of that closure's *normalised* source: the AST without docstrings,
  so comments, docstrings and formatting do not count and any change Python would execute differently does.
- ``python -m pipeline.closure``: the first DVC stage (``code_digests``). It writes one small JSON file a
  stage module (digests/stages.<name>.json: digest and closure) and every other stage depends on its own
  file instead of the .py files, so a docstring edit reruns only this stage (well under a second: it
  imports nothing beyond the standard library) and a code edit reruns exactly the stages whose closure
  holds it. pipeline.training keys resumable checkpoints on the same digests.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages")
DIGESTS = Path("digests")   # the code_digests stage's output folder, relative to the workspace root


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


_MEMO: dict[tuple, object] = {}


def _memo(kind: str, path: Path, compute):
    """``compute(path)``, once per version of the file (keyed on its mtime and size)."""
    st = Path(path).stat()
    key = (kind, str(path), st.st_mtime_ns, st.st_size)
    if key not in _MEMO:
        _MEMO[key] = compute(path)
    return _MEMO[key]


def _parse(path: Path) -> ast.Module:
    return ast.parse(Path(path).read_text(), filename=str(path))


def _imports(path: Path, root: Path) -> set[Path]:
    """Project files that ``path`` imports (anywhere in it, lazy imports included) and their packages."""
    tree = _memo("ast", path, _parse)  # shared: not mutated
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


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def normalised_source(path: Path) -> str:
    """``path``'s AST without docstrings, dumped without positions: equal for two files that differ only
    in comments, docstrings or formatting."""
    tree = _parse(path)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, _DOCUMENTED) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def files_digest(files, root: Path = ROOT) -> str:
    """sha256 over the project files ``files`` (paths relative to ``root``, or absolute under it): each
    file's relative path and normalised source."""
    h = hashlib.sha256()
    for rel in sorted((root / f).resolve().relative_to(root.resolve()).as_posix() for f in files):
        source = _memo("normalised", root / rel, lambda p: hashlib.sha256(normalised_source(p).encode()).hexdigest())
        h.update(f"{rel}\0{source}\0".encode())
    return h.hexdigest()


def closure_digest(module: str, root: Path = ROOT) -> str:
    """The digest of ``module``'s import closure (files_digest of import_closure)."""
    return files_digest(import_closure(module, root), root)


def stage_modules(root: Path = ROOT) -> list[str]:
    """The DVC stage modules: ``stages.<name>`` for every stages/<name>.py."""
    return sorted(f"stages.{p.stem}" for p in (root / "stages").glob("*.py") if p.stem != "__init__")


def digest_file(module: str) -> Path:
    """Where the code_digests stage writes ``module``'s digest (relative to the workspace root)."""
    return DIGESTS / f"{module}.json"


def write_digests(root: Path = ROOT, out: Path | None = None) -> list[Path]:
    """One JSON file a stage module under ``out`` (default ROOT/digests): {module, digest, closure}.
    Written whole to a temporary folder, then put in place, so a killed run leaves the old folder."""
    out = Path(out) if out is not None else root / DIGESTS
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for module in stage_modules(root):
        closure = import_closure(module, root)
        record = {"module": module, "digest": files_digest(closure, root), "closure": closure}
        (tmp / digest_file(module).name).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return sorted(out.iterdir())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="DVC stage `code_digests`: " + __doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace whose pipeline/ and stages/ are digested")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    written = write_digests(root)
    print(f"{root / DIGESTS}: {len(written)} stage modules")


if __name__ == "__main__":
    main()
