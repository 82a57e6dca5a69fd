"""DVC stage `build_triplets`: scenes or a user dataset -> data/triplets (params: data.image_size, triplets).

One-off use: python -m stages.build_triplets --manifest FILE --out DIR [--on-bad skip] [--shard i/N]
"""

import json
import sys
from pathlib import Path

from pipeline import paths
from pipeline.atomic import write_file
from pipeline.data.triplets import BadRowsError, build_triplets, load_input, parse_shard
from pipeline.entry import CheckFailed, arg, stage


@stage(__doc__,
       arg("--manifest", help="user manifest (csv/parquet/jsonl); overrides triplets.source"),
       arg("--image-dir", help="folder of images; overrides triplets.source"),
       arg("--mask-dir"),
       arg("--scenes", default=str(paths.SCENES / "manifest.parquet")),
       arg("--out", default=str(paths.TRIPLETS)),
       arg("--shard", help="i/N: process a deterministic subset (by id hash)"),
       arg("--on-bad", choices=["fail", "skip"]),
       arg("--metrics", help="metrics JSON (default metrics/triplets.json, or OUT/metrics.json "
                             "when --out is not the default)"))
def main(args, cfg):
    over = {"on_bad": args.on_bad} if args.on_bad else {}
    if args.manifest:
        over |= {"source": "manifest", "manifest": args.manifest}
    elif args.image_dir:
        over |= {"source": "folders", "image_dir": args.image_dir, "mask_dir": args.mask_dir}
    tcfg = cfg.triplets.model_copy(update=over)
    try:
        shard = parse_shard(args.shard)
        rows = load_input(tcfg, args.scenes)
        df, metrics = build_triplets(rows, tcfg, cfg.data.image_size, args.out, shard)
    except BadRowsError as exc:
        raise CheckFailed(f"{exc}\n(nothing written to {args.out})") from exc
    metrics_path = Path(args.metrics) if args.metrics else (
        paths.TRIPLETS_METRICS if Path(args.out) == paths.TRIPLETS else Path(args.out) / "metrics.json")
    write_file(metrics_path, json.dumps(metrics, indent=2) + "\n")
    print(f"{args.out}: {metrics['written']} triplets, {metrics['rejected']} rejected {metrics['splits']}")


if __name__ == "__main__":
    sys.exit(main())
