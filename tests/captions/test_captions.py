"""caption stage: annotations = generator prompts, caption_noise, shard union, cache/resume, Qwen2.5-VL plumbing."""

import pandas as pd
import pytest

from pipeline.captions.cache import CaptionCache
from tests.params import REPO, config
from pipeline.captions.run import caption_manifest
from stages.caption import main as caption_main
from tests.helpers_data import build_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    build_tiny(root)
    return root


def test_annotations_match_generator_for_all_splits(data):
    cap = pd.read_parquet(data / "captions/captions.parquet")
    scenes = pd.read_parquet(data / "scenes/manifest.parquet")
    scenes = scenes[scenes["split"] != "world"]  # the tiny world's own training data: never a triplet
    m = cap.merge(scenes, on="id", suffixes=("", "_scene"))
    assert len(m) == len(scenes) and set(cap["split"]) == {"labelled", "unlabelled", "val", "test"}
    # the unlabelled split is captioned by caption.unlabelled_backend (a model), every other from the annotations
    m = m[m["split"] != "unlabelled"]
    assert (m["local_prompt"] == m["local_prompt_scene"]).all()
    assert (m["global_prompt"] == m["global_prompt_scene"]).all()
    assert (m["caption_source"] == "annotations").all()
    assert (cap.loc[cap["split"] == "unlabelled", "caption_source"] == "pseudo_labeller").all()


def test_caption_noise(data, tmp_path):
    clean = pd.read_parquet(data / "captions/captions.parquet")
    cfg = config({"caption": dict(backend="caption_noise", noise_fraction=0.5, noise_seed=1,
                                  qwen={"cache_dir": str(tmp_path / "cache")})}).caption
    kw = dict(progress=False, pseudo_labeller=data / "pseudo_labeller")
    a = caption_manifest(data / "triplets/manifest.parquet", cfg, tmp_path / "a.parquet", **kw)
    b = caption_manifest(data / "triplets/manifest.parquet", cfg, tmp_path / "b.parquet", **kw)
    pd.testing.assert_frame_equal(a, b)
    noisy = a["caption_source"] == "caption_noise"
    assert 0 < noisy.sum() < len(a)
    assert (a.loc[noisy, "local_prompt"] != clean.loc[noisy, "local_prompt"]).all()
    assert (a.loc[~noisy, "local_prompt"] == clean.loc[~noisy, "local_prompt"]).all()


def test_shard_union_equals_unsharded(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache dir (data/caption_cache) is created under the cwd
    full = pd.read_parquet(data / "captions/captions.parquet")
    parts = []
    for i in range(3):
        out = tmp_path / f"c{i}.parquet"
        assert caption_main(["--params", str(REPO / "params.yaml"), "--manifest",
                             str(data / "triplets/manifest.parquet"), "--out", str(out), "--shard", f"{i}/3",
                             "--pseudo-labeller", str(data / "pseudo_labeller")]) == 0
        parts.append(pd.read_parquet(out))
    union = pd.concat(parts).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(union, full.sort_values("id").reset_index(drop=True))



def test_flows_sharded_caption_merges_to_the_unsharded_file(data, tmp_path, monkeypatch):
    """As pipeline.flows runs `flows.sharded.caption`: `--shard {shard} --out {out}` with {out} a fresh
    folder per shard, then merge_shards; the merged captions.parquet equals the unsharded one as is."""
    from pipeline.flows import merge_shards, shard_dir

    monkeypatch.chdir(tmp_path)
    args = ["--params", str(REPO / "params.yaml"), "--manifest", str(data / "triplets/manifest.parquet"),
            "--pseudo-labeller", str(data / "pseudo_labeller")]
    assert caption_main(args + ["--out", "full"]) == 0
    full = pd.read_parquet("full/captions.parquet")
    assert list(full["id"]) == sorted(full["id"])
    command = "--shard {shard} --out {out}"
    for i in range(2):
        d = shard_dir("data/captions", i)
        d.mkdir(parents=True)
        argv = command.format(shard=f"{i}/2", out=str(d)).split()
        assert caption_main(args + argv) == 0
        assert [f.name for f in d.iterdir()] == ["captions.parquet"]
    merge_shards([shard_dir("data/captions", i) for i in range(2)], "data/captions")
    pd.testing.assert_frame_equal(pd.read_parquet("data/captions/captions.parquet"), full)

def test_cache_survives_a_cut_line(tmp_path):
    c = CaptionCache(tmp_path / "c.jsonl")
    c.put_many([{"key": "k1", "local": "a", "global": "b"}])
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write('{"key": "k2", "loc')  # killed mid-write
    c2 = CaptionCache(tmp_path / "c.jsonl")
    assert set(c2.entries) == {"k1"}
    c2.put_many([{"key": "k3", "local": "x", "global": "y"}])
    assert set(CaptionCache(tmp_path / "c.jsonl").entries) == {"k1", "k3"}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from pipeline.models.standins import build_qwen

    return build_qwen(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl")


def test_qwen_processor_is_the_real_one(tiny_qwen):
    """Qwen2_5_VLProcessor itself (less the video processor, which needs torchvision): chat template, image
    tokens expanded by the image grid, and the mm_token_type_ids the model needs for its 3D rotary positions."""
    from PIL import Image
    from transformers import Qwen2_5_VLProcessor

    from pipeline.captions.qwen import load_processor

    proc = load_processor(str(tiny_qwen))
    assert isinstance(proc, Qwen2_5_VLProcessor) and type(proc.image_processor).__name__.startswith("Qwen2VLImage")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], padding=True, return_tensors="pt")
    n_image = int((enc["input_ids"] == proc.image_token_id).sum())
    assert n_image == int(enc["image_grid_thw"].prod()) // proc.image_processor.merge_size ** 2 > 0
    assert int(enc["mm_token_type_ids"].sum()) == n_image


def test_qwen_plumbing_cache_and_resume(data, tiny_qwen, tmp_path, monkeypatch):
    from pipeline.captions import qwen

    calls = []
    real = qwen.QwenCaptioner.caption_batch
    monkeypatch.setattr(qwen.QwenCaptioner, "caption_batch", lambda self, rows: calls.append(len(rows)) or real(self, rows))
    cfg = config({"caption": {"backend": "qwen2_5_vl", "unlabelled_backend": "qwen2_5_vl", "qwen": dict(
        model=str(tiny_qwen), vlm_image_size=56, batch_size=4, max_new_tokens=4, cache_dir=str(tmp_path / "cache"))}}
    ).caption
    qcfg = cfg.qwen
    manifest = pd.read_parquet(data / "triplets/manifest.parquet")
    first = manifest.head(5)
    first.to_parquet(data / "triplets/first5.parquet", index=False)
    a = caption_manifest(data / "triplets/first5.parquet", cfg, tmp_path / "a.parquet", progress=False)
    assert len(a) == 5 and (a["caption_source"] == "qwen2_5_vl").all() and sum(calls) == 5
    assert a["local_prompt"].map(lambda s: isinstance(s, str)).all()
    from pipeline.validation.gates import CAPTION_OK, caption_problem

    # the stand-in writes printable text that depends on its input, as the captions gate wants
    assert (a[["local_prompt", "global_prompt"]].map(caption_problem) == CAPTION_OK).all().all()
    assert (a["local_prompt"] != a["global_prompt"]).all()
    # resume: a larger run only captions the rows not yet cached
    calls.clear()
    b = caption_manifest(data / "triplets/manifest.parquet", cfg, tmp_path / "b.parquet", progress=False)
    assert sum(calls) == len(manifest) - 5
    pd.testing.assert_frame_equal(b.head(5), a)
    # a different template is a different cache key
    calls.clear()
    cfg2 = cfg.model_copy(update={"qwen": qcfg.model_copy(update={"local_template": "What is here?"})})
    caption_manifest(data / "triplets/first5.parquet", cfg2, tmp_path / "c.parquet", progress=False)
    assert sum(calls) == 5
