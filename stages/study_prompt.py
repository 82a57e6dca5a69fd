"""studies/dvc.yaml matrix stage `prompt_quality`: stage 2 at one prompt-quality level and seed from full's stage 1,
evaluated on the whole test split (pipeline/studies/prompt_quality.py).

    python -m stages.study_prompt LEVEL SEED
    # -> models/studies/prompt_quality/RUN, metrics/studies/prompt_quality/RUN.json (+ RUN-loss.csv: stage-2 loss),
    #    metrics/studies/per_image/prompt_quality/RUN.csv        (RUN: LEVEL-sSEED)
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json
from pipeline.studies import config as study_config
from pipeline.studies.prompt_quality import run_level, run_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("level", type=lambda s: (study_config.prompt_level(s), s)[1])
    ap.add_argument("seed", type=int)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)
    name = run_name(args.level, args.seed)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    m, per_image, history = run_level(
        cfg, args.level, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
        level_encoded=S.PROMPT_ENCODED / args.level, stage1=S.PROMPT_STAGE1 / f"s{args.seed}",
        reference=paths.EVAL_REFERENCE, df=df, out_dir=S.PROMPT_MODELS / name,
        work_dir=S.PROMPT_CHECKPOINTS / name, live=S.PROMPT_CHECKPOINTS / f"{name}-dvclive")
    write_csv(S.PROMPT_PER_IMAGE / f"{name}.csv", per_image if per_image is not None else
              df[["id"]].assign(**{k: float("nan") for k in ("psnr", "ssim")}))
    write_csv(S.PROMPT_RUNS / f"{name}-loss.csv", history)
    write_json(S.PROMPT_RUNS / f"{name}.json", m)
    print(name, {k: v for k, v in m.items() if k != "not_computed"})


if __name__ == "__main__":
    main()
