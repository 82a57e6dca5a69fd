"""studies/dvc.yaml stage `studies_report`: the three studies' statistics (metrics/studies/frontier.json,
prompt_quality.json, edges.json: BCa CIs, paired differences, the knee, stage-2 stability), their figures
(reports/studies/*.png) and reports/studies.md with a one-paragraph answer per study
(pipeline/studies/report.py)."""

import sys

from pipeline import studies as S
from pipeline.atomic import write_file
from pipeline.studies.report import build
from pipeline.study_stage import study_stage


@study_stage(__doc__, kind="report")
def main(args, cfg, study):
    write_file(S.STUDIES_REPORT, build(cfg, study))
    print(f"wrote {S.STUDIES_REPORT}")


if __name__ == "__main__":
    sys.exit(main())
