"""The stages of studies/dvc.yaml: :func:`pipeline.entry.stage` with ``--studies`` (studies/params.yaml),
validated against params.yaml before the body runs, which gets it as a third argument. Apart from
pipeline/entry.py so that no main stage's code deps (its import closure) hold studies code."""

from __future__ import annotations

import functools
from typing import Callable

from pipeline import studies as S
from pipeline.entry import Stage, arg, stage
from pipeline.studies import config as study_config


def study_stage(doc: str, *arguments: tuple, kind: str) -> Callable[[Callable], Stage]:
    """Decorator: ``body(args, cfg, study)`` (study: the validated StudiesConfig) -> the module's ``main``."""

    def make(body: Callable) -> Stage:
        @functools.wraps(body)  # keeps body's module: the stage's name
        def with_study(args, cfg):
            return body(args, cfg, study_config.load(cfg, args.studies))

        studies = arg("--studies", default=str(S.STUDY_PARAMS),
                      help="the studies' params (schema: pipeline/studies/config.py)")
        return stage(doc, *arguments, studies, kind=kind)(with_study)

    return make


def prompt_level_name(name: str) -> str:
    """argparse type of a prompt-quality level (noise<P> | empty): checked, kept as its name."""
    study_config.prompt_level(name)
    return name
