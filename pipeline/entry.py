"""The one entry point of the stages/ modules (``python -m stages.NAME``, every DVC stage's ``cmd``): parsing
the command line, loading params.yaml and turning bad input into an exit code happen here, once. A stage
module holds only what is its own: its arguments, its call into pipeline/, what it writes and prints.

    @stage(__doc__, arg("--out", default=str(paths.SCENES)), kind="data")
    def main(args, cfg):      # args: the parsed command line; cfg: params.yaml, validated (pipeline.config)
        ...

    if __name__ == "__main__":
        sys.exit(main())

Contract of the ``main`` that :func:`stage` makes (a :class:`Stage`: ``main(argv=None) -> int``, which tests
call with a list of arguments):

* ``--help`` prints the module's docstring. Every stage takes ``--params`` (default params.yaml) and the
  ``arg(...)``s it declares (argparse's add_argument arguments); a bad command line exits 2 (argparse).
* 0: the body returned.
* 1: the stage ran and a check it owns failed: the body raised :class:`CheckFailed` (a gate, a threshold).
* 2: bad input: ConfigError, FileNotFoundError, ValueError or NotOurOutputError (an output path holding
  files the project did not write), from loading params.yaml or from the body.
  1 and 2 end with ``NAME: message`` on stderr (NAME: the module's, stages.NAME; the message as the exception
  words it: a ConfigError lists each bad key on a line of its own); when the error was raised outside the
  project's code (deep in torch or pandas), its traceback comes above that line. Any other exception
  propagates.
* ``kind`` declares what the stage is (:data:`KINDS`), which decides how it starts, in :meth:`Stage.__call__`
  and nowhere else. Every stage that runs networks (:data:`ON_DEVICE`) first passes the runtime policy's
  no-silent-CPU check (pipeline.device.require_accelerator; exit 2 before anything is written). A ``model``
  stage asked for more than one process (params ``launch``, pipeline/launch.py) is run again under torchrun,
  same module and arguments, one rank per device, and its exit code is the launch's (the first failed
  rank's); in a rank, or with one process, the body runs here. Every other kind runs in one process.

Variants are thin uses of :class:`Stage`: the gates (pipeline/validation/cli.py), the studies' stages
(pipeline/study_stage.py), the foundation stages (pipeline/foundation/component.py). This module imports
nothing heavy and nothing of theirs: it is in every stage's import closure (pipeline.closure), beside
pipeline.config, pipeline.atomic, pipeline.launch (with pipeline.threads) and pipeline.device (imported when
a stage that runs networks starts: a data stage imports no torch).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import launch
from pipeline.atomic import NotOurOutputError
from pipeline.config import Config, ConfigError, load

KINDS = {
    "data": "prepares or checks data files on the CPU",
    "model": "trains or runs networks on every process a launch starts (params launch: one per device), "
             "splitting its rows across them or training under DDP; one process by default",
    "serial": "trains, runs or measures networks in one process whatever params launch says: benchmarks (a "
              "measurement is one process's), the teacher gate, the pseudo-labeller",
    "report": "reads metrics files, writes reports",
}
LAUNCHED = {"model"}                # started on launch.processes x launch.machines processes
ON_DEVICE = {"model", "serial"}     # run networks: refused when the runtime policy would fall back to the CPU
_PROJECT = Path(__file__).resolve().parents[1]
BAD_INPUT = (ConfigError, FileNotFoundError, ValueError, NotOurOutputError)  # -> exit 2


class CheckFailed(Exception):
    """The stage ran and a check it owns failed (its outputs may be written): exit 1 with this message."""


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a stage, as ``argparse.ArgumentParser.add_argument`` takes it."""
    return flags, kwargs


@dataclass(frozen=True)
class Stage:
    """A stage's ``main``: what it is (``name``, ``kind``), its command line, and its body."""

    name: str                                   # stages.<name>; the prefix of its error lines
    doc: str                                    # --help
    body: Callable[[argparse.Namespace, Config], object]
    arguments: tuple = ()                       # arg(...)s besides --params
    kind: str = "data"
    module: str = ""                            # what `python -m` runs (a launch reruns it); "": stages.<name>

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name}: kind {self.kind!r}, expected one of {sorted(KINDS)}")

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(prog=f"python -m stages.{self.name}", description=self.doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--params", default="params.yaml", help="the pipeline's params (schema: pipeline/config.py)")
        for flags, kwargs in self.arguments:
            ap.add_argument(*flags, **kwargs)
        return ap

    def __call__(self, argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = self.parser().parse_args(argv)
        try:
            cfg = load(args.params)
            launched = self._launch(cfg, argv)
            if launched is not None:
                return launched
            self.body(args, cfg)
        except CheckFailed as exc:
            return self._error(exc, 1)
        except BAD_INPUT as exc:
            return self._error(exc, 2)
        return 0

    def _launch(self, cfg: Config, argv: list[str]) -> int | None:
        """Before the body: the no-silent-CPU check of a stage that runs networks, then, for a ``model`` stage
        asked for several processes and not a rank already, the launch: its exit code (None: the body runs
        here)."""
        if self.kind in ON_DEVICE:
            from pipeline.device import require_accelerator  # here: no torch in a data or report stage

            require_accelerator(cfg)
        if self.kind not in LAUNCHED or launch.is_rank():
            return None
        processes = launch.settings(cfg)
        if processes.world_size == 1:
            return None
        return launch.run_launched(processes, self.module or f"stages.{self.name}", argv, cfg.runtime.device)

    def _error(self, exc: Exception, code: int) -> int:
        if not _raised_by_project(exc):   # a library's error: where it came from is worth the lines
            traceback.print_exception(exc)
        print(f"{self.name}: {exc}", file=sys.stderr)
        return code


def _raised_by_project(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is the project's code (this checkout, not an installed
    package): an error it raises on purpose words itself; one from deep in torch or pandas needs its
    traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = Path(frames[-1].filename).resolve() if frames else None
    return where is None or (where.is_relative_to(_PROJECT) and "site-packages" not in where.parts)


def stage(doc: str, *arguments: tuple, kind: str = "data") -> Callable[[Callable], Stage]:
    """Decorator: the body ``fn(args, cfg)`` of the stage module it is defined in -> that module's ``main``."""
    return lambda body: Stage(module_name(body), doc, body, arguments, kind, module_path(body))


def module_path(fn: Callable) -> str:
    """The dotted name of the module ``fn`` is defined in (``stages.scenes``)."""
    # `python -m stages.scenes` runs the module as __main__; its spec still names it
    spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)
    return spec.name if spec else fn.__module__


def module_name(fn: Callable) -> str:
    """The last part of the name of the module ``fn`` is defined in (``scenes`` for stages.scenes)."""
    return module_path(fn).rpartition(".")[2]
