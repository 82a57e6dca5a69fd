"""studies/dvc.yaml stage `frontier_latency`: measured ControlNet-alone and full-step latency of a student of
each frontier depth and of the teacher, in one process (pipeline.evaluation.benchmark on untrained students:
cost depends on shape only). Writes metrics/studies/frontier_latency.json."""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.metrics_io import write_json
from pipeline.studies.frontier import latency
from pipeline.study_stage import study_stage


@study_stage(__doc__, kind="serial")
def main(args, cfg, study):
    write_json(S.FRONTIER_LATENCY, latency(cfg, study.frontier.depths, foundation=paths.BACKBONE,
                                           teacher=paths.TEACHER))


if __name__ == "__main__":
    sys.exit(main())
