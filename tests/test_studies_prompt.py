"""pipeline/studies/prompt_quality: the levels' prompts, their re-embedded shards, one stage-2 run on the micro
world, the stability statistics and the summary/report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.studies import prompt_quality as Q
from pipeline.studies import prompt_quality_report as QR
from pipeline.studies.config import prompt_level
from tests.conftest import micro_config


def _captions(n: int = 200) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"u{i:04d}" for i in range(n)], "split": "unlabelled",
                         "local_prompt": [f"a red circle {i}" for i in range(n)], "global_prompt": "g",
                         "caption_source": "pseudo_labeller"})


def test_levels_parse_and_reject_what_is_not_a_level():
    assert [prompt_level(x) for x in ("noise0", "noise25", "noise100", "empty")] == [0.0, 0.25, 1.0, None]
    for bad in ("noise101", "noise", "half", "noise-5"):
        with pytest.raises(ValueError, match="expected noise"):
            prompt_level(bad)


def test_level_prompts_replace_the_stated_share_nested_across_levels():
    caps = _captions()
    ids = list(caps["id"])
    own, n0 = Q.level_prompts(caps, ids, "noise0", 7)
    assert own == list(caps["local_prompt"]) and n0 == 0
    p25, n25 = Q.level_prompts(caps, ids, "noise25", 7)
    p50, n50 = Q.level_prompts(caps, ids, "noise50", 7)
    p100, n100 = Q.level_prompts(caps, ids, "noise100", 7)
    assert n100 == len(ids) and 0.15 < n25 / len(ids) < 0.35 and 0.4 < n50 / len(ids) < 0.6
    changed25 = {i for i, a, b in zip(ids, own, p25) if a != b}
    changed50 = {i for i, a, b in zip(ids, own, p50) if a != b}
    assert changed25 <= changed50  # one draw per row id: a noisier level replaces a superset
    empty, ne = Q.level_prompts(caps, ids, "empty", 7)
    assert set(empty) == {""} and ne == len(ids)
    with pytest.raises(ValueError, match="no local prompt for unlabelled ids"):
        Q.level_prompts(caps, ids + ["nope"], "noise0", 7)


def test_stability_flags_divergence_and_ignores_warm_up():
    steps = np.arange(10, 101, 10)
    calm = pd.DataFrame({"step": steps, "loss": np.linspace(1.0, 0.8, len(steps))})
    s = Q.stability(calm, False, warmup_steps=10)
    assert s["loss_points"] == 9 and not s["diverged"] and s["loss_var"] > 0
    assert s["loss_last_over_min"] == pytest.approx(1.0)
    blow = calm.assign(loss=np.r_[np.linspace(1.0, 0.5, 9), 1.5])
    assert Q.stability(blow, False, 10)["diverged"]
    nan = Q.stability(calm, True, 10)
    assert nan["diverged"] and math.isnan(nan["loss_var"])


def test_stage2_keys_refuse_what_the_study_cannot_vary():
    from pipeline.config import ConfigError

    assert "prompt_embeds" in Q.stage2_keys(micro_config())
    with pytest.raises(ConfigError, match="distill.stage2.prompt"):
        Q.stage2_keys(micro_config(distill={"stage2": {"prompt": "global"}}))


def _tables(tmp_path, shift: dict[str, float], seeds=(0, 1), n=40):
    rng = np.random.default_rng(0)
    base = rng.normal(18, 1, n)
    runs, per = tmp_path / "runs", tmp_path / "per"
    runs.mkdir(), per.mkdir()
    for level, d in shift.items():
        for s in seeds:
            v = base + d + rng.normal(0, 0.05, n)
            pd.DataFrame({"id": [f"t{i}" for i in range(n)], "psnr": v, "psnr_masked": v - 3, "ssim": v / 30,
                          "ssim_masked": v / 40, "agree_psnr": v + 5, "agree_ssim": v / 25}).to_csv(
                per / f"{Q.run_name(level, s)}.csv", index=False)
            (runs / f"{Q.run_name(level, s)}.json").write_text(
                '{"loss_mean": 1.0, "loss_var": 0.01, "loss_cv": 0.1, "loss_last_over_min": 1.1, '
                f'"diverged": {str(level == "empty").lower()}, "changed_share": {0 if level == "noise0" else 1}}}')
    return runs, per


def test_aggregate_pairs_each_level_with_the_pseudo_labeller_s_prompts(tmp_path):
    runs, per = _tables(tmp_path, {"noise0": 0.0, "noise100": -0.5, "empty": 0.0})
    s = QR.aggregate(runs, per, ["noise0", "noise100", "empty"], [0, 1])
    lv = s["levels"]
    assert lv["noise0"]["seeds"] == [0, 1] and "minus_reference" not in lv["noise0"]
    d = lv["noise100"]["minus_reference"]["psnr"]
    assert d["ci_high"] < 0 and d["mean"] == pytest.approx(-0.5, abs=0.05)
    e = lv["empty"]["minus_reference"]["psnr"]
    assert e["ci_low"] <= 0 <= e["ci_high"]
    assert lv["empty"]["diverged"] == 2 and lv["noise0"]["diverged"] == 0
    md = QR.markdown(s, "studies/prompt_quality.png")
    assert "noise100: -0.5" in md and "(worse)" in md and "empty: " in md and "(not significant)" in md
    assert "2 of 6 stage-2 runs diverged" in md


@pytest.fixture(scope="module")
def level_world(micro_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    caps = pd.read_parquet(micro_world["scenes"] / "manifest.parquet")[["id", "split", "local_prompt", "global_prompt"]]
    caps.assign(caption_source="pseudo_labeller").to_parquet(root / "captions.parquet")
    return root


def test_encode_level_rewrites_only_the_prompts_and_trains_stage2(micro_world, level_world):
    from pipeline.data.shards import load_split

    w, root = micro_world, level_world
    cfg = micro_config(distill={"stage2": {"train": {"steps": 2}}})
    kw = dict(foundation=w["foundation"], encoded=w["encoded"], captions=root)
    m0 = Q.encode_level(cfg, "noise0", out=root / "noise0", **kw)
    me = Q.encode_level(cfg, "empty", out=root / "empty", **kw)
    assert m0["changed"] == 0 and me["changed"] == me["rows"] > 0
    keys = Q.stage2_keys(cfg)
    ids, src = load_split(w["encoded"], "unlabelled", keys)
    ids0, t0 = load_split(root / "noise0", "unlabelled")
    idse, te = load_split(root / "empty", "unlabelled")
    assert ids0 == idse == ids and set(t0) == set(keys)
    for k in keys:  # the pseudo-labeller's own prompts embed to what the encode stage wrote
        assert torch.allclose(t0[k], src[k], atol=1e-5), k
    assert torch.equal(te["latents"], src["latents"]) and not torch.allclose(te["prompt_embeds"], src["prompt_embeds"])
    # every row of the empty level holds the one embedding of ""
    assert torch.allclose(te["prompt_embeds"], te["prompt_embeds"][:1].expand_as(te["prompt_embeds"]))

    s1 = root / "stage1"
    Q.train_stage1(cfg, 0, foundation=w["foundation"], teacher=w["teacher"], encoded=w["encoded"], out=s1,
                   work_dir=root / "ck1")
    assert (s1 / "config.json").exists() and not (root / "ck1").exists()
    from pipeline.data.images import load_manifest

    df = load_manifest(w["scenes"] / "manifest.parquet").query("split == 'test'").iloc[:2]
    m, per, hist = Q.run_level(cfg, "empty", 0, foundation=w["foundation"], teacher=w["teacher"],
                               level_encoded=root / "empty", stage1=s1, reference=None, df=df,
                               out_dir=root / "student", work_dir=root / "ck2", live=root / "live")
    assert m["stage2_steps"] == 2 and len(per) == 2 and np.isfinite(per["psnr"]).all()
    assert list(hist["step"]) == [2] and not m["diverged"]  # the Loop logs the last step
    assert not (root / "ck2").exists() and not (root / "live").exists()
