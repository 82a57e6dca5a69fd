"""build_triplets: bad-row corpus under both policies, user manifests, shard union equality."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.params import REPO, config
from pipeline.data.images import load_manifest
from pipeline.data.synthetic import generate_scenes
from pipeline.data.triplets import build_triplets, load_input, merge_shards
from stages.build_triplets import main as stage_main

BAD_KINDS = {"missing_file", "unreadable", "size_mismatch", "empty_mask", "full_mask", "duplicate_id",
             "unknown_split"}


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return path.name


@pytest.fixture
def corpus(tmp_path):
    """A user dataset (CSV) with good rows and one row of every bad kind."""
    d = tmp_path / "user"
    d.mkdir()
    rng = np.random.default_rng(0)
    img = lambda w, h: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    hole = np.zeros((48, 40), np.uint8)
    hole[10:30, 8:30] = 255
    _png(d / "a.png", img(40, 48)), _png(d / "a_m.png", hole)
    _png(d / "b.png", img(64, 64))
    _png(d / "c.png", img(40, 48)), _png(d / "small_m.png", np.full((20, 20), 255, np.uint8))
    _png(d / "e.png", img(40, 48)), _png(d / "empty_m.png", np.zeros((48, 40), np.uint8))
    _png(d / "f.png", img(40, 48)), _png(d / "full_m.png", np.full((48, 40), 200, np.uint8))
    full = (d / "b.png").read_bytes()
    (d / "trunc.png").write_bytes(full[: len(full) // 2])
    (d / "text.png").write_text("not an image")
    rows = [
        ("a", "a.png", "a_m.png", "a red circle", "labelled"),
        ("b", "b.png", "", "", "unlabelled"),
        ("missing", "nope.png", "", "x", "labelled"),
        ("trunc", "trunc.png", "", "x", "labelled"),
        ("text", "text.png", "", "x", "labelled"),
        ("size", "c.png", "small_m.png", "x", "labelled"),
        ("empty", "e.png", "empty_m.png", "x", "val"),
        ("full", "f.png", "full_m.png", "x", "val"),
        ("a", "b.png", "", "dup", "labelled"),
        ("nomask", "a.png", "gone_m.png", "x", "labelled"),
        ("split", "b.png", "", "x", "training"),
    ]
    df = pd.DataFrame(rows, columns=["id", "image", "mask", "prompt", "split"])
    df.to_csv(d / "manifest.csv", index=False)
    return d / "manifest.csv"


def test_fail_policy_lists_bad_rows_and_leaves_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    rc = stage_main(["--params", str(REPO / "params.yaml"), "--manifest", str(corpus), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "9 bad row(s)" in err and "nope.png" in err and "missing file" in err
    assert "trunc.png" in err and "text.png" in err and "mask size 20x20 differs from image 40x48" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_skip_policy_rejects_every_kind(corpus, tmp_path):
    out = tmp_path / "out"
    rc = stage_main(["--params", str(REPO / "params.yaml"), "--manifest", str(corpus), "--out", str(out),
                     "--on-bad", "skip"])
    assert rc == 0
    rejects = pd.read_csv(out / "rejects.csv")
    assert set(rejects["kind"]) == BAD_KINDS
    assert rejects["file"].notna().all() and rejects["reason"].notna().all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rejected"] == len(rejects) == 9 and metrics["written"] == 2
    m = load_manifest(out / "manifest.parquet")
    assert list(m["id"]) == ["a", "b"]
    a, b = m.iloc[0], m.iloc[1]
    assert a.local_prompt == "a red circle" and a.mask_kind == "given"
    assert pd.isna(b.local_prompt) and b.mask_kind in ("stroke", "box")  # unlabelled, generated mask
    for r in m.itertuples():
        assert Image.open(r.image).size == (32, 32) and Image.open(r.mask).size == (32, 32)
        hole = np.asarray(Image.open(r.mask)) > 127
        assert 0 < hole.sum() < hole.size and abs(hole.mean() - r.mask_fraction) < 1e-9


def test_jsonl_and_folders(tmp_path):
    d = tmp_path / "imgs"
    (d / "masks").mkdir(parents=True)
    for name in ("p", "q"):
        _png(d / f"{name}.png", np.full((32, 32, 3), 90, np.uint8))
    m = np.zeros((32, 32), np.uint8)
    m[4:9, 4:9] = 255
    _png(d / "masks" / "p.png", m)
    rows = load_input(config().triplets.model_copy(update=dict(source="folders", image_dir=str(d), mask_dir=str(d / "masks"))), "")
    df, metrics = build_triplets(rows, config().triplets, 32, tmp_path / "o1", progress=False)
    assert list(df["mask_kind"]) [0] == "given" and df["mask_kind"][1] in ("stroke", "box")
    (tmp_path / "m.jsonl").write_text('{"image": "imgs/p.png", "mask": "imgs/masks/p.png", "prompt": "grey"}\n')
    rows = load_input(config().triplets.model_copy(update=dict(source="manifest", manifest=str(tmp_path / "m.jsonl"))), "")
    df, _ = build_triplets(rows, config().triplets, 32, tmp_path / "o2", progress=False)
    assert df["local_prompt"].tolist() == ["grey"] and df["mask_fraction"][0] == 25 / 1024


def test_shard_union_equals_unsharded(tmp_path):
    cfg = config({"data": {"splits": {"labelled": 10, "unlabelled": 6, "val": 3, "test": 3}}})
    generate_scenes(cfg.data, cfg.seed, tmp_path / "scenes", progress=False)
    tcfg = config().triplets
    rows = load_input(tcfg, tmp_path / "scenes" / "manifest.parquet")
    full, _ = build_triplets(rows, tcfg, 32, tmp_path / "full", progress=False)
    assert full[full.split == "unlabelled"][["local_prompt", "global_prompt"]].isna().all().all()
    dirs = []
    for i in range(3):
        build_triplets(rows, tcfg, 32, tmp_path / f"s{i}", shard=(i, 3), progress=False)
        dirs.append(tmp_path / f"s{i}")
    union = merge_shards(dirs)
    ref = merge_shards([tmp_path / "full"])
    assert len(union) == len(ref) == 22
    cols = [c for c in ref.columns if c not in ("image", "mask", "instances")]
    pd.testing.assert_frame_equal(union[cols], ref[cols])
    for u, r in zip(union.itertuples(), ref.itertuples()):
        assert open(u.image, "rb").read() == open(r.image, "rb").read()
        assert open(u.mask, "rb").read() == open(r.mask, "rb").read()
