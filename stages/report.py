"""DVC stage `report`: reports/report.md and reports/figures/*.png from the metrics files the pipeline
wrote; every derived figure (paper reference, means, standard deviations, gaps) goes to metrics/report.json."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.reporting.report import build_report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    build_report(cfg, paths.METRICS, paths.REPORT, paths.FIGURES, paths.SAMPLES, paths.DVCLIVE)
    print(f"wrote {paths.REPORT}")


if __name__ == "__main__":
    main()
