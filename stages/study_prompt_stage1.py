"""studies/dvc.yaml matrix stage `prompt_stage1`: full's stage 1 at one seed, the start of every prompt-quality
level's stage 2 at that seed (pipeline/studies/prompt_quality.py).

    python -m stages.study_prompt_stage1 SEED    # -> models/studies/prompt_quality/stage1/sSEED
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.entry import arg
from pipeline.studies.prompt_quality import train_stage1
from pipeline.study_stage import study_stage


@study_stage(__doc__, arg("seed", type=int), kind="model")
def main(args, cfg, study):
    m = train_stage1(cfg, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER, encoded=paths.ENCODED,
                     out=S.PROMPT_STAGE1 / f"s{args.seed}", work_dir=S.PROMPT_CHECKPOINTS / f"stage1-s{args.seed}",
                     # full's stage 1 at this seed as the main pipeline trained it: taken when the key matches
                     prefixes=[paths.ABLATION_STAGE1 / f"stage1-s{args.seed}", paths.CHECKPOINTS / "distill_stage1"])
    print(f"stage 1 s{args.seed}: {m}")


if __name__ == "__main__":
    sys.exit(main())
