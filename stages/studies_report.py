"""studies/dvc.yaml stage `studies_report`: the three studies' statistics (metrics/studies/frontier.json,
prompt_quality.json, edges.json: BCa CIs, paired differences, the knee, stage-2 stability), their figures
(reports/studies/*.png) and reports/studies.md with a one-paragraph answer per study
(pipeline/studies/report.py)."""

import argparse

from pipeline import studies as S
from pipeline.atomic import write_file
from pipeline.config import load
from pipeline.studies import config as study_config
from pipeline.studies.report import build


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    text = build(cfg, study_config.load(cfg, args.studies))
    write_file(S.STUDIES_REPORT, text)
    print(f"wrote {S.STUDIES_REPORT}")


if __name__ == "__main__":
    main()
