"""DVC matrix stage `ablate_stage1`: full's stage 1 at one headline seed, the prefix the ablation runs whose
stage 1 is full's start from (pipeline/distill/ablation.py). At params' seed it copies the headline's final
stage-1 checkpoint instead of training.

    python -m stages.ablate_stage1 SEED
    # -> checkpoints/ablations/stage1-sSEED (the final checkpoint and its FINGERPRINT)
"""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.distill.ablation import train_stage1_prefix


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    m = train_stage1_prefix(load(args.params), args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                            encoded=paths.ENCODED, out=paths.ABLATION_STAGE1 / f"stage1-s{args.seed}",
                            prefixes=[paths.CHECKPOINTS / "distill_stage1"])
    print(f"stage1-s{args.seed}", m)


if __name__ == "__main__":
    main()
