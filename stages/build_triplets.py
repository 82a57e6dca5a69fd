"""DVC stage `build_triplets`: scenes or a user dataset -> data/triplets (params: data.image_size, triplets).

One-off use: python -m stages.build_triplets --manifest FILE --out DIR [--on-bad skip] [--shard i/N]
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline import paths
from pipeline.atomic import NotOurOutputError, write_file
from pipeline.config import ConfigError, load
from pipeline.data.triplets import BadRowsError, TripletsConfig, build_triplets, load_input, parse_shard


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", help="user manifest (csv/parquet/jsonl); overrides triplets.source")
    ap.add_argument("--image-dir", help="folder of images; overrides triplets.source")
    ap.add_argument("--mask-dir")
    ap.add_argument("--scenes", default=str(paths.SCENES / "manifest.parquet"))
    ap.add_argument("--out", default=str(paths.TRIPLETS))
    ap.add_argument("--shard", help="i/N: process a deterministic subset (by id hash)")
    ap.add_argument("--on-bad", choices=["fail", "skip"])
    ap.add_argument("--metrics", help="metrics JSON (default metrics/triplets.json, or OUT/metrics.json "
                                      "when --out is not the default)")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.params)
        tcfg = cfg.triplets
        over = {"on_bad": args.on_bad} if args.on_bad else {}
        if args.manifest:
            over |= {"source": "manifest", "manifest": args.manifest}
        elif args.image_dir:
            over |= {"source": "folders", "image_dir": args.image_dir, "mask_dir": args.mask_dir}
        tcfg = tcfg.model_copy(update=over)
        shard = parse_shard(args.shard)
        rows = load_input(tcfg, args.scenes)
        df, metrics = build_triplets(rows, tcfg, cfg.data.image_size, args.out, shard)
    except BadRowsError as exc:
        print(f"build_triplets: {exc}\n(nothing written to {args.out})", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError, NotOurOutputError) as exc:
        print(f"build_triplets: {exc}", file=sys.stderr)
        return 2
    metrics_path = Path(args.metrics) if args.metrics else (
        paths.TRIPLETS_METRICS if Path(args.out) == paths.TRIPLETS else Path(args.out) / "metrics.json")
    write_file(metrics_path, json.dumps(metrics, indent=2) + "\n")
    print(f"{args.out}: {metrics['written']} triplets, {metrics['rejected']} rejected {metrics['splits']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
