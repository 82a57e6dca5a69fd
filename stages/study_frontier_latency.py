"""studies/dvc.yaml stage `frontier_latency`: measured ControlNet-alone and full-step latency of a student of
each frontier depth and of the teacher, in one process (pipeline.evaluation.benchmark on untrained students:
cost depends on shape only). Writes metrics/studies/frontier_latency.json."""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.metrics_io import write_json
from pipeline.studies import config as study_config
from pipeline.studies.frontier import latency


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    f = study_config.load(cfg, args.studies).frontier
    write_json(S.FRONTIER_LATENCY, latency(cfg, f.depths, foundation=paths.BACKBONE, teacher=paths.TEACHER))


if __name__ == "__main__":
    main()
