"""pseudo_labeller: learns from the labelled annotations, captions from image + mask only, round-trips through
safetensors, and is the unlabelled split's backend (never the annotations)."""

import json

import pandas as pd
import pytest
import torch

from pipeline.captions.pseudo_labeller import PseudoLabeller, PseudoLabellerCaptioner, evaluate, train
from pipeline.config import ConfigError
from pipeline.data.images import load_manifest
from pipeline.data.synthetic import generate_scenes
from pipeline.data.triplets import build_triplets, load_input
from tests.params import config, full

SMALL = {"data": {"image_size": 16, "max_objects": 2, "splits": {"labelled": 512, "unlabelled": 8, "val": 64, "test": 4, "world": 4}},
         "caption": {"pseudo_labeller": {"image_size": 16, "channels": [16, 32, 64], "epochs": 20, "batch_size": 32,
                                         "lr": 1.0e-2, "min_exact_match": None}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl")
    cfg = config(SMALL)
    generate_scenes(cfg.data, cfg.seed, root / "scenes", progress=False)
    build_triplets(load_input(cfg.triplets, root / "scenes/manifest.parquet"), cfg.triplets, cfg.data.image_size,
                   root / "triplets", progress=False)
    rows = load_manifest(root / "triplets/manifest.parquet").to_dict("records")
    split = {s: [r for r in rows if r["split"] == s] for s in ("labelled", "unlabelled", "val")}
    pl, info = train(split["labelled"], cfg.caption.pseudo_labeller, cfg.data, cfg.seed, progress=False)
    pl.save(root / "model")
    return {"root": root, "cfg": cfg, "pl": pl, **split}


def test_beats_chance_on_held_out_rows(world):
    from collections import Counter

    val = world["val"]
    m = evaluate(world["pl"], val)
    # what a constant guess gets: the commonest background, the commonest local prompt
    majority_bg = Counter(r["background"] for r in val).most_common(1)[0][1] / len(val)
    assert m["global_accuracy"]["background"] > majority_bg + 0.1, m
    assert m["local_accuracy"]["objects"] > m["majority_local_exact_match"] + 0.1, m


def test_captioner_reads_only_image_and_mask(world):
    cap = PseudoLabellerCaptioner(world["root"] / "model", world["cfg"].caption.pseudo_labeller)
    rows = world["unlabelled"]
    clean = cap.caption([{"id": r["id"], "image": r["image"], "mask": r["mask"]} for r in rows], None, False)
    poisoned = [{**r, "objects": "[]", "background": "plain", "instances": "/nonexistent.png", "object_index": 99,
                 "local_prompt": "POISON", "global_prompt": "POISON"} for r in rows]
    assert cap.caption(poisoned, None, False) == clean
    assert all(isinstance(lo, str) and isinstance(gl, str) and "POISON" not in lo + gl for lo, gl in clean)


def test_save_load_round_trip(world, tmp_path):
    world["pl"].save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = PseudoLabeller.load(tmp_path / "m")
    rows = world["val"][:16]
    assert loaded.read_rows(rows) == world["pl"].read_rows(rows)
    assert json.loads((tmp_path / "m/config.json").read_text())["max_objects"] == 2


@pytest.mark.parametrize("backend", ["annotations", "caption_noise"])
def test_config_rejects_ground_truth_for_unlabelled(backend):
    from pipeline.config import from_dict

    with pytest.raises(ConfigError, match=f"caption.unlabelled_backend: '{backend}' reads the ground-truth"):
        from_dict(full({"caption": {"unlabelled_backend": backend}}))


def test_caption_stage_sources_and_gate(world, tmp_path):
    from pipeline.captions.run import caption_manifest
    from pipeline.validation.gates import captions_gate
    from pipeline.validation.gx import GateError

    cfg = world["cfg"].caption.model_copy(update={"qwen": world["cfg"].caption.qwen.model_copy(
        update={"cache_dir": str(tmp_path / "cache")})})
    manifest = world["root"] / "triplets/manifest.parquet"
    out = caption_manifest(manifest, cfg, tmp_path / "c.parquet", progress=False, pseudo_labeller=world["root"] / "model")
    unl = out["split"] == "unlabelled"
    assert (out.loc[unl, "caption_source"] == "pseudo_labeller").all()
    assert (out.loc[~unl, "caption_source"] == "annotations").all()
    gates = world["cfg"].gates
    assert captions_gate(tmp_path / "c.parquet", manifest, gates, out_dir=str(tmp_path))["success"]
    # ground truth in an unlabelled row fails the gate
    bad = out.copy()
    bad.loc[unl.idxmax(), "caption_source"] = "annotations"
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(GateError, match="unlabelled_not_from_ground_truth"):
        captions_gate(tmp_path / "bad.parquet", manifest, gates, out_dir=str(tmp_path))


def test_stage_unused_backend_writes_readme_only(world, tmp_path):
    from pipeline.captions.pseudo_labeller import build

    cfg = config({**SMALL, "caption": {**SMALL["caption"], "unlabelled_backend": "qwen2_5_vl"}})
    m = build(cfg, world["root"] / "triplets/manifest.parquet", tmp_path / "pl", tmp_path / "pl.json", progress=False)
    assert m == {"used": False, "unlabelled_backend": "qwen2_5_vl"}
    assert (tmp_path / "pl/README.md").is_file() and not (tmp_path / "pl/model.safetensors").exists()


def test_stage_fails_below_min_exact_match(world, tmp_path):
    from stages.pseudo_labeller import main
    import yaml

    params = full({**SMALL, "caption": {"pseudo_labeller": {**SMALL["caption"]["pseudo_labeller"], "epochs": 1,
                                                            "min_exact_match": 1.0}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(["--params", str(tmp_path / "params.yaml"), "--manifest", str(world["root"] / "triplets/manifest.parquet"),
               "--out", str(tmp_path / "pl"), "--metrics", str(tmp_path / "pl.json")])
    assert rc == 1 and not (tmp_path / "pl").exists()
    assert json.loads((tmp_path / "pl.json").read_text())["passed"] is False
