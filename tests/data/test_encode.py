"""Encoded shards: N shards load exactly as one, the real output passes the gate, the benchmark runs."""

import json

import pandas as pd
import pytest
import torch

from pipeline.data.encode import encode_dataset
from pipeline.data.encode_benchmark import run_benchmark
from pipeline.data.images import load_manifest
from pipeline.data.shards import TENSOR_KEYS, load_split
from pipeline.flows import merge_shards
from pipeline.metrics_io import write_json
from pipeline.models.world import load_foundation
from pipeline.validation.gates import encoded_gate
from tests.params import config
from pipeline.validation.gx import GateError


@pytest.fixture(scope="module")
def manifest(micro_world):
    return load_manifest(micro_world["scenes"] / "manifest.parquet")


def test_two_shards_union_equals_unsharded(micro_world, manifest, tmp_path):
    cfg = micro_world["cfg"]
    pipe = load_foundation(micro_world["foundation"])
    for i in range(2):   # both shards into one folder: distinct file names, a plain union
        counts = encode_dataset(pipe, manifest, tmp_path / "union", cfg.data.image_size,
                                cfg.text.max_sequence_length, shard=(i, 2), batch=5)
        assert sum(counts.values()) in (len(manifest) // 2, len(manifest) - len(manifest) // 2)
    for i in range(2):   # as the flows run them: one folder per shard, merged
        encode_dataset(pipe, manifest, tmp_path / f"enc.shards/shard-{i}", cfg.data.image_size,
                       cfg.text.max_sequence_length, shard=(i, 2))
    merge_shards([tmp_path / f"enc.shards/shard-{i}" for i in range(2)], tmp_path / "merged")
    for split in sorted(manifest["split"].unique()):
        ids, full = load_split(micro_world["encoded"], split)
        assert ids == sorted(manifest.loc[manifest["split"] == split, "id"])
        assert set(full) == set(TENSOR_KEYS)
        for folder in ("union", "merged"):
            files = sorted(p.name for p in (tmp_path / folder / split).iterdir())
            assert files == [f"shard-0000{i}-of-00002.{ext}" for i in range(2) for ext in ("parquet", "safetensors")]
            got_ids, got = load_split(tmp_path / folder, split)
            assert got_ids == ids
            for k in TENSOR_KEYS:
                if "pooled" in k:
                    # the text projection's matmul depends on the batch's size in its last bit (~5e-7 here)
                    torch.testing.assert_close(got[k], full[k], rtol=0, atol=1e-5, msg=f"{folder}/{split}/{k}")
                else:
                    assert torch.equal(got[k], full[k]), f"{folder}/{split}/{k}"


def test_real_encode_output_passes_gate_and_broken_fails(micro_world, tmp_path):
    scenes = micro_world["scenes"] / "manifest.parquet"
    report = encoded_gate(micro_world["encoded"], scenes, config().gates, out_dir=str(tmp_path / "g"),
                          foundation=micro_world["foundation"])
    assert report["success"] and report["failed"] == 0
    # a manifest row that was never encoded: a count mismatch, named with its split
    m = pd.read_parquet(scenes)
    extra = m.iloc[[0]].assign(id="zz-not-encoded")
    pd.concat([m, extra]).to_parquet(tmp_path / "more.parquet", index=False)
    with pytest.raises(GateError, match="count_matches_manifest") as exc:
        encoded_gate(micro_world["encoded"], tmp_path / "more.parquet", config().gates, out_dir=str(tmp_path / "g"),
                     foundation=micro_world["foundation"])
    assert f"'split': '{extra['split'].iloc[0]}'" in str(exc.value)


def test_encode_benchmark_micro(micro_world, manifest, tmp_path):
    cfg = micro_world["cfg"]
    bcfg = config({"encode_benchmark": dict(steps=1, batch_size=2, repeats=2, warmup_steps=1)}).encode_benchmark
    m = run_benchmark(cfg, bcfg, foundation=micro_world["foundation"], teacher=micro_world["teacher"],
                      encoded=micro_world["encoded"], triplets=None, captions=None, rows=manifest)
    write_json(tmp_path / "encode_benchmark.json", m)
    out = json.loads((tmp_path / "encode_benchmark.json").read_text())
    for k in ("cached_samples_per_s", "on_the_fly_samples_per_s", "speedup", "batch_size", "steps", "repeats",
              "on_the_fly_encode_seconds_per_step", "device"):
        assert k in out, k
    assert out["cached_samples_per_s"] > 0 and out["on_the_fly_samples_per_s"] > 0
    assert out["batch_size"] == 2 and out["steps"] == 1 and len(out["cached_samples_per_s_rounds"]) == 2
