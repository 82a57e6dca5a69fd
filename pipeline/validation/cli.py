"""The stages/validate_*.py Great Expectations gates: :func:`pipeline.entry.stage` with ``--out-dir``; a failed
expectation (GateError) exits 1 with the gate's message, bad input 2; a pass prints what was checked."""

from __future__ import annotations

import functools
from typing import Callable

from pipeline import paths
from pipeline.entry import CheckFailed, Stage, arg, stage
from pipeline.validation.gx import GateError


def gate(name: str, doc: str, *arguments: tuple) -> Callable[[Callable], Stage]:
    """Decorator: ``check(args, cfg) -> report`` (a gates.*_gate call writing ``<out_dir>/<name>.json``)
    -> the gate module's ``main``."""

    def make(check: Callable) -> Stage:
        @functools.wraps(check)  # keeps check's module: the stage's name
        def body(args, cfg) -> None:
            try:
                report = check(args, cfg)
            except GateError as exc:
                raise CheckFailed(str(exc)) from exc
            print(f"validate_{name}: passed {report['evaluated']} expectations -> {args.out_dir}/{name}.json")

        out_dir = arg("--out-dir", default=str(paths.GATES), help="where <gate>.json/.md go")
        return stage(doc, *arguments, out_dir, kind="data")(body)

    return make
