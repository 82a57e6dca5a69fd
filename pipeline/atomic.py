"""The one way this project writes its outputs: into a temporary sibling, then renamed into place.

A killed run leaves the previous output (or none) and at most a hidden ``.NAME.tmp-*`` sibling, never a
half-written file or folder. Every folder written here carries MARKER, and a folder is replaced only when
it is missing, empty or carries MARKER: no command deletes what it did not create.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

MARKER = ".refine-control-output"
MARKER_TEXT = "Written by refine-control: this folder is replaced whole when the command that wrote it runs again.\n"


class NotOurOutputError(FileExistsError):
    """The output path holds something this project did not write; nothing was changed."""


def _sibling(path: Path, kind: str, suffix: str = "") -> Path:
    # unique per call, so concurrent writers of one path never share a temp; hidden, so globs skip it
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}{suffix}")


def write_file(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` atomically. ``data``: text (UTF-8), bytes, or a function that writes the temp path it
    is given (which keeps ``path``'s suffix, for writers that choose the format by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp", path.suffix)
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_replaceable(out: str | Path) -> None:
    """Raise NotOurOutputError unless ``out`` is missing, an empty folder or a folder carrying MARKER."""
    out = Path(out)
    how = "Choose another output folder (a new or empty one), or move it away yourself if it may go."
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symlink" if out.is_symlink() else "a file"
        raise NotOurOutputError(f"{out}: is {kind}, not a folder this project wrote; refusing to replace it. {how}")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise NotOurOutputError(
            f"{out}: holds files this project did not write (no {MARKER} file in it); refusing to replace "
            f"the folder, nothing was changed. {how}")


@contextmanager
def write_dir(out: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then swap it in for ``out``; on any error ``out`` is untouched
    and the temp is removed::

        with write_dir("data/triplets") as tmp:
            df.to_parquet(tmp / "manifest.parquet")

    Raises NotOurOutputError before the work starts (and again before the swap) when ``out`` holds things
    this project did not write."""
    out = Path(out)
    check_replaceable(out)  # up front, so a wrong output path fails before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        yield tmp
        check_replaceable(out)  # again: someone may have put files there while we worked
        old = None
        if out.exists():
            old = _sibling(out, "old")
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)  # put the previous output back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
