"""Image shards: round trip, bounded writer, one read per row group, refs through load_manifest, errors."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.data import image_shards
from pipeline.data.image_shards import ShardRefError, ShardWriter, is_ref, open_ref, png_bytes
from pipeline.data.images import image_bytes, image_exists, load_manifest, load_mask, load_rgb, open_image


def _rows(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        mask = rng.random((8, 8)) > 0.5
        inst = None if i % 3 == 0 else rng.integers(0, 4, (8, 8), dtype=np.uint8)
        out.append((f"r{i:03d}", img, mask, inst))
    return out


def _write(root, rows, rows_per_shard=5, row_group_rows=2):
    refs = []
    with ShardWriter(root, rows_per_shard, row_group_rows) as w:
        for rid, img, mask, inst in rows:
            refs.append(w.add(rid, {"image": png_bytes(img, "RGB"), "mask": png_bytes(mask, "L"),
                                    "instances": None if inst is None else png_bytes(inst, "L")}))
    return refs


def test_round_trip_across_shards_and_row_groups(tmp_path):
    rows = _rows(13)
    refs = _write(tmp_path, rows)
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == [f"part-{k:05d}.parquet" for k in range(3)]          # 5 + 5 + 3 rows: flushed when full
    assert [pq.ParquetFile(tmp_path / "shards" / f).metadata.num_row_groups for f in files] == [3, 3, 2]
    assert refs[7] == {"image": "shards/part-00001.parquet#image/2", "mask": "shards/part-00001.parquet#mask/2",
                       "instances": "shards/part-00001.parquet#instances/2"}
    assert pq.read_table(tmp_path / "shards" / files[1], columns=["id"])["id"].to_pylist() == \
        ["r005", "r006", "r007", "r008", "r009"]
    for (rid, img, mask, inst), ref in zip(rows, refs):
        assert all(is_ref(r) for r in ref.values() if r is not None)
        assert np.array_equal(np.asarray(open_ref(tmp_path / ref["image"])), img)
        assert np.array_equal(load_mask(str(tmp_path / ref["mask"])), mask)
        if inst is None:
            assert ref["instances"] is None
        else:
            assert np.array_equal(np.asarray(open_image(str(tmp_path / ref["instances"]))), inst)


def test_consecutive_rows_read_each_row_group_once(tmp_path, monkeypatch):
    refs = _write(tmp_path, _rows(10), rows_per_shard=10, row_group_rows=4)
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: calls.append((i, tuple(columns))) or real(self, i, columns=columns, **kw))
    for ref in refs:  # image, mask, image, mask, ...: both columns' groups stay cached
        load_rgb(str(tmp_path / ref["image"]))
        load_mask(str(tmp_path / ref["mask"]))
    assert sorted(calls) == [(g, (c,)) for g in range(3) for c in ("image", "mask")]


def test_refs_resolve_relative_to_the_manifest(tmp_path, monkeypatch):
    rows = _rows(4)
    refs = _write(tmp_path / "data", rows)
    pd.DataFrame([{"id": r[0], **ref} for r, ref in zip(rows, refs)]).to_parquet(tmp_path / "data/manifest.parquet")
    monkeypatch.chdir(tmp_path)
    m = load_manifest("data/manifest.parquet")
    assert m["image"][1] == "data/shards/part-00000.parquet#image/1"
    assert np.array_equal(load_rgb(m["image"][1]), rows[1][1])
    assert pd.isna(m["instances"][0]) and image_exists(m["instances"][1])
    assert image_bytes(m["mask"][2]) == png_bytes(rows[2][2], "L")
    assert load_manifest("data/manifest.parquet", resolve=False)["image"][1] == refs[1]["image"]


def test_missing_shard_or_row_names_the_file_and_row(tmp_path):
    _write(tmp_path, _rows(3))
    shard = tmp_path / "shards/part-00000.parquet"
    with pytest.raises(ShardRefError, match=r"part-00000\.parquet: no row 7 \(the shard has 3 rows\)"):
        open_image(f"{shard}#image/7")
    with pytest.raises(ShardRefError, match=r"part-00009\.parquet: shard file not found \(row 1"):
        open_image(f"{tmp_path}/shards/part-00009.parquet#mask/1")
    with pytest.raises(ShardRefError, match=r"row 0 holds no instances"):
        image_bytes(f"{shard}#instances/0")
    assert not image_exists(f"{shard}#image/7") and not image_exists(f"{shard}#instances/0")
    assert image_exists(f"{shard}#image/2") and not image_exists(tmp_path / "nope.png")


def test_is_ref_tells_refs_from_paths():
    assert is_ref("a/shards/part-00003.parquet#mask/17") and is_ref("x.parquet#instances/0")
    assert not is_ref("a/b.png") and not is_ref("a/b#1.png") and not is_ref("x.parquet#depth/0")
    assert not is_ref(None) and not is_ref("x.parquet#image/-1")


def test_rewritten_shard_is_read_afresh(tmp_path):
    ref = str(tmp_path / _write(tmp_path, _rows(2))[1]["image"])
    first = image_bytes(ref)
    _write(tmp_path, _rows(3)[1:])  # same file name, other contents
    assert image_bytes(ref) != first and image_bytes(ref) == png_bytes(_rows(3)[2][1], "RGB")
    assert image_shards.CACHE_GROUPS >= 3  # image, mask and instances of one row group stay cached together
