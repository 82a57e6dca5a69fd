"""The compression frontier's runs (issue 15): students of each depth (studies/params.yaml
``frontier.depths``), each with the many-to-one L_af pairing pipeline.models.mapping.af_pairs derives for its
depth and without L_af (``distill.stage{1,2}.loss.af = 0``), at the headline budget and several seeds; and
measured ControlNet and full-step latency per depth.

Training and evaluation are the ablation study's (pipeline.distill.ablation.run_ablation): each run is a
variant added to a copy of the Config (``distill.student_layers = depth`` [+ no L_af]), so
- depth = distill.student_layers with L_af at params' seed IS the headline student (models/student):
  evaluated, not retrained (run_ablation's headline check);
- its stage 1 at other seeds starts from full's stage-1 prefix (checkpoints/ablations/stage1-s<seed>) when
  the key matches (depth 12 with L_af); every other run trains its stage 1;
- depth 12 without L_af is the main study's wo_af: retrained here (a DVC dep on metrics/per_image/ablations
  would rerun every frontier run when any ablation changes).

Statistics, knee and report section: pipeline.studies.frontier_report (a module of its own: the run stages'
code deps are this module's import closure, so editing the report reruns the report alone).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, from_dict

ARMS = {True: "af", False: "no_af"}


def arm(af: bool) -> str:
    return ARMS[bool(af)]


def variant_name(depth: int, af: bool) -> str:
    return f"d{depth}-af_{str(bool(af)).lower()}"


def run_name(depth: int, af: bool, seed: int) -> str:
    """d<depth>-af_<true|false>-s<seed>: as studies/dvc.yaml's matrix spells it (DVC writes booleans lower case)."""
    return f"{variant_name(depth, af)}-s{seed}"


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t not in ("true", "false", "1", "0"):
        raise ValueError(f"not a boolean: {text!r}")
    return t in ("true", "1")


def overrides(depth: int, af: bool) -> dict:
    o: dict = {"distill": {"student_layers": int(depth)}}
    if not af:
        o["distill"].update(stage1={"loss": {"af": 0.0}}, stage2={"loss": {"af": 0.0}})
    return o


def with_variant(cfg: Config, depth: int, af: bool) -> tuple[Config, str]:
    """(cfg with the run's variant added to ablations.variants, its name): run_ablation trains it. Nothing a
    run trains or a checkpoint key reads changes: only the variant table grows."""
    raw = cfg.model_dump(mode="json")
    name = variant_name(depth, af)
    raw["ablations"]["variants"][name] = {"two_stage": True, "overrides": overrides(depth, af)}
    return from_dict(raw, f"studies.frontier.{name}"), name


def run_frontier(cfg: Config, depth: int, af: bool, seed: int, *, foundation: Path, teacher: Path, encoded: Path,
                 trajectories: Path, headline: Path, reference: Path, df, out_dir: Path, work_dir: Path,
                 stage1_prefixes=()):
    """Train (or take the headline student) and evaluate one frontier run: run_ablation's (metrics, Evaluation)."""
    from pipeline.distill.ablation import run_ablation

    vcfg, name = with_variant(cfg, depth, af)
    m, ev = run_ablation(vcfg, name, seed, foundation=foundation, teacher=teacher, encoded=encoded,
                         trajectories=trajectories, headline=headline, reference=reference, df=df, out_dir=out_dir,
                         work_dir=work_dir, stage1_prefixes=stage1_prefixes)
    return {**m, "depth": int(depth), "feature_alignment": bool(af), "arm": arm(af)}, ev


# ------------------------------------------------------------------------------------------- latency

def latency(cfg: Config, depths, *, foundation: Path, teacher: Path) -> dict:
    """ControlNet-alone and full-step (backbone + ControlNet) latency per depth, measured by
    pipeline.evaluation.benchmark.run_benchmark on untrained students (cost depends on shape only), the
    teacher in the same process as the speedup reference."""
    from pipeline.evaluation.benchmark import run_benchmark

    bcfg = cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(update={"extra_layers": list(depths)})})
    b = run_benchmark(bcfg, foundation, {"teacher": teacher})
    keep = ("controlnet_params", "controlnet_layers", "controlnet_flops", "step_flops", "controlnet_ms", "step_ms",
            "controlnet_speedup", "step_speedup", "controlnet_speedup_ideal", "step_speedup_ideal",
            "controlnet_peak_mb", "step_peak_mb")
    models = b["models"]
    return {**{k: b[k] for k in ("device", "dtype", "threads", "batch_size", "warmup", "repeats")},
            "backbone_step_ms": b["backbone"]["step_ms"],
            "teacher": {k: models["teacher"][k] for k in keep if k in models["teacher"]},
            "depths": {str(d): {k: models[f"layers_{d}"][k] for k in keep if k in models[f"layers_{d}"]}
                       for d in depths}}
