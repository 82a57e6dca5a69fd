"""pipeline.atomic: the one file and folder writer, and the rule that no command deletes what it did not
create (a folder is replaced only when missing, empty or carrying MARKER)."""

import json

import pytest
import torch

from pipeline.atomic import MARKER, NotOurOutputError, write_dir, write_file


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "photo.jpg").write_bytes(b"precious")
    (path / "notes").mkdir()
    (path / "notes" / "a.txt").write_text("mine")
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _hidden(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_write_file_text_bytes_callable_and_no_temp_left(tmp_path):
    write_file(tmp_path / "sub" / "a.txt", "héllo\n")
    write_file(tmp_path / "b.bin", b"\x00\x01")
    seen = []
    write_file(tmp_path / "c.parquet", lambda p: (seen.append(p.suffix), p.write_text("x")))
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" and seen == [".parquet"]
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "sub") == []


def test_write_file_failure_keeps_the_old_file(tmp_path):
    write_file(tmp_path / "m.json", "old")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_file(tmp_path / "m.json", boom)
    assert (tmp_path / "m.json").read_text() == "old" and _hidden(tmp_path) == []


def test_write_dir_marks_replaces_its_own_and_keeps_old_on_error(tmp_path):
    out = tmp_path / "out"
    with write_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / MARKER).is_file() and (out / "a.txt").read_text() == "1"
    with write_dir(out) as tmp:  # ours: replaced whole
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    with pytest.raises(RuntimeError), write_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"] and _hidden(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with write_dir(tmp_path / "empty") as tmp:  # an empty folder is fine
        (tmp / "d.txt").write_text("4")
    assert (tmp_path / "empty" / "d.txt").exists()


def test_write_dir_refuses_what_it_did_not_create(tmp_path):
    user = tmp_path / "user"
    before = _user_folder(user)
    ran = []
    with pytest.raises(NotOurOutputError, match=rf"{user}: holds files this project did not write.*"
                                               r"Choose another output folder"):
        with write_dir(user):
            ran.append(1)
    assert not ran and _snapshot(user) == before and _hidden(tmp_path) == []
    (tmp_path / "f.txt").write_text("a file")
    (tmp_path / "link").symlink_to(user)
    for path, what in ((tmp_path / "f.txt", "a file"), (tmp_path / "link", "a symlink")):
        with pytest.raises(NotOurOutputError, match=f"is {what}"), write_dir(path):
            pass
    assert (tmp_path / "f.txt").read_text() == "a file" and _snapshot(user) == before


def test_write_dir_refuses_a_folder_filled_while_it_worked(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NotOurOutputError), write_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        _user_folder(out)
    assert (out / "photo.jpg").read_bytes() == b"precious" and _hidden(tmp_path) == []


def test_save_atomic_refuses_a_user_folder(tmp_path):
    """save_pretrained outputs (VAE, teacher, backbone, students) go through write_dir."""
    from pipeline.training import save_atomic

    class Model:
        def save_pretrained(self, path):
            (path / "config.json").write_text("{}")

    save_atomic(Model(), tmp_path / "model")
    save_atomic(Model(), tmp_path / "model")  # ours: replaced
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [MARKER, "config.json"]
    before = _user_folder(tmp_path / "user")
    with pytest.raises(NotOurOutputError):
        save_atomic(Model(), tmp_path / "user")
    assert _snapshot(tmp_path / "user") == before


def test_link_tree_writes_source_inside_and_refuses_a_user_folder(tmp_path):
    from pipeline.models.pretrained.materialise import _link_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "image.png").write_bytes(b"not mirrored")
    _link_tree(src, tmp_path / "vae", "copy", {"repo": "x"})
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [MARKER, "SOURCE.json", "config.json"]
    assert json.loads((tmp_path / "vae" / "SOURCE.json").read_text()) == {"repo": "x"}
    before = _user_folder(tmp_path / "user")
    with pytest.raises(NotOurOutputError):
        _link_tree(src, tmp_path / "user", "copy", {})
    assert _snapshot(tmp_path / "user") == before


def test_metrics_params_and_shards_leave_no_temp(tmp_path):
    from pipeline.data.shards import load_split, write_shard
    from pipeline.metrics_io import read_json, write_json
    from pipeline.profile import write_params

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": 1})
    assert read_json(tmp_path / "m.json") == {"a": None, "b": 1}
    write_params({"seed": 1}, tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == "seed: 1\n"
    for _ in range(2):
        write_shard(tmp_path / "enc" / "val", 0, 1, ["b", "a"], {"mask": torch.ones(2, 1, 2, 2)})
    ids, t = load_split(tmp_path / "enc", "val")
    assert ids == ["a", "b"] and t["mask"].shape == (2, 1, 2, 2)
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "enc" / "val") == []
