"""DVC stage `encode_benchmark`: stage-1 samples/s with cached shards vs encoding on the fly, one run
-> metrics/encode_benchmark.json (params: encode_benchmark {steps, batch_size, repeats, warmup_steps, device})."""

import argparse
import sys
from pathlib import Path

from pipeline import paths
from pipeline.config import ConfigError, load, section
from pipeline.data.encode_benchmark import EncodeBenchmarkConfig, run_benchmark
from pipeline.metrics_io import write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(paths.ENCODE_BENCHMARK_METRICS))
    args = ap.parse_args(argv)
    try:
        cfg = load(args.params)
        bcfg = cfg.encode_benchmark
    except ConfigError as exc:
        print(f"encode_benchmark: {exc}", file=sys.stderr)
        return 2
    m = run_benchmark(cfg, bcfg, foundation=paths.BACKBONE, teacher=paths.TEACHER, encoded=paths.ENCODED,
                      triplets=paths.TRIPLETS, captions=paths.CAPTIONS)
    write_json(Path(args.out), m)
    print(f"stage-1 samples/s: cached {m['cached_samples_per_s']:.2f}, on the fly "
          f"{m['on_the_fly_samples_per_s']:.2f} (x{m['speedup']:.2f}; batch {m['batch_size']}, "
          f"{m['steps']} steps x {m['repeats']} rounds, {m['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
