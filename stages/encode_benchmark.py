"""DVC stage `encode_benchmark`: stage-1 samples/s with cached shards vs encoding on the fly, one run
-> metrics/encode_benchmark.json (params: encode_benchmark {steps, batch_size, repeats, warmup_steps, device})."""

import sys
from pathlib import Path

from pipeline import paths
from pipeline.data.encode_benchmark import run_benchmark
from pipeline.entry import arg, stage
from pipeline.metrics_io import write_json


@stage(__doc__, arg("--out", default=str(paths.ENCODE_BENCHMARK_METRICS)), kind="serial")
def main(args, cfg):
    m = run_benchmark(cfg, cfg.encode_benchmark, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                      encoded=paths.ENCODED, triplets=paths.TRIPLETS, captions=paths.CAPTIONS)
    write_json(Path(args.out), m)
    print(f"stage-1 samples/s: cached {m['cached_samples_per_s']:.2f}, on the fly "
          f"{m['on_the_fly_samples_per_s']:.2f} (x{m['speedup']:.2f}; batch {m['batch_size']}, "
          f"{m['steps']} steps x {m['repeats']} rounds, {m['device']})")


if __name__ == "__main__":
    sys.exit(main())
