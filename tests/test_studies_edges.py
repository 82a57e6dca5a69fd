"""The edges study (issue 15, item 3): its Configs, statistics and report section on synthetic per-image
tables, one micro-world run of its teacher -> encode -> evaluate -> student path, and its studies/dvc.yaml
stages."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.studies import edges as E
from pipeline.studies import edges_report as R
from tests.params import REPO, config

HOLE = ("psnr_masked", "ssim_masked", "psnr_unmasked", "ssim_unmasked")


# ------------------------------------------------------------------------------------------- configs

def test_edges_configs_change_the_condition_only_and_students_are_never_the_headline():
    from pipeline.distill.ablation import is_headline, variant_config
    from pipeline.distill.trainer import SPLIT_OF

    cfg = config()
    e = E.edges_config(cfg)
    assert e.condition == "edges" and e.model_copy(update={"condition": "inpaint"}) == cfg
    vcfg, name = E.with_variant(cfg)
    for seed in (cfg.seed, cfg.seed + 1):
        run, two_stage = variant_config(vcfg, name, seed)
        assert two_stage and run.condition == "edges" and run.seed == seed
        assert run.distill == cfg.distill                                   # the headline budget and loss
        assert not is_headline(vcfg, name, seed)
    assert set(E.DISTILL_SPLITS) == set(SPLIT_OF.values())
    assert E.student_name(2) == "student-s2"


def test_edges_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="noisy"):
        E.edges_config(config({"distill": {"stage2": {"noisy": "teacher"}}}))
    with pytest.raises(ConfigError, match="condition"):
        E.with_variant(config({"condition": "edges"}))


# ---------------------------------------------------------------------------------------- statistics

def _write(path, ids, cols: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, **cols}).to_csv(path, index=False)


def _tables(root, n=40, edges_gap=-1.0, inpaint_gap=-0.1, rng=None):
    """Synthetic per-image tables: per-image PSNR varies a lot between images; the students differ from
    their teacher by ``*_gap`` dB plus small noise. Edges tables carry NaN hole columns, as the evaluation
    writes them."""
    rng = rng or np.random.default_rng(0)
    ids = [f"test-{i:06d}" for i in range(n)]
    base = rng.normal(18, 2, n)
    ssim = rng.uniform(0.4, 0.8, n)
    nan = {k: np.full(n, np.nan) for k in HOLE}
    e, i = root / "edges", root / "inpaint"
    _write(e / "teacher.csv", ids, {"psnr": base + 1, "ssim": ssim, **nan})
    _write(e / "backbone_only.csv", ids, {"psnr": base - 5 + rng.normal(0, 0.1, n), "ssim": ssim - 0.3 + rng.normal(0, 0.01, n), **nan,
                                          "agree_psnr": base, "agree_ssim": ssim})
    for s in (0, 1, 2):
        _write(e / f"student-s{s}.csv", ids, {"psnr": base + 1 + edges_gap + rng.normal(0, 0.05, n),
                                               "ssim": ssim - 0.01 + rng.normal(0, 0.005, n), **nan,
                                               "agree_psnr": base + 20, "agree_ssim": rng.uniform(0.9, 1, n)})
    hole = {k: base - 6 for k in HOLE}
    _write(i / "teacher.csv", ids, {"psnr": base, "ssim": ssim, **hole})
    _write(i / "backbone_only.csv", ids, {"psnr": base - 4, "ssim": ssim - 0.2 + rng.normal(0, 0.01, n), **hole,
                                          "agree_psnr": base, "agree_ssim": ssim})
    for s in (0, 1, 2):
        _write(i / "ablations" / f"full-s{s}.csv", ids, {"psnr": base + inpaint_gap + rng.normal(0, 0.05, n),
                                                          "ssim": ssim + rng.normal(0, 0.005, n), **hole,
                                                          "agree_psnr": base + 25, "agree_ssim": rng.uniform(0.9, 1, n)})
    return e, i


def test_summary_gap_signs_cis_and_no_hole_metrics(tmp_path):
    e, i = _tables(tmp_path)
    s = R.summarise(config(), [0, 1, 2], edges_per_image=e, inpaint_per_image=i, inpaint_seeds=[0, 1, 2])
    ed, inp = s["conditions"]["edges"], s["conditions"]["inpaint"]
    assert ed["student"]["seeds"] == [0, 1, 2] and ed["student"]["n_images"] == 40
    g = ed["gap_student_minus_teacher"]["psnr"]
    assert g["mean"] == pytest.approx(-1.0, abs=0.05) and g["ci_low"] <= g["mean"] <= g["ci_high"] < 0
    gi = inp["gap_student_minus_teacher"]["psnr"]
    assert gi["mean"] == pytest.approx(-0.1, abs=0.05) and gi["ci_high"] < 0
    # paired over the same test images: the edges gap is 0.9 dB worse, with a CI excluding 0
    d = s["gap_edges_minus_inpaint"]["psnr"]
    assert d["mean"] == pytest.approx(-0.9, abs=0.05) and d["ci_high"] < 0
    assert ed["teacher_minus_backbone"]["psnr"]["mean"] == pytest.approx(6.0, abs=0.1)
    assert ed["teacher_minus_backbone"]["psnr"]["ci_low"] > 0
    assert ed["teacher"]["psnr"]["ci_low"] < ed["teacher"]["psnr"]["mean"] < ed["teacher"]["psnr"]["ci_high"]
    assert ed["student"]["agree_psnr"]["mean"] > 30
    # the per-image tables' variance between images (2 dB) cancels in the paired gap: a narrow CI
    assert g["ci_high"] - g["ci_low"] < 0.2 < ed["teacher"]["psnr"]["ci_high"] - ed["teacher"]["psnr"]["ci_low"]

    def keys(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from keys(v)
    assert not set(keys(s["conditions"])) & set(HOLE)          # hole metrics: never read, never reported
    assert "_gap" not in ed
    md = R.markdown(s)
    assert md.startswith("## Edges condition") and md.endswith("\n")
    assert "masked" not in md and "PSNR hole" not in md
    table = [ln for ln in md.splitlines() if ln.startswith("| edges")]
    assert len(table) == 1 and "-1.0" in table[0]              # gap -1.00 [..]
    assert "Edges: the student - teacher PSNR gap is -1.0" in md
    assert "its CI lies below 0" in md and "larger than inpainting's" in md
    assert "weighs every latent pixel 1" in md
    json_ok = yaml.safe_load(yaml.safe_dump(s))                   # plain data (written as JSON)
    assert json_ok["seeds"] == {"edges": [0, 1, 2], "inpaint": [0, 1, 2]}


def test_summary_with_a_gap_that_is_not_significant_and_missing_runs(tmp_path):
    e, i = _tables(tmp_path, edges_gap=0.0, rng=np.random.default_rng(1))
    (e / "student-s2.csv").unlink()
    s = R.summarise(config(), [0, 1, 2], edges_per_image=e, inpaint_per_image=i, inpaint_seeds=[0, 1, 2])
    g = s["conditions"]["edges"]["gap_student_minus_teacher"]["psnr"]
    assert s["conditions"]["edges"]["student"]["seeds"] == [0, 1]
    assert g["ci_low"] <= 0 <= g["ci_high"]
    assert "its CI contains 0" in R.markdown(s)
    # nothing of the edges study yet: the section says so instead of failing
    empty = R.summarise(config(), [0], edges_per_image=tmp_path / "none", inpaint_per_image=i, inpaint_seeds=[0])
    assert empty["conditions"]["edges"]["student"] is None and empty["gap_edges_minus_inpaint"] is None
    assert "Edges: no student - teacher gap" in R.markdown(empty)
    assert "could not be computed" in R.findings({**s, "gap_edges_minus_inpaint": {"psnr": {
        "mean": 0.0, "ci_low": float("nan"), "ci_high": float("nan"), "n": 2, "level": 0.95}}})


def test_students_on_other_test_images_are_refused(tmp_path):
    e, i = _tables(tmp_path)
    t = pd.read_csv(e / "student-s1.csv")
    t.iloc[:-1].to_csv(e / "student-s1.csv", index=False)
    with pytest.raises(ValueError, match="other test images"):
        R.summarise(config(), [0, 1, 2], edges_per_image=e, inpaint_per_image=i)


def test_plot_writes_a_png(tmp_path):
    e, i = _tables(tmp_path)
    s = R.summarise(config(), [0, 1, 2], edges_per_image=e, inpaint_per_image=i, inpaint_seeds=[0, 1, 2])
    out = R.plot(s, tmp_path / "fig" / "edges.png")
    assert out.stat().st_size > 1000


# ------------------------------------------------------------------------------------ micro world

def test_edges_study_path_on_the_micro_world(micro_world, tmp_path):
    """teacher -> encode -> teacher + backbone evaluation -> a two-stage student through run_ablation, on the
    micro world, each as the studies/dvc.yaml stages call them."""
    from pipeline.data.images import load_manifest
    from pipeline.data.shards import load_split, tensor_keys
    from pipeline.evaluation.evaluate import test_rows
    from pipeline.models.world import load_controlnet
    from tests.conftest import micro_config

    cfg = micro_config(distill={"checkpoint_every": 1, "stage1": {"train": {"steps": 1, "batch_size": 2}},
                                "stage2": {"train": {"steps": 1, "batch_size": 2}}})
    w = micro_world
    teacher = tmp_path / "teacher"
    m = E.train_edges_teacher(cfg, scenes=w["scenes"], foundation=w["foundation"], out=teacher,
                              checkpoints=tmp_path / "ck/teacher", live=None)
    assert m
    et = load_controlnet(teacher, condition="edges")
    assert et.config.extra_conditioning_channels == 0 and et.pos_embed_input.proj.weight.shape[1] == 16
    assert et.config.num_layers == cfg.teacher.num_layers

    df = load_manifest(w["scenes"] / "manifest.parquet")
    encoded = tmp_path / "encoded"
    (encoded / "stale").mkdir(parents=True)
    counts = E.encode_edges(cfg, df, foundation=w["foundation"], out=encoded)
    assert set(counts) == set(E.DISTILL_SPLITS) and not (encoded / "stale").exists()
    _, t = load_split(encoded, "labelled", tensor_keys("edges"))
    assert "control_latents" in t and "mask" not in t

    test = test_rows(df, 2)
    reference = tmp_path / "eval_teacher"
    evals = E.evaluate_edges(cfg, test, foundation=w["foundation"], teacher=teacher, reference=reference)
    assert set(evals) == {"teacher", "backbone_only"}
    assert sorted(p.stem for p in reference.glob("*.png")) == sorted(test["id"])
    for ev in evals.values():
        assert ev.summary["psnr_masked"] is None                     # n/a under edges
        assert np.isfinite(ev.per_image["psnr"]).all()

    m, ev = E.run_student(cfg, 1, foundation=w["foundation"], teacher=teacher, encoded=encoded,
                          reference=reference, df=test, out_dir=tmp_path / "student-s1",
                          work_dir=tmp_path / "ck/student-s1")
    assert m["condition"] == "edges" and m["seed"] == 1 and m["two_stage"] == 1
    assert m["stage1_steps"] == 1 and m["stage2_steps"] == 1
    assert not (tmp_path / "ck/student-s1").exists()                 # scratch removed
    st = load_controlnet(tmp_path / "student-s1", condition="edges")
    assert st.config.extra_conditioning_channels == 0 and st.pos_embed_input.proj.weight.shape[1] == 16
    assert st.config.num_layers == cfg.distill.student_layers
    for k in ("psnr", "ssim", "agree_psnr", "agree_ssim"):
        assert math.isfinite(m[k]) and np.isfinite(ev.per_image[k]).all(), k
    assert ev.per_image["psnr_masked"].isna().all()


# ------------------------------------------------------------------------------------ studies/dvc.yaml

EDGES_STAGES = ("edges_teacher", "edges_encode", "edges_evaluate", "edges_student")


def _data(deps) -> set[str]:
    """A stage's data deps: all but its code dep (digests/stages.<module>.json, pipeline.closure)."""
    return {d for d in deps if not d.startswith("digests/")}


def test_edges_stages_read_their_own_teacher_and_data_only():
    from pipeline import paths as P
    from pipeline.closure import digest_file, import_closure

    stages = yaml.safe_load((REPO / "studies" / "dvc.yaml").read_text())["stages"]
    assert set(EDGES_STAGES) <= set(stages)
    main_only = {str(p) for p in (P.ENCODED, P.TRAJECTORIES, P.TEACHER, P.TEACHER_PASSED, P.STUDENT,
                                  P.STUDENT_STAGE1, P.EVAL_REFERENCE, P.ABLATION_STAGE1, P.CHECKPOINTS)}
    for name in EDGES_STAGES:
        st = stages[name]
        module = st["cmd"].split()[2]
        data = _data(st["deps"])
        assert not data & main_only, (name, data & main_only)
        assert not any(d.startswith(("data/trajectories", "checkpoints/")) for d in data), name
        assert set(st["deps"]) - data == {str(digest_file(module))}          # its code: its closure's digest
        assert "pipeline/studies/edges_report.py" not in import_closure(module)  # a report edit retrains nothing
    assert _data(stages["edges_teacher"]["deps"]) == {"data/scenes", "models/backbone"}
    student = stages["edges_student"]
    assert student["cmd"] == "python -m stages.study_edges_student ${item.seed}"
    assert student["matrix"] == {"seed": "${edges.seeds}"}
    assert {"models/studies/edges/teacher", "data/studies/edges/encoded",
            "data/studies/edges/eval_teacher"} <= set(student["deps"])
    assert "distill" in student["params"] and "seed" not in student["params"]  # the seed is the run's
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in student["outs"]}
    assert outs == {"models/studies/edges/student-s${item.seed}", "metrics/studies/edges/student-s${item.seed}.json",
                    "metrics/studies/per_image/edges/student-s${item.seed}.csv"}
    evaluate = {next(iter(o)) if isinstance(o, dict) else o for o in stages["edges_evaluate"]["outs"]}
    assert "data/studies/edges/eval_teacher" in evaluate and "metrics/studies/per_image/edges/teacher.csv" in evaluate
    assert "condition" in stages["edges_encode"]["params"] and "runtime.encode_batch_size" in stages["edges_encode"]["params"]


@pytest.mark.parametrize("module", ["study_edges_teacher", "study_edges_encode", "study_edges_evaluate",
                                    "study_edges_student"])
def test_stage_scripts_parse_their_arguments(module, capsys):
    import importlib

    mod = importlib.import_module(f"stages.{module}")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0 and "--studies" in capsys.readouterr().out
