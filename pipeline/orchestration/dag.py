"""The pipeline's DAG as DVC gives it (``dvc.repo.Repo(root).index.graph``), and sub-DAG selection."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Stage:
    address: str            # what `dvc repro` takes: "name", "name@key" (matrix/foreach), "sub/dvc.yaml:name"
    name: str               # the stage name without its dvc.yaml path
    cmd: str
    upstream: tuple[str, ...]   # addresses of the stages it depends on directly


def dvc_stages(workspace: str | Path = ".") -> list[Stage]:
    """Every pipeline stage of the workspace in DAG order (dependencies first; ties in dvc.yaml order).

    `.dvc` data sources (``dvc add``) are dependencies, not steps, and are left out.
    """
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph           # edge u -> v: stage u depends on stage v
        nodes = [s for s in graph.nodes if s.cmd]

        def address(s) -> str:            # `s.addressing` is relative to the process's cwd, not the workspace
            rel = Path(os.path.relpath(s.path, repo.root_dir)).as_posix()
            return s.name if rel == "dvc.yaml" else f"{rel}:{s.name}"

        addr = {s: address(s) for s in nodes}
        stages = {
            addr[s]: Stage(
                address=addr[s],
                name=s.name,
                cmd=" && ".join(s.cmd) if isinstance(s.cmd, list) else s.cmd,
                upstream=tuple(sorted(addr[v] for v in graph.successors(s) if v in addr)),
            )
            for s in nodes
        }
        position = {addr[s]: i for i, s in enumerate(nodes)}
        deps = nx.DiGraph()
        deps.add_nodes_from(stages)
        deps.add_edges_from((up, st.address) for st in stages.values() for up in st.upstream)
    order = nx.lexicographical_topological_sort(deps, key=lambda a: f"{position[a]:08d}")
    return [stages[a] for a in order]


def product_stages(stages: list[Stage]) -> list[Stage]:
    """The stages of the root dvc.yaml: what a flow runs without targets. Stages of other dvc.yaml files
    (studies/dvc.yaml: addresses ``studies/dvc.yaml:NAME``) run when targeted."""
    return [s for s in stages if ":" not in s.address]


def stage_matches(stage: Stage, pattern: str) -> bool:
    stem = stage.name.split("@", 1)[0]
    return any(fnmatch.fnmatchcase(x, pattern) for x in {stage.address, stage.name, stem})


def select_stages(
    stages: list[Stage],
    targets: Iterable[str] | None = None,
    *,
    upstream: bool = True,
    missing_ok: bool = False,
) -> list[Stage]:
    """The sub-DAG to run, in DAG order.

    ``targets``: stage addresses, names, matrix/foreach stems (``ablate`` = every ``ablate@...``) or
    globs (``ablat*``); None = every stage. ``upstream`` adds everything the targets depend on.
    An unknown target raises ValueError listing the stages there are (unless ``missing_ok``).
    """
    if targets is None:
        return list(stages)
    by_address = {s.address: s for s in stages}
    chosen: set[str] = set()
    for target in targets:
        hits = {s.address for s in stages if stage_matches(s, target)}
        if not hits and not missing_ok:
            raise ValueError(
                f"no DVC stage matches {target!r}; stages: {', '.join(s.address for s in stages) or 'none'}"
            )
        chosen |= hits
    if upstream:
        todo = list(chosen)
        while todo:
            for up in by_address[todo.pop()].upstream:
                if up not in chosen:
                    chosen.add(up)
                    todo.append(up)
    return [s for s in stages if s.address in chosen]
