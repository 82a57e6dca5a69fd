"""DVC matrix stages `ablate_headline` / `ablate`: train one ablation variant at one seed (the headline
student's budget) and evaluate it on the whole test split.

    python -m stages.ablate VARIANT SEED
    # -> models/ablations/VARIANT-sSEED, metrics/ablations/VARIANT-sSEED.json,
    #    metrics/per_image/ablations/VARIANT-sSEED.csv
Variants: params `ablations` (pipeline/distill/ablation.py).
"""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.distill.ablation import run_ablation, run_name
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant")
    ap.add_argument("seed", type=int)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    cfg = load(args.params)
    name = run_name(args.variant, args.seed)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    m, ev = run_ablation(cfg, args.variant, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                         encoded=paths.ENCODED, trajectories=paths.TRAJECTORIES, headline=paths.STUDENT,
                         reference=paths.EVAL_REFERENCE, df=df, out_dir=paths.ABLATIONS / name,
                         work_dir=paths.CHECKPOINTS / "ablations" / name,
                         # full's stage 1 at this seed (ablate_stage1), and the headline's (params' seed)
                         stage1_prefixes=[paths.ABLATION_STAGE1 / f"stage1-s{args.seed}",
                                          paths.CHECKPOINTS / "distill_stage1"])
    write_csv(paths.PER_IMAGE / "ablations" / f"{name}.csv", ev.per_image)
    write_json(paths.ABLATION_METRICS / f"{name}.json", m)
    print(name, {k: v for k, v in m.items() if k != "not_computed"})


if __name__ == "__main__":
    main()
