"""Great Expectations gates: pass on good data; a broken manifest / captions / shard fails readably."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.data.shards import load_split, write_shard
from tests.params import REPO, config
from pipeline.validation.gates import captions_gate, encoded_gate, triplets_gate
from pipeline.validation.gx import GateError
from stages.validate_triplets import main as validate_triplets_main
from tests.helpers_data import build_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    build_tiny(root)
    return root


def test_good_data_passes(data, tmp_path):
    g, out = config().gates, str(tmp_path)
    assert triplets_gate(data / "triplets/manifest.parquet", g, 32, out_dir=out)["success"]
    assert captions_gate(data / "captions/captions.parquet", data / "triplets/manifest.parquet", g, out_dir=out)["success"]
    report = json.loads((tmp_path / "triplets.json").read_text())
    assert report["success"] and report["failed"] == 0 and (tmp_path / "triplets.md").exists()


def test_broken_manifest_fails_with_readable_message(data, tmp_path, capsys):
    m = pd.read_parquet(data / "triplets/manifest.parquet")
    m.loc[2, "id"] = m.loc[1, "id"]          # duplicate id
    m.loc[4, "mask_fraction"] = 1.0          # mask covers everything
    m.loc[5, "image"] = None                 # null path
    m.to_parquet(data / "triplets/broken.parquet", index=False)
    rc = validate_triplets_main(["--params", str(REPO / "params.yaml"), "--manifest",
                                 str(data / "triplets/broken.parquet"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "gate 'triplets' failed" in err
    assert "expect_column_values_to_be_unique(id)" in err and m.loc[1, "id"] in err
    assert "expect_column_values_to_be_between(mask_fraction" in err and "e.g." in err
    assert "expect_column_values_to_not_be_null(image)" in err
    md = (tmp_path / "triplets.md").read_text()
    assert "FAILED" in md and "**FAIL**" in md


def test_broken_captions(data, tmp_path):
    c = pd.read_parquet(data / "captions/captions.parquet")
    c.loc[0, "local_prompt"] = c.loc[0, "global_prompt"]
    c.loc[1, "local_prompt"] = ""
    c.to_parquet(tmp_path / "c.parquet", index=False)
    with pytest.raises(GateError, match="local_differs_from_global") as exc:
        captions_gate(tmp_path / "c.parquet", data / "triplets/manifest.parquet", config().gates, out_dir=str(tmp_path))
    assert "expect_column_value_lengths_to_be_between(local_prompt" in str(exc.value)


VLM_CAPTIONS = ['a "vintage" sign reading café', "is that a dog? yes!", "Müller's grüne Tür", "señor's piñata",
                "crème brûlée on a plate", "a 50% off label & a price tag (€5)", "l'été à Zürich",
                "東京の看板", "a smiling face 🙂", "an em dash — and a non-breaking space"]


@pytest.mark.parametrize("text", VLM_CAPTIONS)
def test_caption_rule_accepts_what_a_vlm_writes(text):
    from pipeline.validation.gates import CAPTION_OK, caption_problem

    assert caption_problem(text) == CAPTION_OK


@pytest.mark.parametrize("text,reason", [
    ("", "blank"), ("   ", "blank"), ("a red\ncircle", "U+000A"), ("a red\tcircle", "U+0009"),
    ("bell\x07", "U+0007"), ("zero\u200bwidth", "ZERO WIDTH SPACE"), ("caf\ufffd", "U+FFFD"),
    ("line\u2028sep", "LINE SEPARATOR"), ("nul\x00", "U+0000"), ("esc\x1b[31mred", "U+001B"),
])
def test_caption_rule_rejects_blank_and_control_characters(text, reason):
    from pipeline.validation.gates import CAPTION_OK, caption_problem

    problem = caption_problem(text)
    assert problem != CAPTION_OK and reason in problem, problem


def test_captions_gate_on_vlm_text(data, tmp_path):
    """The gate passes captions as a VLM writes them, and fails naming the row on a control character or
    an overlong caption (gates.caption_max_chars)."""
    c = pd.read_parquet(data / "captions/captions.parquet")
    for i, text in enumerate(VLM_CAPTIONS):
        c.loc[i, "local_prompt"] = text
    c.to_parquet(tmp_path / "ok.parquet", index=False)
    g = config().gates
    assert captions_gate(tmp_path / "ok.parquet", data / "triplets/manifest.parquet", g, out_dir=str(tmp_path))["success"]
    c.loc[3, "local_prompt"] = "a red circle\x07"
    c.loc[4, "global_prompt"] = "x" * (g.caption_max_chars + 1)
    c.to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(GateError) as exc:
        captions_gate(tmp_path / "bad.parquet", data / "triplets/manifest.parquet", g, out_dir=str(tmp_path))
    msg = str(exc.value)
    assert "expect_column_values_to_be_in_set(local_prompt_check" in msg and "U+0007" in msg and c.loc[3, "id"] in msg
    assert "expect_column_value_lengths_to_be_between(global_prompt" in msg
    assert "to_be_in_set(global_prompt_check" not in msg and "to_be_in_set(local_differs_from_global" not in msg


def _write_encoded(root, manifest, nan=False, channels=16, num_shards=2):
    """Encoded shards in the real format (pipeline.data.shards.write_shard), random values."""
    for split, ids in manifest.groupby("split")["id"]:
        ids = sorted(ids)
        for i in range(num_shards):
            part = ids[i::num_shards]
            n = len(part)
            t = {"latents": torch.randn(n, channels, 16, 16), "masked_latents": torch.randn(n, channels, 16, 16),
                 "mask": torch.ones(n, 1, 16, 16), "prompt_embeds": torch.randn(n, 24, 32),
                 "pooled_prompt_embeds": torch.randn(n, 64), "global_prompt_embeds": torch.randn(n, 24, 32),
                 "global_pooled_prompt_embeds": torch.randn(n, 64)}
            if nan and split == "val" and i == 0:
                t["latents"][0, 0, 0, 0] = float("nan")
            write_shard(root / split, i, num_shards, part, t)


def _vae_config(root, channels=16):
    """A foundation folder as far as the gate reads it: vae/config.json."""
    (root / "vae").mkdir(parents=True)
    (root / "vae/config.json").write_text(json.dumps({"latent_channels": channels}))
    return root


def test_encoded_gate_takes_the_latent_channels_from_the_vae(data, tmp_path):
    m = pd.read_parquet(data / "triplets/manifest.parquet")
    _write_encoded(tmp_path / "enc", m, channels=4)
    kw = dict(cfg=config().gates, out_dir=str(tmp_path / "g"))
    assert encoded_gate(tmp_path / "enc", data / "triplets/manifest.parquet",
                        foundation=_vae_config(tmp_path / "f4", 4), **kw)["success"]
    with pytest.raises(GateError, match=r"not \(N,16,h,w\)"):
        encoded_gate(tmp_path / "enc", data / "triplets/manifest.parquet", foundation=_vae_config(tmp_path / "f16"),
                     **kw)


def test_encoded_gate(data, tmp_path):
    m = pd.read_parquet(data / "triplets/manifest.parquet")
    g, out, vae = config().gates, str(tmp_path / "g"), _vae_config(tmp_path / "f")
    _write_encoded(tmp_path / "ok", m)
    assert encoded_gate(tmp_path / "ok", data / "triplets/manifest.parquet", g, out_dir=out, foundation=vae)["success"]
    assert load_split(tmp_path / "ok", "val")[0] == sorted(m.loc[m["split"] == "val", "id"])
    _write_encoded(tmp_path / "bad", m, nan=True)
    # count mismatch: one id dropped from a shard's id file of `test`
    idx = tmp_path / "bad/test/shard-00001-of-00002.parquet"
    pd.read_parquet(idx).iloc[1:].to_parquet(idx, index=False)
    # wrong shape: a shard of `labelled` whose mask is not at latent size
    d = tmp_path / "bad/labelled"
    name = "shard-00000-of-00002.safetensors"
    t = load_file(str(d / name))
    t["mask"] = torch.ones(len(t["mask"]), 1, 8, 8)
    save_file(t, str(d / name))
    with pytest.raises(GateError) as exc:
        encoded_gate(tmp_path / "bad", data / "triplets/manifest.parquet", g, out_dir=out, foundation=vae)
    msg = str(exc.value)
    assert "all_finite" in msg and "non-finite: ['latents']" in msg and "'split': 'val'" in msg
    assert "shard-00000-of-00002.safetensors" in msg
    assert "shapes_ok" in msg and "mask (" in msg and "not (N,1,h,w)" in msg
    assert "ids_match_rows" in msg and "lists" in msg and "ids for" in msg
    assert "count_matches_manifest" in msg and "'split': 'test'" in msg


def test_encoded_gate_missing_split_and_stale_shards(data, tmp_path):
    m = pd.read_parquet(data / "triplets/manifest.parquet")
    g, out, vae = config().gates, str(tmp_path / "g"), _vae_config(tmp_path / "f")
    _write_encoded(tmp_path / "enc", m)
    for f in (tmp_path / "enc/val").iterdir():   # a split the manifest has, never encoded
        f.unlink()
    _write_encoded(tmp_path / "other", m[m["split"] == "test"], num_shards=1)   # stale shard of another N
    for f in (tmp_path / "other/test").iterdir():
        f.rename(tmp_path / "enc/test" / f.name)
    with pytest.raises(GateError) as exc:
        encoded_gate(tmp_path / "enc", data / "triplets/manifest.parquet", g, out_dir=out, foundation=vae)
    msg = str(exc.value)
    assert "'split': 'val'" in msg and "'encoded_rows': 0" in msg
    assert "one_shard_count" in msg and "unique_ids" in msg
