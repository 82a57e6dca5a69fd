"""studies/dvc.yaml stage `studies_report`: the frontier's statistics (metrics/studies/frontier.json: per depth
x arm PSNR/SSIM whole and hole and agreement with the teacher, BCa CIs; paired af - no_af per depth; the knee),
its plot (reports/studies/frontier_depth.png) and reports/studies.md."""

import argparse

from pipeline import studies as S
from pipeline.config import load
from pipeline.metrics_io import read_json, write_json
from pipeline.studies import config as study_config
from pipeline.studies.frontier import aggregate, markdown, plot


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    f = study_config.load(cfg, args.studies).frontier
    ref = cfg.distill.student_layers if cfg.distill.student_layers in f.depths else max(f.depths)
    summary = aggregate(S.FRONTIER_PER_IMAGE, f.depths, f.seeds, f.feature_alignment, ref,
                        read_json(S.FRONTIER_LATENCY))
    write_json(S.FRONTIER_SUMMARY, summary)
    fig = plot(summary, S.STUDIES_FIGURES / "frontier_depth.png")
    S.STUDIES_REPORT.write_text(markdown(summary, str(fig.relative_to(S.STUDIES_REPORT.parent))))
    print(f"wrote {S.STUDIES_REPORT}; knee {summary['knee']}")


if __name__ == "__main__":
    main()
