"""pipeline/closure.py: a stage's code digest ignores comments, docstrings and formatting, and follows
every code change in its import closure and nothing outside it."""

import ast
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline import closure
from tests.params import REPO


@pytest.fixture
def tree(tmp_path):
    """A copy of the project's code, free to edit."""
    for pkg in closure.PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_docstrings_comments_and_formatting_do_not_count(tree):
    config = tree / "pipeline/config.py"
    before = closure.closure_digest("stages.distill", tree)
    text = config.read_text()
    first_doc_end = text.index('"""', 3)
    config.write_text(text[:3] + "Edited module docstring. " + text[3:first_doc_end] + '"""'
                      + text[first_doc_end + 3:].replace("\n\n\n", "\n\n\n# a comment\n\n", 1) + "\n\n")
    losses = tree / "pipeline/distill/losses.py"
    fn = next(n for n in ast.parse(losses.read_text()).body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n))
    _edit(losses, ast.get_docstring(fn, clean=False), "A rewritten docstring.")
    assert closure.closure_digest("stages.distill", tree) == before


def test_a_code_edit_changes_exactly_the_digests_whose_closure_holds_it(tree):
    before = {m: closure.closure_digest(m, tree) for m in closure.stage_modules(tree)}
    with open(tree / "pipeline/distill/losses.py", "a") as f:
        f.write("\nEDITED = 1\n")
    after = {m: closure.closure_digest(m, tree) for m in before}
    changed = {m for m in before if before[m] != after[m]}
    importers = {m for m in before if "pipeline/distill/losses.py" in closure.import_closure(m, tree)}
    assert "stages.distill" in importers and "stages.scenes" not in importers
    assert changed == importers


def test_digests_cover_every_stage_command_and_are_written_whole(tree):
    written = closure.write_digests(tree)
    assert [p.name for p in written] == [f"{m}.json" for m in closure.stage_modules(tree)]
    commands = {st["cmd"].split()[2] for f in ("dvc.yaml", "studies/dvc.yaml")
                for name, st in yaml.safe_load((REPO / f).read_text())["stages"].items() if name != "code_digests"}
    assert commands <= set(closure.stage_modules(tree))
    record = json.loads((tree / closure.digest_file("stages.encode")).read_text())
    assert record["digest"] == closure.closure_digest("stages.encode", tree)
    assert record["closure"] == closure.import_closure("stages.encode", tree)
    again = [p.read_bytes() for p in closure.write_digests(tree)]
    assert again == [p.read_bytes() for p in written]          # deterministic: no rerun downstream
    assert not list(tree.glob(".digests.tmp-*"))


def test_the_digest_stage_imports_nothing_heavy():
    code = ("import sys, runpy; sys.argv = ['x', '--root', sys.argv[1]]; runpy.run_module('pipeline.closure', "
            "run_name='__main__'); heavy = {'torch', 'numpy', 'pandas', 'diffusers', 'yaml', 'pydantic'} & set(sys.modules); "
            "assert not heavy, heavy")
    out = REPO / "build" / "test-closure"
    shutil.rmtree(out, ignore_errors=True)
    for pkg in closure.PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, capture_output=True)
        assert (out / "digests" / "stages.scenes.json").is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_committed_digests_are_the_code_s(tmp_path):
    """digests/ (in git) is what code_digests writes for this code, and dvc.lock records code_digests on
    it: a clone's `dvc status` is truthful. Fails after a code edit until `dvc repro code_digests`."""
    fresh = closure.write_digests(REPO, tmp_path / "digests")
    committed = sorted((REPO / closure.DIGESTS).glob("*.json"))
    assert [p.name for p in committed] == [p.name for p in fresh], "run `dvc repro code_digests`"
    for old, new in zip(committed, fresh):
        assert old.read_text() == new.read_text(), f"{old}: stale; run `dvc repro code_digests`"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "code_digests"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}, "run `dvc repro code_digests` (and commit dvc.lock)"
