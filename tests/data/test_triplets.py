"""build_triplets: bad-row corpus under both policies, user manifests, shard union equality."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.params import REPO, config
from pipeline.data.images import image_bytes, load_manifest, open_image
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
        assert open_image(r.image).size == (32, 32) and open_image(r.mask).size == (32, 32)
        hole = np.asarray(open_image(r.mask)) > 127
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
        assert image_bytes(u.image) == image_bytes(r.image) and image_bytes(u.mask) == image_bytes(r.mask)
        assert (u.instances is None) == (r.instances is None)
        assert u.instances is None or image_bytes(u.instances) == image_bytes(r.instances)
    # the flows' file-by-file merge of shard folders (flows.sharded): shard files are named per shard, no clash
    from pipeline.orchestration.shards import merge_shards as merge_folders
    merge_folders(dirs, tmp_path / "merged")
    merged = load_manifest(tmp_path / "merged" / "manifest.parquet")
    assert list(merged["id"]) == list(ref["id"])
    for u, r in zip(merged.itertuples(), ref.itertuples()):
        assert image_bytes(u.image) == image_bytes(r.image) and image_bytes(u.mask) == image_bytes(r.mask)


# ---------------------------------------------------------------- output folder safety

PARAMS = str(REPO / "params.yaml")


def _tcfg(**over):
    return config().triplets.model_copy(update=over)


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_out_at_the_users_folder_deletes_nothing(corpus, tmp_path, capsys):
    """Bug: --manifest DIR/manifest.csv --out DIR exited 0 after deleting DIR's images and manifest."""
    d = corpus.parent
    before = _files(d)
    rc = stage_main(["--params", PARAMS, "--manifest", str(corpus), "--out", str(d),
                     "--on-bad", "skip"])
    err = capsys.readouterr().err
    assert rc != 0 and _files(d) == before
    assert f"{d}: holds files this project did not write" in err and "Choose another output folder" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out = tmp_path / "out"  # our own output, and an empty folder, are replaced
    for _ in range(2):
        assert stage_main(["--params", PARAMS, "--manifest", str(corpus), "--out", str(out),
                           "--on-bad", "skip"]) == 0
    (tmp_path / "empty").mkdir()
    assert stage_main(["--params", PARAMS, "--manifest", str(corpus),
                       "--out", str(tmp_path / "empty"), "--on-bad", "skip"]) == 0


# ---------------------------------------------------------------- images as users have them

def _png16(path, arr):
    """A 16-bit RGB PNG (PIL writes none): signature, IHDR, one zlib IDAT of unfiltered rows, IEND."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _build_one(tmp_path, image, mask=None, **cfg):
    """One-row CSV manifest -> build_triplets (skip policy); returns (manifest row or None, rejects)."""
    rows = pd.DataFrame({"image": [image], "mask": [mask or ""], "prompt": ["p"]})
    rows.to_csv(tmp_path / "m.csv", index=False)
    tcfg = _tcfg(source="manifest", manifest=str(tmp_path / "m.csv"), on_bad="skip", **cfg)
    df, _ = build_triplets(load_input(tcfg, ""), tcfg, 32, tmp_path / "out", progress=False)
    m = load_manifest(tmp_path / "out" / "manifest.parquet")
    return (m.iloc[0] if len(m) else None), pd.read_csv(tmp_path / "out" / "rejects.csv")


GREY16 = np.full((32, 32), 32768, np.uint16)   # 16-bit mid-grey: 8-bit 128, not white


@pytest.mark.parametrize("name, save, rgb", [
    ("i16.png", lambda p: Image.fromarray(GREY16).save(p), (128, 128, 128)),
    ("i16b.tif", lambda p: Image.frombytes("I;16B", (32, 32), GREY16.astype(">u2").tobytes()).save(p),
     (128, 128, 128)),
    ("i32.tif", lambda p: Image.fromarray(GREY16.astype(np.int32)).save(p), (128, 128, 128)),
    ("f.tif", lambda p: Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(p), (128, 128, 128)),
    ("rgb16.png", lambda p: _png16(p, np.stack([GREY16, GREY16 // 2, np.full_like(GREY16, 65535)], -1)),
     (128, 64, 255)),
    ("p.png", lambda p: _palette(p), (200, 30, 10)),
    ("la.png", lambda p: Image.new("LA", (32, 32), (90, 0)).save(p), (90, 90, 90)),
    ("cmyk.tif", lambda p: Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p), (255, 0, 0)),
])
def test_image_modes_are_converted_not_clipped(tmp_path, name, save, rgb):
    save(tmp_path / name)
    row, rejects = _build_one(tmp_path, name)
    assert rejects.empty, rejects.to_dict("records")
    px = np.asarray(open_image(row.image))
    assert np.abs(px.astype(int) - rgb).max() <= 1, px[0, 0]


def _palette(path):
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 200, 30, 10])
    img.save(path)


def _exif_save(img, path, orientation=6):
    exif = img.getexif()
    exif[0x0112] = orientation  # 6: shown rotated 90 degrees clockwise
    img.save(path, exif=exif)


def test_exif_orientation_applies_to_images_and_masks(tmp_path):
    stored = np.zeros((32, 48, 3), np.uint8)  # 48 wide, 32 high as stored
    stored[:16] = (255, 0, 0)                   # top red -> shown on the right
    stored[16:] = (0, 0, 255)                   # bottom blue -> shown on the left
    _exif_save(Image.fromarray(stored), tmp_path / "photo.jpg")
    hole = np.zeros((48, 32), np.uint8)          # drawn over the image as shown: 32 wide, 48 high
    hole[:, 20:] = 255                           # the right (red) side
    Image.fromarray(hole).save(tmp_path / "shown_m.png")
    row, rejects = _build_one(tmp_path, "photo.jpg", "shown_m.png", resize="stretch")
    assert rejects.empty, rejects.to_dict("records")
    px, m = np.asarray(open_image(row.image)).astype(int), np.asarray(open_image(row["mask"])) > 127
    assert px[16, 4, 2] > 200 > px[16, 4, 0] and px[16, 28, 0] > 200 > px[16, 28, 2]
    assert m[:, 24:].all() and not m[:, :10].any()
    # the mask rotated by EXIF instead, over an upright image
    Image.fromarray(np.full((48, 32, 3), 90, np.uint8)).save(tmp_path / "up.png")
    stored_mask = np.zeros((32, 48), np.uint8)
    stored_mask[:12] = 255                       # top as stored -> right side as shown
    _exif_save(Image.fromarray(stored_mask), tmp_path / "rot_m.png")
    row, rejects = _build_one(tmp_path, "up.png", "rot_m.png", resize="stretch")
    assert rejects.empty, rejects.to_dict("records")
    m = np.asarray(open_image(row["mask"])) > 127
    assert m[:, 26:].all() and not m[:, :20].any()


def _rgba(colour, alpha):
    return Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), "RGBA")


def test_mask_in_the_alpha_channel(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 80, np.uint8)).save(tmp_path / "i.png")
    alpha = np.zeros((32, 32), np.uint8)
    alpha[8:16, 8:24] = 255
    white = np.full((32, 32, 3), 255, np.uint8)
    _rgba(white, alpha).save(tmp_path / "rgba_m.png")  # white strokes on a transparent layer
    Image.fromarray(np.dstack([np.zeros_like(alpha), alpha]), "LA").save(tmp_path / "la_m.png")
    for mask in ("rgba_m.png", "la_m.png"):
        row, rejects = _build_one(tmp_path, "i.png", mask)
        assert rejects.empty, rejects.to_dict("records")
        assert row.mask_fraction == 0.125
    # colour and alpha both carry a different mask: ambiguous, rejected saying so
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[20:28] = 255
    _rgba(colour, alpha).save(tmp_path / "both_m.png")
    row, rejects = _build_one(tmp_path, "i.png", "both_m.png")
    assert row is None and list(rejects["kind"]) == ["alpha_mask"]
    assert "the mask is in the alpha channel" in rejects["reason"][0] and "both_m.png" in rejects["file"][0]


def test_16bit_mask_is_scaled(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 80, np.uint8)).save(tmp_path / "i.png")
    m = np.zeros((32, 32), np.uint16)
    m[:8] = 65535
    m[8:16] = 20000  # below half: not a hole (8-bit 78)
    Image.fromarray(m).save(tmp_path / "m16.png")
    row, rejects = _build_one(tmp_path, "i.png", "m16.png")
    assert rejects.empty and row.mask_fraction == 0.25


# ---------------------------------------------------------------- manifests

def test_ids_from_relative_paths_and_split_names(tmp_path):
    for sub in ("cats", "dogs"):
        (tmp_path / sub).mkdir()
        _png(tmp_path / sub / "001.png", np.full((32, 32, 3), 90, np.uint8))
    rows = pd.DataFrame({"image": ["cats/001.png", "dogs/001.png", "cats/001.png", "dogs/001.png"],
                         "split": ["train", "Validation", "valid", "training"]})
    rows.to_csv(tmp_path / "m.csv", index=False)
    tcfg = _tcfg(source="manifest", manifest=str(tmp_path / "m.csv"), on_bad="skip")
    inp = load_input(tcfg, "")
    assert list(inp["id"]) == ["cats_001", "dogs_001", "cats_001", "dogs_001"]
    assert list(inp["split"]) == ["labelled", "val", "val", "training"]
    df, metrics = build_triplets(inp, tcfg, 32, tmp_path / "out", progress=False)
    assert list(df["id"]) == ["cats_001", "dogs_001"] and metrics["splits"] == {"labelled": 1, "val": 1}
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert list(rejects["kind"]) == ["duplicate_id", "duplicate_id"]  # the same files listed twice


@pytest.mark.parametrize("name, content, reason", [
    ("header.csv", b"image,mask,prompt\n", "no rows"),
    ("zero.csv", b"", "empty file (0 bytes)"),
    ("latin1.csv", "image,prompt\na.png,caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ("broken.parquet", b"PAR1 this is not parquet", "cannot read it as parquet"),
    ("broken.jsonl", b'{"image": "a.png"\n', "cannot read it as jsonl"),
    ("noimage.csv", b"file,prompt\na.png,x\n", "no 'image' column"),
])
def test_unusable_manifest_fails_naming_file_and_reason(tmp_path, capsys, name, content, reason):
    (tmp_path / name).write_bytes(content)
    rc = stage_main(["--params", PARAMS, "--manifest", str(tmp_path / name),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and f"{tmp_path / name}: " in err and reason in err, err
    assert not (tmp_path / "out").exists()


def test_utf8_bom_manifest_and_empty_image_folder(tmp_path):
    _png(tmp_path / "a.png", np.full((32, 32, 3), 90, np.uint8))
    (tmp_path / "m.csv").write_bytes("\ufeffimage,prompt\na.png,caf\u00e9\n".encode("utf-8"))
    rows = load_input(_tcfg(source="manifest", manifest=str(tmp_path / "m.csv")), "")
    assert list(rows["id"]) == ["a"] and list(rows["local_prompt"]) == ["caf\u00e9"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none: no images in the folder"):
        load_input(_tcfg(source="folders", image_dir=str(tmp_path / "none")), "")
