"""DVC stage `step_benchmark`: one distillation step vs one plain ControlNet training step (time ratio next
to the FLOP ratio, GFLOP/s against a matmul ceiling) and torch.compile of the distillation step
-> metrics/step_benchmark.json (pipeline/evaluation/step_benchmark.py; params step_benchmark and the
distillation settings the step reads)."""

import sys
from pathlib import Path

from pipeline import paths
from pipeline.entry import arg, stage
from pipeline.evaluation.step_benchmark import run_step_benchmark
from pipeline.metrics_io import write_json


@stage(__doc__, arg("--out", default=str(paths.STEP_BENCHMARK_METRICS)), kind="serial")
def main(args, cfg):
    m = run_step_benchmark(cfg, cfg.step_benchmark, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                           encoded=paths.ENCODED)
    write_json(Path(args.out), m)
    print(f"distill / plain step: {m['distill_step_ms']:.1f} / {m['plain_step_ms']:.1f} ms = x{m['time_ratio']:.3f} "
          f"(FLOP ratio x{m['flop_ratio']:.3f}); GFLOP/s {m['distill_gflops_per_s']:.2f} / "
          f"{m['plain_gflops_per_s']:.2f}, ceiling {m['ceiling_gflops_per_s']:.2f} ({m['threads']} threads)")
    c = m["compile"]
    if c.get("available"):
        print(f"compiled: x{c['speedup']:.3f} steady state, {c['compile_seconds']:.1f} s to compile, "
              f"pays at the default budget: {c['pays_at_budget']}")
    else:
        print(f"compiled: not available ({c.get('error')})")


if __name__ == "__main__":
    sys.exit(main())
