"""Run a module as ``python -m`` runs it, recording what this process writes inside a folder: for
tests/test_distributed_stages.py, under a launcher, one log per rank::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m tests.audit_writes LOG_DIR ROOT stages.encode [ARGS...]

LOG_DIR/rank-<RANK>.json: {"rank", "world_size", "exit", "writes": [[what, path relative to ROOT], ...]}, from
Python's audit events: a file opened for writing ("write"), both ends of os.rename / os.replace
("moved" from, "write" to), os.mkdir ("mkdir"), os.remove / os.rmdir / shutil.rmtree ("remove"). Native
writers that open files themselves (pyarrow's parquet, torch's zip writer) are not seen; the project's
outputs reach their paths through os.replace (pipeline.atomic), which is. Run with PYTHONDONTWRITEBYTECODE=1,
so that imports write nothing.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_recording = True
_writes: list[list[str]] = []


def _under(root: str, path) -> str | None:
    """``path`` relative to ``root`` (not following links), or None outside it."""
    if isinstance(path, int) or path is None:
        return None
    rel = os.path.relpath(os.path.abspath(os.fsdecode(path)), root)
    return None if rel == ".." or rel.startswith(".." + os.sep) else rel


def _hook(root: str):
    def record(what: str, path, dir_fd=None) -> None:
        if dir_fd not in (None, -1):   # relative to an open folder: shutil.rmtree's own steps (its event is seen)
            return
        rel = _under(root, path)
        if rel is not None:
            _writes.append([what, rel])

    def hook(event: str, args: tuple) -> None:
        if not _recording:
            return
        if event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS:
            record("write", args[0])
        elif event == "os.rename":
            record("moved", args[0], args[2])
            record("write", args[1], args[3])
        elif event == "os.mkdir":
            record("mkdir", args[0], args[2])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            record("remove", args[0], args[1])
    return hook


def main() -> None:
    global _recording
    log_dir, root, module, *argv = sys.argv[1:]
    sys.addaudithook(_hook(os.path.abspath(root)))
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        _recording = False
        rank = int(os.environ.get("RANK", 0))
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        Path(log_dir, f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "exit": code, "writes": _writes}))
    sys.exit(code)


if __name__ == "__main__":
    main()
