"""DVC stage `benchmark`: parameters, FLOPs, peak memory and latency of the teacher and each student
(ControlNet alone and a full denoising step), speedups beside the FLOP-ratio ideal, and training
samples/s per stage. One process; writes metrics/benchmark.json. A measurement, not a timed test."""

import sys

from pipeline import paths
from pipeline.entry import stage
from pipeline.evaluation.benchmark import run_benchmark
from pipeline.metrics_io import write_json


@stage(__doc__, kind="serial")
def main(args, cfg):
    m = run_benchmark(cfg, paths.BACKBONE, {"teacher": paths.TEACHER, "student": paths.STUDENT},
                      paths.DISTILL_METRICS)
    write_json(paths.BENCHMARK_METRICS, m)


if __name__ == "__main__":
    sys.exit(main())
