"""The pull-request workflows: the comment pipeline.reporting.pr_comment renders from real DVC output, the
posting workflow's script against a stand-in `gh`, and zizmor's audit of .github/workflows."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.reporting import pr_comment
from pipeline.reporting.pr_comment import MARKER, UP_TO_DATE, Comparison, render_comment

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
RUN_WF, POST_WF = WORKFLOWS / "pr-metrics.yml", WORKFLOWS / "pr-metrics-comment.yml"


def _env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_IGNORE_ISATTY": "1", "PYTHONPATH": str(REPO),
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def _run(args, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc


def _dvc(cwd, *args):
    return _run([sys.executable, "-m", "dvc", *args], cwd)


TRAIN = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
os.makedirs("metrics", exist_ok=True)
json.dump({"psnr": 20.0 + p["lr"], "ssim": 0.5}, open("metrics/headline.json", "w"))
with open("metrics/loss.csv", "w") as f:
    f.write("step,loss\\n" + "".join(f"{i},{p['lr'] / (i + 1)}\\n" for i in range(3)))
"""


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    """git + DVC: ``code`` (a code_digests stand-in: a digest of train.py) -> ``train`` (params train.*,
    metrics/headline.json, a plot), run and committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    py = json.dumps(sys.executable)
    (repo / "params.yaml").write_text("train:\n  lr: 0.1\n  steps: 10\n")
    (repo / "train.py").write_text(TRAIN)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "code": {"cmd": f"{py} -c \"import hashlib; open('digest.txt', 'w').write("
                        f"hashlib.sha256(open('train.py', 'rb').read()).hexdigest())\"",
                 "deps": ["train.py"], "outs": [{"digest.txt": {"cache": False}}]},
        "train": {"cmd": f"{py} train.py", "deps": ["digest.txt"], "params": ["train"],
                  "metrics": [{"metrics/headline.json": {"cache": False}}],
                  "plots": [{"metrics/loss.csv": {"cache": False, "x": "step", "y": "loss"}}]},
    }}))
    _run(["git", "init", "-q"], repo)
    _dvc(repo, "init", "-q")
    _dvc(repo, "repro", "-q")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "base"], repo)
    return repo


def _render(repo: Path, *extra) -> str:
    out = repo.parent / "out"
    _run([sys.executable, "-m", "pipeline.reporting.pr_comment", "render", "--base", "HEAD",
          "--plots-dir", str(out / "plots"), "-o", str(out / "comment.md"), *extra], repo)
    return (out / "comment.md").read_text()


def test_comment_from_two_real_metric_sets(tiny_repo):
    """HEAD vs a workspace whose params, code and metrics changed without a rerun: both values and the delta
    of each changed metric, the params change, the plots, and the stages `dvc repro` would rerun (code_digests'
    stand-in refreshed first, so the rest reads the new digest). After `dvc repro`: up to date."""
    repo = tiny_repo
    (repo / "params.yaml").write_text("train:\n  lr: 0.3\n  steps: 10\n")
    (repo / "train.py").write_text(TRAIN + "# a code change\nprint('trained')\n")
    (repo / "metrics" / "headline.json").write_text(json.dumps({"psnr": 21.5, "ssim": 0.5}))

    text = _render(repo, "--refresh", "code")
    assert text.startswith(MARKER)
    assert "| psnr | 20.1 | 21.5 | +1.4 (+7.0%) |" in text                       # both values and the delta
    assert "ssim" not in text.split("**Headline metrics**")[1]                     # unchanged: not listed
    assert "| `train.lr` | 0.1 | 0.3 |" in text                                   # the params change
    assert "stale: 2 stages would rerun: `code`, `train`" in text
    assert "`code`: train.py modified" in text                                    # refreshed, reason kept
    assert "`train`: digest.txt modified; param train modified; metrics/headline.json modified" in text
    assert UP_TO_DATE not in text
    assert "(1 plot: `metrics/loss.csv`)" in text
    assert (repo.parent / "out" / "plots" / "default" / "index.html").is_file()

    _dvc(repo, "repro", "-q")                 # the stages rerun on the new code and params: psnr 20.3
    text = _render(repo)
    assert f"✅ {UP_TO_DATE}" in text and "stale:" not in text
    assert "| psnr | 20.1 | 20.3 | +0.2 (+1.0%) |" in text
    assert "| `train.lr` | 0.1 | 0.3 |" in text


def test_status_line_ignores_outputs_absent_from_the_checkout():
    """CI has no DVC cache: deleted / not-in-cache data is not a change; a changed digest or param is."""
    status = {
        "scenes": [{"changed deps": {"digests/stages.scenes.json": "modified"}},
                   {"changed outs": {"data/scenes": "not in cache"}}],
        "encode": [{"changed deps": {"data/scenes": "deleted"}}, {"changed outs": {"data/encoded": "deleted"}}],
        **{f"ablate@v{i}": [{"changed deps": {"params.yaml": {"ablations.x": "modified"}}}] for i in range(3)},
    }
    text = render_comment([Comparison("t", "base", "PR")], status)
    assert "stale: 4 stages would rerun: `scenes`, `ablate (×3)`" in text
    assert "1 other stage(s) were judged on their code and params only" in text
    assert UP_TO_DATE in render_comment([], {"encode": status["encode"]})
    assert "could not be taken: boom" in render_comment([], None, status_error="boom")


def test_comment_fits_github():
    big = {"metrics/headline.json": {f"m{i}": {"old": i, "new": i + 1, "diff": 1} for i in range(4000)}}
    text = render_comment([Comparison("t", "base", "PR", metrics_diff=big)], {}, report="x" * 70_000)
    assert len(text) <= pr_comment.COMMENT_LIMIT and "smoke report" not in text


# ------------------------------------------------------------------------------------------- workflows


def _load(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))   # PyYAML reads the key `on` as True
    return wf


def _uses(wf: dict) -> list[str]:
    return [s["uses"] for job in wf["jobs"].values() for s in job.get("steps", []) if "uses" in s]


def test_workflows_split_privilege():
    """Part 1 runs the PR's code with a read-only token and no secrets; part 2 only downloads the artifact
    and comments: it checks out nothing and runs nothing of the PR."""
    run, post = _load(RUN_WF), _load(POST_WF)
    assert list(run["on"]) == ["pull_request"] and run["permissions"] == {"contents": "read"}
    assert "secrets." not in RUN_WF.read_text()
    for job in run["jobs"].values():
        assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
    assert "python -m pipeline.reporting.pr_comment render" in RUN_WF.read_text()

    assert post["on"] == {"workflow_run": {"workflows": [run["name"]], "types": ["completed"]}}
    assert post["permissions"] == {}
    (job,) = post["jobs"].values()
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert [u.split("@")[0] for u in _uses(post)] == ["actions/download-artifact"]
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert not re.search(r"\b(pip|pytest|dvc|make|git)\b|pipeline\.", script)
    assert MARKER in script


def test_actions_pinned_to_commits():
    for path in (RUN_WF, POST_WF):
        for line in path.read_text().splitlines():
            if m := re.match(r"\s*-?\s*uses:\s*(\S+)(.*)", line):
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", m[1]), f"{path.name}: {line.strip()}"
                assert re.fullmatch(r"\s*# v\d+(\.\d+)*", m[2]), f"{path.name}: no `# vX` comment: {line.strip()}"


GH_STUB = """#!/usr/bin/env bash
# gh, as the posting step calls it: canned answers, every call logged
echo "$*" >> "$GH_LOG"
case "$*" in
  *"repos/o/r/pulls/"*) echo "$PR_HEAD" ;;
  *"--paginate"*) printf '%s' "$EXISTING" ;;
  *"--method"*) for a in "$@"; do if [[ $a == body=@* ]]; then cp "${a#body=@}" "$GH_BODY"; fi; done ;;
  *) exit 3 ;;
esac
"""


@pytest.fixture
def post(tmp_path):
    """Run the posting step's script with a stand-in gh: (pr-number, PR head, existing ids, conclusion)."""
    (step,) = [s for s in _load(POST_WF)["jobs"]["comment"]["steps"] if "run" in s]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "gh").write_text(GH_STUB)
    (bindir / "gh").chmod(stat.S_IRWXU)
    art = tmp_path / "pr-comment"
    art.mkdir()
    (art / "comment.md").write_text(f"{MARKER}\n## refine-control\nbody\n")

    def call(pr_number="7", pr_head="abc o/fork", existing="", conclusion="success"):
        (art / "pr-number").write_text(pr_number + "\n")
        log, body = tmp_path / "gh.log", tmp_path / "posted.md"
        log.unlink(missing_ok=True)
        body.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "GH_LOG": str(log),
               "GH_BODY": str(body), "PR_HEAD": pr_head, "EXISTING": existing, "REPO": "o/r",
               "HEAD_SHA": "abc", "HEAD_REPO": "o/fork", "CONCLUSION": conclusion, "RUN_URL": "https://run",
               "DIR": str(art), "RUNNER_TEMP": str(tmp_path), "GH_TOKEN": "x"}
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True, text=True)
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, calls, body.read_text() if body.exists() else None

    return call


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="needs bash, python3")
def test_posting_step_creates_then_updates_one_comment(post):
    proc, calls, body = post()
    assert proc.returncode == 0, proc.stderr
    assert calls[-1].startswith("api --method POST repos/o/r/issues/7/comments")
    assert body.startswith(MARKER + "\n## refine-control") and body.count(MARKER) == 1

    proc, calls, body = post(existing="111\n222\n", conclusion="failure")
    assert proc.returncode == 0, proc.stderr
    assert calls[-1].startswith("api --method PATCH repos/o/r/issues/comments/111")
    assert "concluded **failure**: [log](https://run)" in body


def test_posting_step_refuses_a_pr_the_run_did_not_test(post):
    proc, calls, body = post(pr_head="def o/fork")         # the number names another PR (or a newer push)
    assert proc.returncode == 0 and body is None and not any("--method" in c for c in calls)
    proc, calls, body = post(pr_number="7; rm -rf /")     # not a number: nothing is called
    assert proc.returncode != 0 and calls == [] and body is None


def _zizmor(*args) -> list[dict]:
    exe = shutil.which("zizmor") or shutil.which("zizmor", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("zizmor is not installed (pip install zizmor; it is in the test extra)")
    proc = subprocess.run([exe, "--offline", "--format", "json", *args, str(WORKFLOWS)], cwd=REPO,
                          capture_output=True, text=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"zizmor exit {proc.returncode}: {proc.stdout}\n{proc.stderr}")


def test_zizmor_finds_nothing_medium_or_high():
    """zizmor (offline audits, regular persona) on .github/workflows: no medium or high finding. Its one
    ignore comment covers only the workflow_run trigger of the posting workflow, which runs no PR code."""
    serious = {"Medium", "High"}
    found = [f for f in _zizmor() if f["determinations"]["severity"] in serious]
    assert not found, [(f["ident"], f["determinations"]["severity"], f["desc"]) for f in found]
    ignored = [f for f in _zizmor("--no-ignores") if f["determinations"]["severity"] in serious]
    assert [(f["ident"], POST_WF.name in json.dumps(f["locations"])) for f in ignored] == \
        [("dangerous-triggers", True)]
