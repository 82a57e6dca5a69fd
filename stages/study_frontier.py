"""studies/dvc.yaml matrix stage `frontier`: one student of the compression frontier (depth, with or without
L_af, seed) trained at the headline budget and evaluated on the whole test split (pipeline/studies/frontier.py).

    python -m stages.study_frontier DEPTH AF SEED     # AF: true | false
    # -> models/studies/frontier/RUN, metrics/studies/frontier/RUN.json,
    #    metrics/studies/per_image/frontier/RUN.csv   (RUN: d<DEPTH>-af_<AF>-s<SEED>)
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json
from pipeline.studies import config as study_config
from pipeline.studies.frontier import parse_bool, run_frontier, run_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("depth", type=int)
    ap.add_argument("af", type=parse_bool)
    ap.add_argument("seed", type=int)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)  # validated against params.yaml
    name = run_name(args.depth, args.af, args.seed)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    m, ev = run_frontier(cfg, args.depth, args.af, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                         encoded=paths.ENCODED, trajectories=paths.TRAJECTORIES, headline=paths.STUDENT,
                         reference=paths.EVAL_REFERENCE, df=df, out_dir=S.FRONTIER_MODELS / name,
                         work_dir=S.FRONTIER_CHECKPOINTS / name,
                         # full's stage 1 at this seed (main ablate_stage1) and the headline's: taken only
                         # when the run's stage-1 key matches (depth distill.student_layers with L_af)
                         stage1_prefixes=[paths.ABLATION_STAGE1 / f"stage1-s{args.seed}",
                                          paths.CHECKPOINTS / "distill_stage1"])
    write_csv(S.FRONTIER_PER_IMAGE / f"{name}.csv", ev.per_image)
    write_json(S.FRONTIER_RUNS / f"{name}.json", m)
    print(name, {k: v for k, v in m.items() if k != "not_computed"})


if __name__ == "__main__":
    main()
