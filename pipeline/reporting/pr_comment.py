"""The pull-request comment: what a PR changes (params, headline metrics, plots) and whether the committed
default-profile results are stale for its code.

``render_comment`` is a pure function of the JSON that DVC prints (``dvc params diff --json``,
``dvc metrics diff --json``, ``dvc plots diff --json``, ``dvc status --json``); the CLI runs those commands
and writes the Markdown:

    # in a checkout of the PR with the default params (CI: a worktree of HEAD, before any run): which stages
    # would `dvc repro` rerun? code_digests is refreshed first so the digests say which stages the code reaches
    python -m pipeline.reporting.pr_comment status --repo DIR --refresh code_digests -o status.json

    # the comment: BASE -> HEAD (committed default profile; HEAD defaults to the workspace), and optionally
    # SMOKE_BASE -> workspace (both runs of the smoke profile); plots rendered to --plots-dir as HTML
    python -m pipeline.reporting.pr_comment render --base BASE [--head HEAD] [--smoke-base REV] \
        [--status status.json] [--plots-dir pr-plots] -o comment.md

Without ``--status``, ``render`` runs the status itself in the current directory. Standard library only (DVC
runs as ``python -m dvc`` in a subprocess), so it imports nothing of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "<!-- refine-control:pr-metrics -->"   # the sticky comment's identity (the posting workflow looks for it)
HEADLINE = "metrics/headline.json"
UP_TO_DATE = "committed default-profile results are up to date for this code"
ABSENT = frozenset({"deleted", "not in cache"})   # an output or dependency missing from this checkout
COMMENT_LIMIT = 65_000    # GitHub refuses comment bodies over 65,536 characters
INLINE_GROUPS = 12        # stale stages named in the status line; the rest in its details


# ---------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class Staleness:
    stale: dict[str, list[str]]   # stage -> why it would rerun
    absent_only: list[str]        # stages whose only changes are outputs/inputs absent from this checkout


def staleness(status: Mapping | None, refreshed: Mapping | None = None) -> Staleness:
    """Which stages `dvc repro` would rerun, read from ``dvc status --json``.

    A dependency or output that is ``deleted`` / ``not in cache`` is data this checkout does not hold (DVC
    caches it; CI has no cache), not a change: a stage with only such entries is not counted. A changed
    command, a changed or new dependency, a changed params value or a modified output is. ``refreshed``: the
    status, before, of stages that were stale and were rerun before ``status`` was taken (code_digests, so
    that the digests name the stages a code change reaches): they would rerun too.
    """
    stale: dict[str, list[str]] = {}
    absent_only = []
    for stage, entries in [*(refreshed or {}).items(), *(status or {}).items()]:
        reasons = []
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str):          # "changed command", "always changed", ...
                reasons.append(entry)
                continue
            for kind, changes in entry.items():
                for path, st in (changes.items() if isinstance(changes, Mapping) else [(kind, changes)]):
                    if isinstance(st, Mapping):   # a params file: {key: "modified" | "new" | "deleted"}
                        reasons += [f"param {k} {v}" for k, v in st.items()]
                    elif st not in ABSENT:
                        reasons.append(f"{path} {st}")
        if reasons:
            stale.setdefault(stage, []).extend(reasons)
        elif stage not in stale:
            absent_only.append(stage)
    return Staleness(stale, absent_only)


def _group(stages: Iterable[str]) -> list[str]:
    """``ablate_headline@full-0`` ... -> ``ablate_headline (x15)``: a foreach/matrix stage named once."""
    counts: dict[str, int] = {}
    for s in stages:
        base = s.split("@", 1)[0]
        counts[base] = counts.get(base, 0) + 1
    return [b if n == 1 else f"{b} (×{n})" for b, n in counts.items()]


def grouped_reasons(stale: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Why each (grouped) stage would rerun: the reasons of a foreach/matrix stage's instances, each once."""
    reasons: dict[str, dict[str, None]] = {}
    for s, rs in stale.items():
        reasons.setdefault(s.split("@", 1)[0], {}).update(dict.fromkeys(rs))
    return {g: list(rs) for g, rs in zip(_group(stale), reasons.values())}


def status_line(st: Staleness) -> str:
    """The line the reviewer reads: up to date, or ``stale: N stages would rerun: a, b, c``."""
    if not st.stale:
        return UP_TO_DATE
    n = len(st.stale)
    groups = _group(st.stale)
    named = ", ".join(f"`{g}`" for g in groups[:INLINE_GROUPS])
    more = f" and {len(groups) - INLINE_GROUPS} more" if len(groups) > INLINE_GROUPS else ""
    return f"stale: {n} stage{'s' if n != 1 else ''} would rerun: {named}{more}"


# ---------------------------------------------------------------------------------------------- tables


def _cell(x) -> str:
    """A table cell: numbers to 5 significant digits, anything else as compact JSON, pipes escaped."""
    if x is None:
        text = "—"
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        text = x if isinstance(x, str) else json.dumps(x, sort_keys=True)
    else:
        text = f"{x:.5g}"
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _delta(old, new) -> str:
    if isinstance(old, bool) or isinstance(new, bool) or not all(isinstance(v, (int, float)) for v in (old, new)):
        return "—"
    d = new - old
    rel = f" ({d / abs(old):+.1%})" if old else ""
    return f"{d:+.4g}{rel}"


def _diff_rows(diff: Mapping | None) -> list[tuple[str, object, object]]:
    """A ``dvc metrics/params diff --json`` as (name, old, new) rows, sorted; the name carries the file only
    when the diff spans several."""
    rows = [(path, key, v.get("old"), v.get("new"))
            for path, values in sorted((diff or {}).items()) for key, v in sorted(values.items())]
    multi = len({r[0] for r in rows}) > 1
    return [(f"{path}: {key}" if multi else key, old, new) for path, key, old, new in rows]


def metrics_table(diff: Mapping | None, base: str, head: str) -> list[str]:
    """``dvc metrics diff --json``: metric | BASE | HEAD | change; only metrics that changed (DVC's choice)."""
    rows = _diff_rows(diff)
    if not rows:
        return ["No headline metric changed."]
    out = [f"| metric | {base} | {head} | change |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {_cell(name)} | {_cell(old)} | {_cell(new)} | {_delta(old, new)} |" for name, old, new in rows]
    return out


def params_table(diff: Mapping | None, base: str, head: str) -> list[str]:
    """``dvc params diff --json``: param | BASE | HEAD, with the params file when there are several."""
    rows = _diff_rows(diff)
    if not rows:
        return ["No parameter changed."]
    out = [f"| param | {base} | {head} |", "| --- | --- | --- |"]
    out += [f"| `{_cell(name)}` | {_cell(old)} | {_cell(new)} |" for name, old, new in rows]
    return out


def plots_lines(plots: Mapping | None, folder: str | None, where: str) -> list[str]:
    """``dvc plots diff --json``: which plots were rendered (``folder``/index.html) and where to find them."""
    data = (plots or {}).get("data") or {}
    if not data:
        return []
    ids = sorted(data)
    names = ", ".join(f"`{p}`" for p in ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    loc = f"`{folder}/index.html`" if folder else "index.html"
    return [f"`dvc plots diff` ({len(data)} plot{'s' if len(data) != 1 else ''}: {names}) is rendered to "
            f"{loc}{where}."]


# ---------------------------------------------------------------------------------------------- comment


@dataclass
class Comparison:
    """One ``dvc * diff`` pair of revisions and what DVC printed for it (JSON already parsed)."""
    title: str
    base: str                       # label of the old revision
    head: str                       # label of the new one
    params_diff: Mapping | None = None
    metrics_diff: Mapping | None = None
    plots: Mapping | None = None    # dvc plots diff --json
    plots_dir: str | None = None    # where the HTML went (a path inside the plots artifact)
    errors: list[str] = field(default_factory=list)   # a DVC command that failed: shown, not fatal


def render_comment(comparisons: Sequence[Comparison], status: Mapping | None, *, refreshed: Mapping | None = None,
                   status_error: str | None = None, run_url: str | None = None, artifact: str = "pr-plots",
                   report: str | None = None, notes: Sequence[str] = ()) -> str:
    """The comment's Markdown, from parsed DVC JSON only (no I/O). ``status``: ``dvc status --json`` of the
    default profile in the PR's checkout (None when it could not be taken: ``status_error`` says why)."""
    where = f" in the `{artifact}` artifact of [this run]({run_url})" if run_url else f" (artifact `{artifact}`)"
    out = [MARKER, "## refine-control: what this pull request changes", ""]
    out += [f"> {n}" for n in notes] + ([""] if notes else [])
    if status is None:
        out += [f"- ⚠️ `dvc status` of the default profile could not be taken: {status_error or 'no status'}", ""]
        st = None
    else:
        st = staleness(status, refreshed)
        out += [f"- {'⚠️' if st.stale else '✅'} {status_line(st)}"]
        if st.absent_only:
            out += [f"  <sub>{len(st.absent_only)} other stage(s) were judged on their code and params only: "
                    "their DVC-cached inputs/outputs are not in this checkout. A stage downstream of a stale "
                    "one reruns too when its inputs change.</sub>"]
        out.append("")
        if st.stale:
            out += ["<details><summary>Why each stage would rerun (<code>dvc status</code>)</summary>", ""]
            out += [f"- `{g}`: {'; '.join(r)}" for g, r in grouped_reasons(st.stale).items()]
            out += ["", "</details>", ""]
    for c in comparisons:
        out += [f"### {c.title}", ""]
        out += [f"- ❌ {e}" for e in c.errors] + ([""] if c.errors else [])
        out += ["**Params** (`dvc params diff`)", ""] + params_table(c.params_diff, c.base, c.head) + [""]
        out += [f"**Headline metrics** (`dvc metrics diff`, `{HEADLINE}`)", ""]
        out += metrics_table(c.metrics_diff, c.base, c.head) + [""]
        plots = plots_lines(c.plots, c.plots_dir, where)
        out += plots + ([""] if plots else [])
    if report:
        body = _strip_images(report)
        out += ["<details><summary>This PR's smoke report (reports/report.md)</summary>", "", body, "",
                "</details>", ""]
    text = "\n".join(out).rstrip() + "\n"
    if len(text) > COMMENT_LIMIT and report:   # the report goes first
        return render_comment(comparisons, status, refreshed=refreshed, status_error=status_error,
                              run_url=run_url, artifact=artifact, report=None, notes=notes)
    if len(text) > COMMENT_LIMIT:
        text = text[:COMMENT_LIMIT - 200] + "\n\n… (cut: the comment was longer than GitHub allows)\n"
    return text


def _strip_images(md: str) -> str:
    """A PR comment cannot show the report's relative figure paths: name the figure instead."""
    return re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f"*(figure `{m.group(2)}`: in the smoke-report artifact)*",
                  md)


# ---------------------------------------------------------------------------------------------- DVC


class DvcError(RuntimeError):
    pass


def dvc(args: Sequence[str], cwd: str | Path = ".", *, parse: bool = True):
    """``python -m dvc ARGS`` in ``cwd``: its parsed JSON stdout (``parse``), else the stdout text."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_IGNORE_ISATTY": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = [ln for ln in lines if ln.startswith("ERROR")][-2:] or lines[-2:]
        raise DvcError(f"`dvc {' '.join(args)}` failed: {' / '.join(last) or f'exit {proc.returncode}'}")
    if not parse:
        return proc.stdout
    text = proc.stdout.strip()
    return json.loads(text) if text else {}


def collect_status(repo: str | Path = ".", refresh: Sequence[str] = ()) -> dict:
    """``{"status": dvc status --json, "refreshed": {stage: its status before}}`` of ``repo``, after rerunning
    each ``refresh`` stage that is stale (alone: ``dvc repro --single-item``), so that e.g. refreshed code
    digests tell which stages the code reaches. Changes ``repo`` when it refreshes: use a throwaway checkout."""
    refreshed = {}
    for stage in refresh:
        before = dvc(["status", "--json", stage], repo)
        if before:
            dvc(["repro", "--single-item", stage], repo, parse=False)
            refreshed.update(before)
    return {"status": dvc(["status", "--json"], repo), "refreshed": refreshed}


def compare(title: str, base: str, head: str | None, *, labels: tuple[str, str], metrics: Sequence[str],
            plots_dir: Path | None, plots_label: str | None, cwd: str | Path = ".") -> Comparison:
    """Run the three diffs for BASE -> HEAD (HEAD None: the workspace); a failed command becomes an error line."""
    revs = [base] + ([head] if head else [])
    c = Comparison(title, *labels, plots_dir=plots_label)
    try:
        c.params_diff = dvc(["params", "diff", *revs, "--json"], cwd)
    except DvcError as e:
        c.errors.append(str(e))
    try:
        c.metrics_diff = dvc(["metrics", "diff", *revs, "--json", "--targets", *metrics], cwd)
    except DvcError as e:
        c.errors.append(str(e))
    if plots_dir is not None:
        try:
            with tempfile.TemporaryDirectory() as images:   # --json copies image plots: not into cwd
                c.plots = dvc(["plots", "diff", *revs, "--json", "-o", images], cwd)
            if (c.plots or {}).get("data"):
                plots_dir.mkdir(parents=True, exist_ok=True)
                dvc(["plots", "diff", *revs, "-o", str(plots_dir)], cwd, parse=False)
        except DvcError as e:
            c.errors.append(str(e))
    return c


def _run_url() -> str | None:
    env = os.environ
    if all(env.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")):
        return f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.reporting.pr_comment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="dvc status --json of a checkout (after refreshing the given stages)")
    s.add_argument("--repo", default=".", help="the checkout (changed when a --refresh stage is stale)")
    s.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                   help="rerun this stage alone first when it is stale (code_digests)")
    s.add_argument("-o", "--out", required=True)
    r = sub.add_parser("render", help="run the DVC diffs and write the comment")
    r.add_argument("--base", required=True, help="old revision of the committed comparison")
    r.add_argument("--head", default=None, help="new revision (default: the workspace)")
    r.add_argument("--smoke-base", default=None,
                   help="also compare this revision (the base's smoke run) with the workspace (this PR's)")
    r.add_argument("--metrics", action="append", default=None, metavar="PATH",
                   help=f"metrics file(s) to diff (default {HEADLINE})")
    r.add_argument("--status", default=None, help="a `status` subcommand's JSON (default: take it here)")
    r.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                   help="without --status: as `status --refresh` (changes this checkout)")
    r.add_argument("--plots-dir", default=None, help="render `dvc plots diff` HTML under this folder")
    r.add_argument("--artifact", default="pr-plots", help="the name the plots folder is uploaded under")
    r.add_argument("--run-url", default=None, help="link to the run holding the artifacts (default: from "
                   "GITHUB_SERVER_URL, GITHUB_REPOSITORY, GITHUB_RUN_ID)")
    r.add_argument("--report", default=None, help="a Markdown report to fold into the comment")
    r.add_argument("--note", action="append", default=[], help="a line to show at the top")
    r.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)

    if a.cmd == "status":
        out = collect_status(a.repo, a.refresh)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")  # DVC's (pipeline) order kept
        return

    status, refreshed, status_error = None, None, None
    try:
        got = json.loads(Path(a.status).read_text()) if a.status else collect_status(".", a.refresh)
        status, refreshed = got["status"], got.get("refreshed")
    except (OSError, ValueError, KeyError, DvcError) as e:
        status_error = str(e)
    metrics = a.metrics or [HEADLINE]
    plots_root = Path(a.plots_dir) if a.plots_dir else None
    title = (f"Committed default profile: `{a.base[:12]}` → `{a.head[:12]}`" if a.head
             else f"`{a.base[:12]}` → workspace")
    comparisons = [compare(title, a.base, a.head,
                           labels=("base", "PR" if a.head else "workspace"), metrics=metrics,
                           plots_dir=plots_root / "default" if plots_root else None,
                           plots_label="default" if plots_root else None)]
    if a.smoke_base:
        comparisons.append(compare("Smoke profile, run in CI: base → this PR", a.smoke_base, None,
                                   labels=("base", "PR"), metrics=metrics,
                                   plots_dir=plots_root / "smoke" if plots_root else None,
                                   plots_label="smoke" if plots_root else None))
    report = Path(a.report).read_text() if a.report and Path(a.report).exists() else None
    text = render_comment(comparisons, status, refreshed=refreshed, status_error=status_error,
                          run_url=a.run_url or _run_url(), artifact=a.artifact, report=report, notes=a.note)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
