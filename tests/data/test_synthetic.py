"""Synthetic generator: determinism, split independence, mask/record/prompt consistency, bad params."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError
from tests.params import config
from pipeline.data import prompts
from pipeline.data.images import image_bytes, load_manifest, open_image, read_images, read_masks
from pipeline.data.synthetic import MANIFEST_COLUMNS, SPLIT_CODES, generate_scenes, make_scene, scene_rng

SMALL = {"data": {"splits": {"labelled": 12, "unlabelled": 8, "val": 4, "test": 4, "world": 6}, "random_mask_fraction": 0.5}}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cfg = config(SMALL)
    out = tmp_path_factory.mktemp("s") / "scenes"
    df = generate_scenes(cfg.data, cfg.seed, out, progress=False)
    return cfg, out, df


def test_manifest_layout(scenes):
    cfg, out, df = scenes
    assert list(df.columns) == MANIFEST_COLUMNS
    assert df.groupby("split").size().to_dict() == {"labelled": 12, "unlabelled": 8, "val": 4, "test": 4, "world": 6}
    assert df.id.is_unique and df.id.str.match(r"^(labelled|unlabelled|val|test|world)-\d{6}$").all()
    assert not list(out.parent.glob(".scenes.tmp-*"))  # atomic: no temp dir left
    assert set(df.mask_kind) <= {"object", "box", "stroke"}
    assert ((df.object_index == -1) == (df.mask_kind != "object")).all()


def test_deterministic_and_split_independent(scenes, tmp_path):
    cfg, out, df = scenes
    a = make_scene(cfg.data, scene_rng(cfg.seed, "val", 3))
    b = make_scene(cfg.data, scene_rng(cfg.seed, "val", 3))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.objects == b.objects
    # changing another split's count changes nothing in this one
    raw = json.loads(json.dumps(SMALL))
    raw["data"]["splits"]["labelled"] = 3
    cfg2 = config(raw)
    df2 = generate_scenes(cfg2.data, cfg2.seed, tmp_path / "s2", progress=False)
    cols = ["id", "objects", "global_prompt", "local_prompt", "mask_fraction"]
    for split in ("unlabelled", "val", "test"):
        pd.testing.assert_frame_equal(df[df.split == split][cols].reset_index(drop=True),
                                      df2[df2.split == split][cols].reset_index(drop=True))
    one = [load_manifest(d / "manifest.parquet").set_index("id").loc["val-000003"] for d in (out, tmp_path / "s2")]
    for col in ("image", "mask", "instances"):
        assert image_bytes(one[0][col]) == image_bytes(one[1][col])
    # a different seed gives different scenes
    c = make_scene(cfg.data, scene_rng(cfg.seed + 1, "val", 3))
    assert not np.array_equal(a.image, c.image)


def test_mask_record_prompt_consistency(scenes):
    cfg, out, df = scenes
    for row in df.itertuples():
        img = np.asarray(open_image(out / row.image))
        mask = np.asarray(open_image(out / row.mask))
        inst = np.asarray(open_image(out / row.instances))
        objects = json.loads(row.objects)
        assert img.shape == (32, 32, 3) and mask.shape == inst.shape == (32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        hole = mask > 127
        assert 0 < hole.sum() < hole.size and abs(hole.mean() - row.mask_fraction) < 1e-9
        assert cfg.data.min_objects <= len(objects) <= cfg.data.max_objects
        assert inst.max() <= len(objects)
        for k, obj in enumerate(objects):
            ys, xs = np.nonzero(inst == k + 1)
            assert len(xs) > 0, "every object stays visible"
            x0, y0, x1, y1 = obj["bbox"]
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert obj["layer"] == k
        assert row.global_prompt == prompts.global_prompt(objects, row.background)
        assert row.global_prompt.endswith(f"on a {row.background} background")
        if row.mask_kind == "object":
            k = row.object_index
            assert hole[inst == k + 1].all()  # the object's visible pixels are in the hole
            o = objects[k]
            assert row.local_prompt.split()[-2:] == [o["color"], o["shape"]]
        else:
            assert row.local_prompt == prompts.local_prompt_for_mask(objects, row.background, inst, hole)


def test_prompt_writer():
    objs = [{"shape": s, "color": c} for s, c in
            [("circle", "red"), ("square", "blue"), ("circle", "red"), ("cross", "orange"), ("cross", "orange")]]
    assert prompts.global_prompt(objs, "striped") == \
        "two red circles, a blue square and two orange crosses on a striped background"
    assert prompts.local_prompt(objs, "striped", [3]) == "an orange cross"
    assert prompts.local_prompt(objs, "striped", []) == "striped background"


def test_readers(scenes):
    cfg, out, df = scenes
    m = load_manifest(out / "manifest.parquet")
    x = read_images(m.image[:3])
    k = read_masks(m["mask"][:3])
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert k.shape == (3, 1, 32, 32) and set(k.unique().tolist()) <= {0.0, 1.0}
    assert abs(k[0].mean().item() - m.mask_fraction[0]) < 1e-6


@pytest.mark.parametrize("raw, key", [
    ({"data": {"image_size": -4}}, "data.image_size"),
    ({"data": {"shapes": ["hexagon"]}}, "data.shapes"),
    ({"data": {"max_objects": 40, "min_object_size": 0.5}}, "data.max_objects"),
    ({"data": {"splits": {"val": 0}}}, "data.splits.val"),
    ({"data": {"random_mask_fraction": 1.5}}, "data.random_mask_fraction"),
])
def test_bad_params_name_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(raw)


def test_the_world_split_trains_the_world_and_nothing_else(tmp_path):
    """Data roles: the tiny world's VAE, backbone and teacher read the world split only, and no world scene
    becomes a triplet (so the teacher never saw a labelled, unlabelled, val or test image)."""
    from pipeline.config import SPLITS
    from pipeline.data.triplets import load_input
    from pipeline.foundation.data import TRAIN_SPLITS, scenes

    cfg = config(SMALL)
    df = generate_scenes(cfg.data, cfg.seed, tmp_path / "scenes", progress=False)
    assert TRAIN_SPLITS == ("world",) and "world" not in SPLITS
    world = scenes(tmp_path / "scenes", TRAIN_SPLITS)
    assert set(world["split"]) == {"world"} and len(world) == 6
    rows = load_input(cfg.triplets, tmp_path / "scenes" / "manifest.parquet")
    assert set(rows["split"]) == set(SPLITS) and not rows["id"].isin(world["id"]).any()
    # adding the world split changed no other split's scenes: codes of the four splits are as before
    assert [SPLIT_CODES[s] for s in SPLITS] == [0, 1, 2, 3] and len(df) == 34
