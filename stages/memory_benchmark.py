"""DVC stage `memory_benchmark`: peak RSS of encode and of stage-1 distillation at N and factor x N rows
(params memory_benchmark, runtime) -> metrics/memory_benchmark.json; fails when either grows by more than
memory_benchmark.max_ratio (memory must not grow with the data)."""

import sys

from pipeline import paths
from pipeline.data.memory_benchmark import BOUNDED, run_memory_benchmark
from pipeline.entry import CheckFailed, stage
from pipeline.metrics_io import write_json


@stage(__doc__, kind="serial")
def main(args, cfg):
    m = run_memory_benchmark(cfg, triplets=paths.TRIPLETS, captions=paths.CAPTIONS, foundation=paths.BACKBONE,
                             teacher=paths.TEACHER, params=args.params)
    write_json(paths.MEMORY_BENCHMARK_METRICS, m)
    for arm in BOUNDED:
        print(f"{arm}: peak RSS x{m[arm]['ratio']:.3f} from {m['rows'][0]} to {m['rows'][1]} rows")
    if not m["bounded"]:
        raise CheckFailed(f"peak RSS grew more than x{m['max_ratio']} with the data")


if __name__ == "__main__":
    sys.exit(main())
