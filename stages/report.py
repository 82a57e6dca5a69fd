"""DVC stage `report`: reports/report.md and reports/figures/*.png from the metrics files the pipeline
wrote; every derived figure (paper reference, means, standard deviations, gaps) goes to metrics/report.json."""

import sys

from pipeline import paths
from pipeline.entry import stage
from pipeline.reporting.report import build_report


@stage(__doc__, kind="report")
def main(args, cfg):
    build_report(cfg, paths.METRICS, paths.REPORT, paths.FIGURES, paths.SAMPLES, paths.DVCLIVE)
    print(f"wrote {paths.REPORT}")


if __name__ == "__main__":
    sys.exit(main())
