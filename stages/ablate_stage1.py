"""DVC matrix stage `ablate_stage1`: full's stage 1 at one headline seed, the prefix the ablation runs whose
stage 1 is full's start from (pipeline/distill/ablation.py). At params' seed it copies the headline's final
stage-1 checkpoint instead of training.

    python -m stages.ablate_stage1 SEED
    # -> checkpoints/ablations/stage1-sSEED (the final checkpoint and its FINGERPRINT)
"""

import sys

from pipeline import paths
from pipeline.distill.ablation import train_stage1_prefix
from pipeline.entry import arg, stage


@stage(__doc__, arg("seed", type=int), kind="model")
def main(args, cfg):
    # its out and prefix are pipeline.stage_io.stage1_prefixes (not imported: it would add data/encode.py
    # to this training stage's code deps)
    m = train_stage1_prefix(cfg, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                            encoded=paths.ENCODED, out=paths.ABLATION_STAGE1 / f"stage1-s{args.seed}",
                            prefixes=[paths.CHECKPOINTS / "distill_stage1"])
    print(f"stage1-s{args.seed}", m)


if __name__ == "__main__":
    sys.exit(main())
