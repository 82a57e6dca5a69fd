"""DVC stage `pseudo_labeller`: data/triplets (labelled split) -> models/pseudo_labeller, metrics/pseudo_labeller.json
(params: seed, data vocabulary, caption.unlabelled_backend, caption.pseudo_labeller).

Trains the model that captions the unlabelled split (pipeline/captions/pseudo_labeller.py) and evaluates it on
val; exit 1 when val local exact match is under caption.pseudo_labeller.min_exact_match. When
caption.unlabelled_backend is not pseudo_labeller it writes a README-only folder and {"used": false}.
"""

import argparse
import json
import sys

from pipeline import paths
from pipeline.atomic import NotOurOutputError
from pipeline.config import ConfigError, load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default=str(paths.TRIPLETS / "manifest.parquet"))
    ap.add_argument("--out", default=str(paths.PSEUDO_LABELLER))
    ap.add_argument("--metrics", default=str(paths.PSEUDO_LABELLER_METRICS))
    args = ap.parse_args(argv)
    try:
        cfg = load(args.params)
        from pipeline.captions.pseudo_labeller import BelowThreshold, build

        try:
            metrics = build(cfg, args.manifest, args.out, args.metrics)
        except BelowThreshold as exc:
            print(f"pseudo_labeller: {exc}", file=sys.stderr)
            return 1
    except (ConfigError, ValueError, FileNotFoundError, NotOurOutputError) as exc:
        print(f"pseudo_labeller: {exc}", file=sys.stderr)
        return 2
    summary = {k: metrics["val"][k] for k in ("local_exact_match", "global_exact_match")} if metrics["used"] \
        else {"used": False}
    print(f"{args.out}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
