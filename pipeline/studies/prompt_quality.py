"""The prompt-quality study (issue 15): how much does local-prompt quality matter in stage 2?

Stage 2 (unlabelled masked images, L_distill + L_af) is trained from full's stage 1 at each seed with the
unlabelled split's local prompts at controlled quality levels (pipeline.studies.config.prompt_level):
``noise<P>`` replaces P% of the pseudo-labeller's prompts with wrong ones by caption_noise's rule
(pipeline.captions.annotations.add_noise: a random other colour and shape, seeded by row id, so the replaced
rows of noise25 are a subset of noise50's), ``noise0`` keeps them, ``empty`` makes every one "". Everything
else is the headline's: same stage-1 student, budget, seeds and test-split evaluation, so a level's
difference from noise0 is the prompts' effect alone.

- ``encode_level``: the unlabelled split as stage 2 reads it (the image and control tensors copied from the
  encode stage's shards, the local prompts embedded anew by the same text encoders), one micro-batch in
  memory. At SD3 size a level costs as much disk as the encoded unlabelled split (prompt embeddings are
  most of a row), so levels are a parameter, not a sweep.
- ``train_stage1``: full's stage 1 at a seed (the ablation study's variant_config), once per seed, shared by
  every level; it starts from the ablation study's stage-1 prefix when the checkpoint keys match.
- ``run_level``: stage 2 at one level and seed, its loss logged by dvclive (every Loop.log_every steps), then
  the test-split evaluation. A non-finite loss ends the run as diverged (no model, metrics NaN).
- ``aggregate``: per level, the seed-averaged per-image metrics with BCa 95% CIs, the paired per-image
  difference from noise0, and the stage-2 loss statistics over seeds (variance over the logged steps,
  divergence) -> metrics/studies/prompt_quality.json; ``plot`` and ``markdown`` for reports/studies.md.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, ConfigError
from pipeline.studies.config import prompt_level

METRICS = ("psnr", "ssim", "psnr_masked", "ssim_masked", "agree_psnr", "agree_ssim")
REFERENCE_LEVEL = "noise0"
# A run diverged when its loss went non-finite (the Loop stops it) or its last logged loss is this many
# times its lowest: stage 2 starts from a trained stage 1, so a healthy run ends near its minimum.
DIVERGENCE_RATIO = 2.0


def run_name(level: str, seed: int) -> str:
    return f"{level}-s{seed}"


def stage2_keys(cfg: Config) -> tuple[str, ...]:
    """The shard tensors stage 2 reads (pipeline.distill.trainer.shard_keys); its prompt must be the local
    one, which is what a level changes."""
    from pipeline.distill.trainer import shard_keys

    if cfg.distill.stage2.prompt != "local":
        raise ConfigError("distill.stage2.prompt: the prompt-quality study varies the local prompts, but stage 2 "
                          f"reads {cfg.distill.stage2.prompt!r} ones")
    if cfg.distill.stage2.noisy != "image":
        raise ConfigError("distill.stage2.noisy: the prompt-quality study re-embeds the unlabelled prompts only; "
                          "noisy: teacher would need the teacher's trajectories recomputed per level")
    return shard_keys("local", True, cfg.condition)


def level_prompts(captions: pd.DataFrame, ids: list[str], level: str, noise_seed: int) -> tuple[list[str], int]:
    """(the local prompt of each unlabelled id at ``level``, how many differ from the pseudo-labeller's)."""
    from pipeline.captions.annotations import add_noise

    by_id = captions.set_index("id")["local_prompt"]
    missing = [i for i in ids if i not in by_id.index]
    if missing:
        raise ValueError(f"captions: no local prompt for unlabelled ids {missing[:5]} ({len(missing)} rows)")
    share = prompt_level(level)
    out, changed = [], 0
    for i in ids:
        own = by_id[i]
        new = "" if share is None else add_noise(i, own, share, noise_seed)[0]
        changed += new != own
        out.append(new)
    return out, changed


def encode_level(cfg: Config, level: str, *, foundation: Path, encoded: Path, captions: Path, out: Path) -> dict:
    """Write ``out``/unlabelled: stage 2's tensors with the local prompts of ``level`` (atomically)."""
    import torch

    from pipeline.atomic import write_dir
    from pipeline.data.shards import EncodedSplit, write_shard_stream
    from pipeline.models.world import encode_prompts
    from pipeline.runtime import runtime

    keys = stage2_keys(cfg)
    prompt_keys = ("prompt_embeds", "pooled_prompt_embeds")
    src = EncodedSplit(encoded, "unlabelled", tuple(k for k in keys if k not in prompt_keys))
    caps = pd.read_parquet(Path(captions) / "captions.parquet")
    prompts, changed = level_prompts(caps, src.ids, level, cfg.caption.noise_seed)
    rt = runtime(cfg)
    pipe = rt.load_foundation(foundation)
    step = rt.encode_batch_size

    @torch.no_grad()
    def batches():
        for i in range(0, len(src), step):
            rows = src.gather(torch.arange(i, min(i + step, len(src))))
            pe, pp = encode_prompts(pipe, prompts[i:i + step], cfg.text.max_sequence_length)
            yield {**rows, "prompt_embeds": pe.cpu(), "pooled_prompt_embeds": pp.cpu()}

    with write_dir(out) as tmp:
        write_shard_stream(Path(tmp) / "unlabelled", 0, 1, src.ids, batches())
    sources = caps[caps["id"].isin(src.ids)]["caption_source"].value_counts().to_dict()
    return {"level": level, "rows": len(src), "changed": changed, "changed_share": changed / max(len(src), 1),
            "caption_sources": {str(k): int(v) for k, v in sources.items()}}


def train_stage1(cfg: Config, seed: int, *, foundation: Path, teacher: Path, encoded: Path, out: Path,
                 work_dir: Path, prefixes=()) -> dict:
    """full's stage 1 at ``seed`` into the model folder ``out`` (checkpoints in ``work_dir``, removed after)."""
    from pipeline.distill.ablation import variant_config
    from pipeline.distill.trainer import distill

    vcfg, _ = variant_config(cfg, "full", seed)
    m = distill(vcfg, "stage1", foundation=foundation, teacher=teacher, encoded=encoded, out=out,
                checkpoints=Path(work_dir), live=None, prefixes=prefixes)
    shutil.rmtree(work_dir, ignore_errors=True)
    return m


def loss_history(live: Path) -> pd.DataFrame:
    """(step, loss) of stage 2 as dvclive logged it (pipeline.training.Loop: every log_every steps)."""
    f = Path(live) / "plots" / "metrics" / "stage2" / "loss.tsv"
    if not f.exists():
        return pd.DataFrame({"step": [], "loss": []})
    t = pd.read_csv(f, sep="\t")
    return t.rename(columns={"stage2/loss": "loss"})[["step", "loss"]] if "stage2/loss" in t else t[["step", "loss"]]


def stability(history: pd.DataFrame, nonfinite: bool, warmup_steps: int) -> dict:
    """The loss statistics of one stage-2 run: its variance and coefficient of variation over the logged steps
    after warm-up, last / lowest logged loss, and whether it diverged (DIVERGENCE_RATIO or non-finite)."""
    loss = history.loc[history["step"] > warmup_steps, "loss"].to_numpy(dtype=np.float64)
    if nonfinite or not len(loss):
        return {"loss_points": int(len(loss)), "loss_mean": math.nan, "loss_var": math.nan, "loss_cv": math.nan,
                "loss_last_over_min": math.nan, "diverged": bool(nonfinite)}
    ratio = float(loss[-1] / loss.min()) if loss.min() > 0 else math.inf
    return {"loss_points": int(len(loss)), "loss_mean": float(loss.mean()),
            "loss_var": float(loss.var(ddof=1)) if len(loss) > 1 else math.nan,
            "loss_cv": float(loss.std(ddof=1) / loss.mean()) if len(loss) > 1 and loss.mean() else math.nan,
            "loss_last_over_min": ratio, "diverged": bool(ratio > DIVERGENCE_RATIO)}


def run_level(cfg: Config, level: str, seed: int, *, foundation: Path, teacher: Path, level_encoded: Path,
              stage1: Path, reference: Path, df: pd.DataFrame, out_dir: Path, work_dir: Path, live: Path):
    """Stage 2 at ``level`` and ``seed`` from ``stage1``, evaluated on ``df`` (the test rows) against the teacher's
    outputs. Returns (metrics, per-image table or None when the run diverged)."""
    from pipeline.atomic import write_dir
    from pipeline.distill.ablation import variant_config
    from pipeline.distill.trainer import distill
    from pipeline.evaluation.evaluate import evaluate_model
    from pipeline.runtime import runtime
    from pipeline.training import NonFiniteLoss

    vcfg, _ = variant_config(cfg, "full", seed)
    stage2_keys(vcfg)
    work_dir, live = Path(work_dir), Path(live)  # live: dvclive resumes with the checkpoints after a kill
    metrics: dict = {"level": level, "seed": seed, "noise_share": prompt_level(level), "stage1": str(stage1)}
    try:
        metrics.update(distill(vcfg, "stage2", foundation=foundation, teacher=teacher, encoded=level_encoded,
                               out=out_dir, checkpoints=work_dir, live=live, init=stage1))
        nonfinite = False
    except NonFiniteLoss as exc:
        nonfinite = True
        metrics["error"] = str(exc)
        with write_dir(out_dir) as tmp:  # the DVC output exists either way; it says why there is no model
            (Path(tmp) / "README.md").write_text(f"{run_name(level, seed)} diverged: {exc}\n")
    history = loss_history(live)
    metrics.update(stability(history, nonfinite, vcfg.distill.stage2.train.warmup_steps))
    for scratch in (work_dir, live):
        shutil.rmtree(scratch, ignore_errors=True)
    if nonfinite:
        return {**metrics, **{k: math.nan for k in METRICS}}, None, history
    pipe = runtime(vcfg).load_foundation(foundation)
    ev = evaluate_model(vcfg, pipe, run_name(level, seed), out_dir, df, reference=reference)
    return {**ev.summary, **metrics}, ev.per_image, history


# ---------------------------------------------------------------------------------------- statistics

def aggregate(runs: Path, per_image: Path, levels, seeds) -> dict:
    """metrics/studies/prompt_quality.json from the per-run JSON and per-image tables."""
    from pipeline.metrics_io import read_json
    from pipeline.studies.frontier import _ci, _paired

    tables: dict[str, pd.DataFrame] = {}
    out: dict = {"reference_level": REFERENCE_LEVEL, "seeds": list(seeds), "divergence_ratio": DIVERGENCE_RATIO,
                 "levels": {}}
    for level in levels:
        row: dict = {"level": level, "noise_share": prompt_level(level)}
        found, per, stab = [], [], []
        for s in seeds:
            j = Path(runs) / f"{run_name(level, s)}.json"
            if not j.exists():
                continue
            m = read_json(j)
            found.append(s)
            stab.append({k: m.get(k) for k in ("loss_mean", "loss_var", "loss_cv", "loss_last_over_min", "diverged")})
            row.setdefault("changed_share", m.get("changed_share"))
            p = Path(per_image) / f"{run_name(level, s)}.csv"
            if p.exists():
                per.append(pd.read_csv(p).set_index("id")[[c for c in METRICS if c in pd.read_csv(p, nrows=0)]])
        if not found:
            continue
        row["seeds"] = found
        row["diverged"] = int(sum(bool(x["diverged"]) for x in stab))
        for k in ("loss_mean", "loss_var", "loss_cv", "loss_last_over_min"):
            v = np.array([x[k] for x in stab if x[k] is not None], dtype=np.float64)
            v = v[np.isfinite(v)]
            row[k] = {"mean": float(v.mean()) if len(v) else math.nan,
                      "min": float(v.min()) if len(v) else math.nan, "max": float(v.max()) if len(v) else math.nan}
        if per:
            for t, s in zip(per[1:], found[1:]):
                if not t.index.equals(per[0].index):
                    raise ValueError(f"{per_image}/{run_name(level, s)}.csv: other test images than "
                                     f"{run_name(level, found[0])}.csv")
            avg = sum(per) / len(per)
            tables[level] = avg
            row["n_images"] = len(avg)
            row.update({k: _ci(avg[k]) for k in avg.columns})
        out["levels"][level] = row
    ref = tables.get(REFERENCE_LEVEL)
    if ref is not None:
        for level, t in tables.items():
            if level != REFERENCE_LEVEL:
                out["levels"][level]["minus_reference"] = {k: _paired(t, ref, k) for k in ("psnr", "psnr_masked")
                                                           if k in t and k in ref}
    return out


# ------------------------------------------------------------------------------------------- report

def plot(summary: dict, histories: dict[str, list[pd.DataFrame]], path: Path) -> Path:
    """Left: final PSNR (whole image and hole) per level with BCa 95% CIs. Right: stage-2 loss per level
    (mean over seeds of the logged steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(summary["levels"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for off, key, label in ((-0.12, "psnr", "whole image"), (0.12, "psnr_masked", "hole")):
        pts = [(i + off, summary["levels"][lv][key]) for i, lv in enumerate(levels) if key in summary["levels"][lv]]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[[p[1]["mean"] - p[1]["ci_low"] for p in pts], [p[1]["ci_high"] - p[1]["mean"] for p in pts]],
                    fmt="o", capsize=3, label=f"PSNR, {label}")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylabel("dB (test split, BCa 95% CI)")
    ax.set_title("Final quality by unlabelled-prompt quality")
    ax.legend(fontsize=8)
    ax = axes[1]
    for lv in levels:
        hs = [h for h in histories.get(lv, []) if len(h)]
        if hs:
            m = pd.concat(hs).groupby("step")["loss"].agg(["mean", "min", "max"])
            line, = ax.plot(m.index, m["mean"], label=lv)
            ax.fill_between(m.index, m["min"], m["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("loss (mean over seeds; band: min-max)")
    ax.set_title("Stage-2 training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(ci: dict | None, nd: int = 2) -> str:
    if not ci or ci.get("mean") is None or (isinstance(ci["mean"], float) and math.isnan(ci["mean"])):
        return "-"
    return f"{ci['mean']:.{nd}f} [{ci['ci_low']:.{nd}f}, {ci['ci_high']:.{nd}f}]"


def _verdict(diff: dict | None) -> str:
    if not diff:
        return "-"
    if diff["ci_low"] > 0:
        return "better"
    if diff["ci_high"] < 0:
        return "worse"
    return "not significant"


def answer(summary: dict) -> str:
    """The one-paragraph answer, built from the figures only."""
    lv = summary["levels"]
    if REFERENCE_LEVEL not in lv:
        return "The reference level (the pseudo-labeller's own prompts) did not run: no answer."
    parts = []
    for name, row in lv.items():
        d = row.get("minus_reference", {}).get("psnr")
        if d:
            parts.append(f"{name}: {d['mean']:+.2f} dB [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] ({_verdict(d)})")
    worst = [n for n, r in lv.items() if _verdict(r.get("minus_reference", {}).get("psnr")) == "worse"]
    div = sum(r.get("diverged", 0) for r in lv.values())
    runs = sum(len(r.get("seeds", [])) for r in lv.values())
    s = ("Whole-image PSNR against the pseudo-labeller's own prompts (paired per image, seed-averaged, BCa 95% CI): "
         + "; ".join(parts) + ". ")
    s += (f"Significantly worse: {', '.join(worst)}. " if worst else
          "No level is significantly worse than the pseudo-labeller's own prompts. ")
    s += f"{div} of {runs} stage-2 runs diverged (non-finite loss or last logged loss > {DIVERGENCE_RATIO}x its lowest)."
    return s


def markdown(summary: dict, figure: str) -> str:
    out = ["## Prompt quality in stage 2 (issue 15)", "",
           "Stage 2 from full's stage 1 at each seed, with the unlabelled split's local prompts at controlled quality: "
           "noise<P> = P% of the pseudo-labeller's prompts replaced by wrong ones (caption_noise's rule), empty = "
           f"every prompt \"\". Seeds {summary['seeds']}; per-image values averaged over seeds; BCa 95% CIs over "
           "test images. Loss statistics over the logged stage-2 steps after warm-up (mean over seeds).", "",
           f"![prompt quality]({figure})", "",
           "| level | prompts changed | PSNR | PSNR hole | SSIM | agree PSNR | PSNR vs noise0 | loss var | loss CV | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["levels"].items():
        d = r.get("minus_reference", {}).get("psnr")
        ch = r.get("changed_share")
        out.append(f"| {name} | {'-' if ch is None else f'{ch:.0%}'} | {_fmt(r.get('psnr'))} | {_fmt(r.get('psnr_masked'))} "
                   f"| {_fmt(r.get('ssim'), 3)} | {_fmt(r.get('agree_psnr'))} | {_fmt(d) if d else '-'} "
                   f"| {r['loss_var']['mean']:.2e} | {r['loss_cv']['mean']:.3f} | {r['diverged']}/{len(r['seeds'])} |")
    out += ["", "**Answer.** " + answer(summary), ""]
    return "\n".join(out) + "\n"
