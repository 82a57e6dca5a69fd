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

Statistics and report section: pipeline.studies.prompt_quality_report (a module of its own: the run stages'
code deps are this module's import closure, so editing the report reruns the report alone, not 15 stage-2
runs).
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
    """full's stage 1 at ``seed`` into the model folder ``out`` (checkpoints in ``work_dir``, removed after).
    Launched on several processes, every rank trains (DDP) and rank 0 alone writes and removes."""
    from pipeline import distributed
    from pipeline.distill.ablation import variant_config
    from pipeline.distill.trainer import distill

    vcfg, _ = variant_config(cfg, "full", seed)
    m = distill(vcfg, "stage1", foundation=foundation, teacher=teacher, encoded=encoded, out=out,
                checkpoints=Path(work_dir), live=None, prefixes=prefixes)
    if distributed.world().main:
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
    outputs. Returns (metrics, per-image table or None when the run diverged, the loss history). Launched on
    several processes, every rank trains (DDP) and evaluates its share of the rows; rank 0 alone writes,
    removes the scratch folders and returns the results; the other ranks return no table and no history."""
    from pipeline import distributed
    from pipeline.atomic import write_dir
    from pipeline.distill.ablation import variant_config
    from pipeline.distill.trainer import distill
    from pipeline.evaluation.evaluate import evaluate_model
    from pipeline.runtime import runtime
    from pipeline.training import NonFiniteLoss

    vcfg, _ = variant_config(cfg, "full", seed)
    stage2_keys(vcfg)
    main = distributed.world().main
    work_dir, live = Path(work_dir), Path(live)  # live: dvclive resumes with the checkpoints after a kill
    metrics: dict = {"level": level, "seed": seed, "noise_share": prompt_level(level), "stage1": str(stage1)}
    try:
        metrics.update(distill(vcfg, "stage2", foundation=foundation, teacher=teacher, encoded=level_encoded,
                               out=out_dir, checkpoints=work_dir, live=live, init=stage1))
        nonfinite = False
    except NonFiniteLoss as exc:
        nonfinite = True
        metrics["error"] = str(exc)
        if main:  # the DVC output exists either way; it says why there is no model
            with write_dir(out_dir) as tmp:
                (Path(tmp) / "README.md").write_text(f"{run_name(level, seed)} diverged: {exc}\n")
    history = None
    if main:  # rank 0 alone reads dvclive's log (only it wrote one) and removes the scratch folders
        history = loss_history(live)
        metrics.update(stability(history, nonfinite, vcfg.distill.stage2.train.warmup_steps))
        for scratch in (work_dir, live):
            shutil.rmtree(scratch, ignore_errors=True)
    if nonfinite:
        return {**metrics, **{k: math.nan for k in METRICS}}, None, history
    pipe = runtime(vcfg).load_foundation(foundation)
    ev = evaluate_model(vcfg, pipe, run_name(level, seed), out_dir, df, reference=reference)
    if ev is None:  # a rank other than 0 of a launched run: it evaluated its share of the rows
        return metrics, None, None
    return {**ev.summary, **metrics}, ev.per_image, history
